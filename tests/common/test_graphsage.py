"""GraphSAGE on the user-item graph: the hand-written sampler against the full adjacency, a planted preference,
inductive embeddings for an unseen item and a new user, the Recommender protocol and the export."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from common.errors import ConfigError
from common.graph_sampler import BipartiteGraph, drop_edges, make_sampler, pyg_sampling_available, sample_subgraph
from common.graphsage import (
    GraphSAGEConfig,
    GraphSAGERecommender,
    embed_graph,
    export_item_vectors,
    export_user_vectors,
    shard,
)
from common.interactions import Interactions, TrainData
from common.recommenders.base import Recommender


def random_graph(n_users: int = 30, n_items: int = 40, density: float = 0.2, dim: int = 8,
                 seed: int = 0) -> tuple[BipartiteGraph, sp.csr_matrix]:
    rng = np.random.default_rng(seed)
    x = sp.csr_matrix((rng.random((n_users, n_items)) < density).astype(np.float32))
    return BipartiteGraph.build(x, rng.normal(size=(n_items, dim)).astype(np.float32)), x


def full_adjacency(x: sp.csr_matrix) -> set[tuple[int, int]]:
    """Every directed edge of the graph, by global node id (users first, then items)."""
    u, i = x.nonzero()
    i = i + x.shape[0]
    return set(zip(u.tolist(), i.tolist())) | set(zip(i.tolist(), u.tolist()))


# ---------------------------------------------------------------------------------------------- the graph

def test_graph_holds_both_directions_and_user_features_are_mean_item_features():
    x = sp.csr_matrix(np.array([[1, 0, 1], [0, 0, 0]], np.float32))
    feats = np.array([[1, 0], [0, 1], [3, 4]], np.float32)
    g = BipartiteGraph.build(x, feats)
    assert g.n_nodes == 5 and g.degree.tolist() == [2, 0, 1, 0, 1]
    assert sorted(g.indices[g.indptr[0]:g.indptr[1]].tolist()) == [2, 4]  # user 0 -> items 0 and 2
    np.testing.assert_allclose(g.user_features, [[2, 2], [0, 0]])
    assert g.user_item_edges().tolist() == [[0, 0], [0, 2]]


def test_with_new_nodes_appends_a_content_only_item_and_a_user_with_events():
    g, _ = random_graph()
    bigger = g.with_new_nodes(np.ones((1, g.dim), np.float32), [[3, g.n_items]])
    assert (bigger.n_users, bigger.n_items) == (g.n_users + 1, g.n_items + 1)
    assert bigger.degree[bigger.n_users + g.n_items] == 1  # the new item's one edge is the new user's
    new_user = bigger.n_users - 1
    assert sorted(bigger.indices[bigger.indptr[new_user]:bigger.indptr[new_user + 1]].tolist()) == \
        [bigger.n_users + 3, bigger.n_users + g.n_items]
    for u in range(g.n_users):  # old users keep their items (item nodes move up by one new user)
        old = g.indices[g.indptr[u]:g.indptr[u + 1]] - g.n_users
        assert (bigger.indices[bigger.indptr[u]:bigger.indptr[u + 1]] - bigger.n_users).tolist() == old.tolist()
    with pytest.raises(ConfigError, match="item columns"):
        g.with_new_nodes(None, [[g.n_items + 5]])


# ---------------------------------------------------------------------------------------------- the sampler

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_subgraph_matches_the_full_adjacency(seed):
    g, x = random_graph(seed=seed)
    edges, fanouts = full_adjacency(x), (3, 2)
    rng = np.random.default_rng(seed)
    seeds = np.concatenate([rng.integers(0, g.n_nodes, 12), [5, 5, g.n_users + 1]])  # duplicates on purpose
    sub = sample_subgraph(g, seeds, fanouts, rng)
    nodes = sub.nodes
    # seeds first, unique, in first-occurrence order; seed_index points back at each requested seed
    assert nodes[:sub.n_seeds].tolist() == list(dict.fromkeys(seeds.tolist()))
    assert (nodes[sub.seed_index] == seeds).all()
    assert len(set(nodes.tolist())) == len(nodes)
    src, dst = nodes[sub.edge_index[0].numpy()], nodes[sub.edge_index[1].numpy()]
    pairs = list(zip(src.tolist(), dst.tolist()))
    assert set(pairs) <= edges  # every sampled edge exists in the graph
    assert len(set(pairs)) == len(pairs)  # and none is sampled twice
    in_deg = pd.Series(dst).value_counts()
    seed_set = set(nodes[:sub.n_seeds].tolist())
    hop1 = set(nodes[sub.n_seeds:].tolist()) & set(src[np.isin(dst, list(seed_set))].tolist())
    for node, d in in_deg.items():  # fan-out respected, and all neighbours taken when there are few enough
        fanout = fanouts[0] if node in seed_set else fanouts[1]
        assert d == min(fanout, g.degree[node]), (node, d)
        assert node in seed_set or node in hop1  # only seeds and hop-1 nodes are expanded
    for node in seed_set:
        assert in_deg.get(node, 0) == min(fanouts[0], g.degree[node])
    assert set(nodes[sub.n_seeds:].tolist()) <= set(src.tolist())  # every other node was reached by an edge


def test_fanout_minus_one_takes_every_neighbour():
    g, x = random_graph(seed=4)
    sub = sample_subgraph(g, np.array([0, 1]), (-1,), np.random.default_rng(0))
    got = {(int(sub.nodes[s]), int(sub.nodes[d])) for s, d in sub.edge_index.T.tolist()}
    assert got == {(a, b) for a, b in full_adjacency(x) if b in (0, 1)}


def test_neighbours_are_drawn_uniformly():
    x = sp.csr_matrix(np.ones((1, 4), np.float32))  # one user with four items
    g = BipartiteGraph.build(x, np.eye(4, dtype=np.float32))
    rng = np.random.default_rng(0)
    counts = np.zeros(g.n_nodes)
    for _ in range(4000):
        sub = sample_subgraph(g, np.array([0]), (1,), rng)
        counts[sub.nodes[sub.edge_index[0].numpy()]] += 1
    assert counts[0] == 0 and counts[1:].sum() == 4000
    assert np.all(np.abs(counts[1:] - 1000) < 100), counts  # about 5 standard deviations


def test_the_hand_written_sampler_is_chosen_without_pyg_backends():
    if pyg_sampling_available():
        pytest.skip("pyg-lib or torch-sparse is installed: auto picks PyG's sampler")
    assert make_sampler("auto") is sample_subgraph
    with pytest.raises(ConfigError, match="pyg-lib or torch-sparse"):
        make_sampler("pyg")


@pytest.mark.skipif(not pyg_sampling_available(), reason="needs pyg-lib or torch-sparse")
def test_pyg_sampler_follows_the_same_contract():
    g, x = random_graph(seed=5)
    seeds = np.array([3, 3, g.n_users + 2, 7])
    sub = make_sampler("pyg")(g, seeds, (3, 2), np.random.default_rng(0))
    assert (sub.nodes[sub.seed_index] == seeds).all() and sub.n_seeds == 3
    pairs = zip(sub.nodes[sub.edge_index[0].numpy()].tolist(), sub.nodes[sub.edge_index[1].numpy()].tolist())
    assert set(pairs) <= full_adjacency(x)


def test_shards_are_disjoint_equal_and_drawn_from_the_edges():
    edges = np.stack([np.arange(11), np.arange(11) * 2], axis=1)
    parts = [shard(edges, r, 3, np.random.default_rng(7)) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]
    rows = [tuple(e) for p in parts for e in p.tolist()]
    assert len(set(rows)) == 9 and set(rows) <= {tuple(e) for e in edges.tolist()}
    with pytest.raises(ConfigError, match="rank"):
        shard(edges, 3, 3, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------- the model

def planted(n_per_group: int = 12, items_per_group: int = 10, dim: int = 16, seed: int = 0):
    """Two taste groups: group-g users like (most) group-g items; items of a group share a feature centroid."""
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(2, dim))
    item_group = np.repeat([0, 1], items_per_group)
    feats = centroids[item_group] + 0.3 * rng.normal(size=(len(item_group), dim))
    feats = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)
    user_group = np.repeat([0, 1], n_per_group)
    likes = (user_group[:, None] == item_group[None, :]) & (rng.random((len(user_group), len(item_group))) < 0.6)
    return likes, user_group, item_group, feats, centroids


def fit(likes: np.ndarray, feats: np.ndarray, **kw) -> GraphSAGERecommender:
    ids = lambda p, n: np.asarray([f"{p}{k}" for k in range(n)], object)
    inter = Interactions(ids("u", likes.shape[0]), ids("i", likes.shape[1]), sp.csr_matrix(likes.astype(np.float32)))
    cfg = GraphSAGEConfig(**{"hidden": 32, "dim": 16, "epochs": 40, "batch_size": 64, "negatives": 8,
                             "lr": 0.01, "fanouts": (5, 5), "threads": 1, **kw})
    return GraphSAGERecommender(cfg).fit(TrainData(inter, pd.DataFrame(), item_vectors=feats))


@pytest.mark.parametrize("loss", ["softmax", "bpr"])
def test_recovers_a_planted_preference(loss):
    likes, user_group, item_group, feats, _ = planted()
    rng = np.random.default_rng(1)
    held = likes & (rng.random(likes.shape) < 0.3)  # hide some liked edges; they must still rank high
    rec = fit(likes & ~held, np.random.default_rng(2).normal(size=feats.shape).astype(np.float32), loss=loss)
    assert isinstance(rec, Recommender)
    scores = rec.scores(np.arange(likes.shape[0]))
    assert scores.shape == likes.shape and scores.dtype == np.float32
    # features are noise here: only the graph tells the groups apart
    same = scores[user_group[:, None] == item_group[None, :]].reshape(len(user_group), -1)
    other = scores[user_group[:, None] != item_group[None, :]].reshape(len(user_group), -1)
    assert (same.mean(1) > other.mean(1)).all()
    u, i = np.nonzero(held)
    wins = [(scores[a, b] > other[a]).mean() for a, b in zip(u, i)]
    assert np.mean(wins) > 0.9  # a held-out liked item beats the other group's items


def test_an_unseen_item_is_embedded_from_its_features():
    likes, user_group, _, feats, centroids = planted(seed=3)
    rec = fit(likes, feats)
    # two new items with content only: one near each group's centroid
    new = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    users, items = rec.embed(rec.graph.with_new_nodes(new.astype(np.float32)))
    assert items.shape == (likes.shape[1] + 2, 16)
    u = export_user_vectors(users)
    s = u @ export_item_vectors(items[-2:]).T  # [U, 2] cosine to the new items
    assert (s[user_group == 0, 0] > s[user_group == 0, 1]).mean() >= 0.9
    assert (s[user_group == 1, 1] > s[user_group == 1, 0]).mean() >= 0.9


def test_a_new_user_with_a_few_events_gets_their_groups_items():
    likes, _, item_group, feats, _ = planted(seed=4)
    rec = fit(likes, feats)
    first_group = np.flatnonzero(item_group == 1)[:3]
    users, items = rec.embed(rec.graph.with_new_nodes(None, [first_group.tolist()]))
    scores = export_user_vectors(users[-1:]) @ export_item_vectors(items).T
    scores[0, first_group] = -np.inf  # seen
    top = np.argsort(-scores[0])[:5]
    assert (item_group[top] == 1).all()


def test_embeddings_of_the_training_graph_are_what_scores_use():
    likes, _, _, feats, _ = planted(seed=5)
    rec = fit(likes, feats, epochs=2)
    users, items = embed_graph(rec.model, rec.graph)
    np.testing.assert_allclose(users, rec.user_embeddings, rtol=1e-5, atol=1e-6)
    expected = export_user_vectors(users[:3]) @ export_item_vectors(items).T
    np.testing.assert_allclose(rec.scores(np.arange(3)), expected, rtol=1e-5, atol=1e-6)
    v = export_item_vectors(items)
    assert v.dtype == np.float32 and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_fit_without_item_vectors_says_what_to_do():
    inter = Interactions(np.array(["u"], object), np.array(["i"], object), sp.csr_matrix(np.ones((1, 1), np.float32)))
    with pytest.raises(ConfigError, match="vitrine embed"):
        GraphSAGERecommender().fit(TrainData(inter, pd.DataFrame()))


@pytest.mark.parametrize("kw, text", [({"loss": "hinge"}, "'hinge'"), ({"fanouts": (5, 0)}, "(5, 0)"),
                                      ({"dim": 0}, "Got 0"), ({"sampler": "fast"}, "'fast'"),
                                      ({"id_dropout": 1.5}, "1.5")])
def test_config_rejects_bad_values_and_echoes_them(kw, text):
    with pytest.raises(ConfigError) as err:
        GraphSAGEConfig(**kw)
    assert text in str(err.value)


def test_dropping_target_edges_removes_both_directions_and_nothing_else():
    g, x = random_graph(seed=6)
    sub = sample_subgraph(g, np.arange(g.n_nodes), (-1,), np.random.default_rng(0))  # the whole graph
    u, i = x.nonzero()
    targets = np.stack([u[:5], g.n_users + i[:5]], axis=1)
    kept = drop_edges(sub, targets)
    pairs = set(zip(kept.nodes[kept.edge_index[0].numpy()].tolist(), kept.nodes[kept.edge_index[1].numpy()].tolist()))
    removed = {(int(a), int(b)) for a, b in targets} | {(int(b), int(a)) for a, b in targets}
    assert pairs == full_adjacency(x) - removed
