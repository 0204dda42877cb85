"""The two-tower library: planted tastes are recovered, a new item is served from content, the losses match
plain references, batches leave the target out of the history, and the recommender follows the protocol."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from common.errors import ConfigError
from common.events import EventWeights
from common.interactions import TrainData, build_interactions
from common.recommenders.base import Recommender, top_k
from common.two_tower import (
    TwoTowerConfig,
    TwoTowerRecommender,
    bce_loss,
    build_inputs,
    epoch_pairs,
    in_batch_softmax_loss,
    make_batch,
)

CATEGORIES = ("A", "B", "C")
PER_CATEGORY = 12
COLD = "A-cold"  # an A item in the catalogue that nobody ever touched
NOISE = 0.05  # content noise: small enough that the content MLP cannot tell items of one category apart


def planted(n_users: int = 36, per_user: int = 6, seed: int = 0) -> dict:
    """Users who like one category: they view and buy its items and dislike one item of another category.

    Item content = a noisy one-hot of the category (dim 8); the catalogue holds ``COLD`` without any event.
    """
    rng = np.random.default_rng(seed)
    items = [f"{c}-{i:02d}" for c in CATEGORIES for i in range(PER_CATEGORY)] + [COLD]
    category = {i: i[0] for i in items}
    content = np.zeros((len(items), 8), np.float32)
    for row, item in enumerate(items):
        content[row, CATEGORIES.index(category[item])] = 1.0
    content += rng.normal(0, NOISE, content.shape).astype(np.float32)
    content /= np.linalg.norm(content, axis=1, keepdims=True)
    rows, taste = [], {}
    for u in range(n_users):
        user = f"u{u:02d}"
        cat = CATEGORIES[u % len(CATEGORIES)]
        taste[user] = cat
        liked = rng.choice([i for i in items if i[0] == cat and i != COLD], per_user, replace=False)
        for k, item in enumerate(liked):
            rows.append((user, item, "view" if k % 2 else "purchase", k))
        other = [i for i in items if i[0] != cat]
        rows.append((user, other[rng.integers(len(other))], "dislike", per_user))
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "event", "ts"])
    events["ts"] = pd.to_datetime(events["ts"], unit="s", utc=True)
    items_arr = np.asarray(sorted(items), dtype=object)
    order = np.argsort(np.asarray(items, dtype=object))
    inter = build_interactions(events, EventWeights(), items=items_arr)
    return {"data": TrainData(inter, events, item_vectors=content[order]), "taste": taste, "category": category}


SMALL = TwoTowerConfig(dim=16, hidden=32, epochs=40, batch_size=32, lr=1e-2, temperature=0.1, seed=0)


@pytest.fixture(scope="module")
def fitted() -> dict:
    world = planted()
    return {**world, "rec": TwoTowerRecommender(SMALL).fit(world["data"])}


def test_planted_tastes_are_recovered(fitted):
    inter, rec = fitted["data"].interactions, fitted["rec"]
    ranked = top_k(rec.scores(np.arange(inter.n_users)), 5, exclude=inter.seen)
    share = np.mean([fitted["category"][inter.items[i]] == fitted["taste"][u]
                     for u, row in zip(inter.users, ranked) for i in row])
    assert share >= 0.95


def test_a_cold_item_is_retrieved_from_content_for_users_of_its_category(fitted):
    inter, rec = fitted["data"].interactions, fitted["rec"]
    cold = inter.item_index[COLD]
    assert not build_inputs(fitted["data"]).known[cold]
    # its id embedding never trained (zero init, no gradient): the vector is the content path's alone
    assert torch.count_nonzero(rec.model.item_tower.ids.weight[cold]) == 0
    ranked = top_k(rec.scores(np.arange(inter.n_users)), inter.n_items, exclude=inter.seen)
    unseen_own = PER_CATEGORY - 6  # each user touched 6 items of their category
    for u, user in enumerate(inter.users):
        rank = int(np.flatnonzero(ranked[u] == cold)[0])
        if fitted["taste"][user] == "A":
            assert rank <= unseen_own, (user, rank)  # above every item of another category
        else:
            assert rank >= unseen_own, (user, rank)  # below every unseen item of the user's own category


def test_without_content_the_model_learns_from_ids_alone():
    world = planted()
    data = TrainData(world["data"].interactions, world["data"].events)
    rec = TwoTowerRecommender(SMALL).fit(data)
    inter = data.interactions
    ranked = top_k(rec.scores(np.arange(inter.n_users)), 3, exclude=inter.seen)
    share = np.mean([world["category"][inter.items[i]] == world["taste"][u] for u, row in zip(inter.users, ranked)
                     for i in row])
    assert share >= 0.6  # chance: 6 of the ~30 unseen items are of the user's category (0.2)


def test_recommender_protocol_and_normalised_exports(fitted):
    rec, inter = fitted["rec"], fitted["data"].interactions
    assert isinstance(rec, Recommender)
    s = rec.scores(np.array([0, 3]))
    assert s.dtype == np.float32 and s.shape == (2, inter.n_items)
    for v in (rec.item_vectors, rec.user_vectors):
        assert v.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert rec.losses[-1] < rec.losses[0]


def _softmax_reference(u, v, ids, log_q, t):
    total = 0.0
    for b in range(len(u)):
        logits = []
        for j in range(len(v)):
            if j != b and ids[j] == ids[b]:
                continue  # the same item in another row is not a negative
            logits.append(float(u[b] @ v[j]) / t - (float(log_q[j]) if log_q is not None else 0.0))
        own = float(u[b] @ v[b]) / t - (float(log_q[b]) if log_q is not None else 0.0)
        total += -(own - math.log(sum(math.exp(x) for x in logits)))
    return total / len(u)


@pytest.mark.parametrize("with_logq", [True, False])
def test_in_batch_softmax_with_logq_matches_a_plain_loop(with_logq):
    g = torch.Generator().manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=-1)
    ids = torch.tensor([3, 1, 3, 4, 9, 1, 2])
    log_q = torch.log(torch.tensor([0.3, 0.1, 0.3, 0.05, 0.2, 0.1, 0.25])) if with_logq else None
    got = in_batch_softmax_loss(u, v, ids, log_q, 0.2)
    assert float(got) == pytest.approx(_softmax_reference(u.numpy(), v.numpy(), ids.tolist(),
                                                          None if log_q is None else log_q.numpy(), 0.2), rel=1e-5)


def test_logq_correction_discounts_popular_items_and_credits_rare_ones():
    # Equal scores for three items, one drawn 8x as often: after subtracting log q, a row whose positive is the
    # popular item has a higher loss (it is easy to see as a negative), the rows of rare positives a lower one.
    u = torch.eye(3)
    v = torch.eye(3)
    ids = torch.arange(3)
    log_q = torch.log(torch.tensor([0.8, 0.1, 0.1]))
    plain = torch.nn.functional.cross_entropy(u @ v.T / 0.5, ids, reduction="none")
    corrected = torch.nn.functional.cross_entropy(u @ v.T / 0.5 - log_q[None, :], ids, reduction="none")
    assert corrected[0] > plain[0] and corrected[1] < plain[1] and corrected[2] < plain[2]
    assert float(in_batch_softmax_loss(u, v, ids, log_q, 0.5)) == pytest.approx(float(corrected.mean()), rel=1e-6)


def test_bce_matches_a_plain_loop():
    g = torch.Generator().manual_seed(2)
    u, p = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    n = torch.randn(4, 2, 3, generator=g)

    def nll(x, y):
        s = 1 / (1 + math.exp(-x))
        return -math.log(s if y else 1 - s)

    ref = sum(nll(float(u[b] @ p[b]) / 0.5, 1) for b in range(4)) / 4
    ref += sum(nll(float(u[b] @ n[b, k]) / 0.5, 0) for b in range(4) for k in range(2)) / 4
    assert float(bce_loss(u, p, n, 0.5)) == pytest.approx(ref, rel=1e-5)


def test_batch_history_is_the_weighted_mean_without_the_target():
    data = planted()["data"]
    inputs = build_inputs(data)
    m = data.interactions.matrix.toarray()
    pairs = inputs.pairs[[0, 5, 17]]
    batch = make_batch(inputs, pairs[:, 0], pairs[:, 1], inputs.pair_weights[[0, 5, 17]], SMALL,
                       np.random.default_rng(0))
    items = batch.items.numpy()
    for b, (u, target) in enumerate(pairs):
        want = m[u].copy()
        want[target] = 0.0
        want /= np.abs(want).sum()
        got = np.zeros(len(m[u]))
        got[items] = batch.history[b].numpy()
        np.testing.assert_allclose(got, want, atol=1e-6)
        assert want.min() < 0  # the disliked item weighs negative
    assert batch.target_items.tolist() == pairs[:, 1].tolist()


def test_epoch_shards_are_disjoint_and_equal():
    shards = [epoch_pairs(103, epoch=4, rank=r, world=3, seed=7) for r in range(3)]
    assert all(len(s) == 34 for s in shards)
    assert len(set(np.concatenate(shards))) == 102
    assert not np.array_equal(epoch_pairs(103, 5, 0, 3, 7), shards[0])


@pytest.mark.parametrize("bad, match", [({"loss": "hinge"}, "'hinge'"), ({"id_dropout": 1.0}, "1.0"),
                                        ({"dim": 0}, "Got 0"), ({"temperature": -1}, "-1")])
def test_bad_settings_are_refused_with_the_value(bad, match):
    with pytest.raises(ConfigError, match=match):
        TwoTowerConfig(**bad)
