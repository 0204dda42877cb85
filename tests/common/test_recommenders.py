"""Baseline recommenders: known answers on tiny checkerboards, EASE against per-column ridge regressions."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from common.errors import ConfigError
from common.interactions import Interactions, TrainData
from common.recommenders import Recommender, top_k
from common.recommenders.content import ContentKNN
from common.recommenders.cooccurrence import CoOccurrence
from common.recommenders.ease import EASE
from common.recommenders.neighbours import ItemKNN, UserKNN
from common.recommenders.popularity import Popularity


def _data(matrix: np.ndarray, vectors: np.ndarray | None = None, events: pd.DataFrame | None = None,
          segments: pd.Series | None = None) -> TrainData:
    users = np.array([f"u{i}" for i in range(matrix.shape[0])], object)
    items = np.array([f"i{i}" for i in range(matrix.shape[1])], object)
    inter = Interactions(users, items, sp.csr_matrix(matrix.astype(np.float32)))
    return TrainData(inter, events if events is not None else pd.DataFrame(), vectors, segments)


def _checkerboard() -> np.ndarray:
    """Users 0-3 like items 0-3 (each misses one), users 4-7 like items 4-7 (each misses one)."""
    m = np.zeros((8, 8))
    for u in range(8):
        group = range(0, 4) if u < 4 else range(4, 8)
        for i in group:
            if i % 4 != u % 4:
                m[u, i] = 1
    return m


@pytest.mark.parametrize("model", [ItemKNN(10), UserKNN(3), EASE(1.0)], ids=lambda m: m.name)
def test_collaborative_models_recommend_the_missing_item_of_the_users_group(model):
    m = _checkerboard()
    data = _data(m)
    assert isinstance(model, Recommender)
    ranked = top_k(model.fit(data).scores(np.arange(8)), 1, exclude=data.interactions.seen)
    assert ranked[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # the one item of its own group it has not seen


def test_ease_equals_per_column_ridge_regression():
    rng = np.random.default_rng(0)
    x = (rng.random((30, 6)) < 0.4).astype(float)
    lam = 3.0
    b = EASE(lam).fit(_data(x)).b
    for j in range(6):
        others = [i for i in range(6) if i != j]
        a = x[:, others]
        coef = np.linalg.solve(a.T @ a + lam * np.eye(5), a.T @ x[:, j])
        np.testing.assert_allclose(b[others, j], coef, atol=1e-5)
        assert b[j, j] == 0


def test_ease_refuses_a_bad_penalty():
    with pytest.raises(ConfigError, match="-1"):
        EASE(-1)


def test_popularity_overall_and_by_segment():
    m = np.array([[1, 1, 0], [1, 0, 1], [0, 0, 1], [0, 0, 1]], float)
    pop = Popularity().fit(_data(m))
    assert top_k(pop.scores(np.arange(4)), 3)[0].tolist() == [2, 0, 1]
    seg = pd.Series({"u0": "a", "u1": "a", "u2": "b", "u3": "b"})
    by_seg = Popularity(by_segment=True, min_segment_users=2).fit(_data(m, segments=seg))
    ranked = top_k(by_seg.scores(np.arange(4)), 1)
    assert ranked[:, 0].tolist() == [0, 0, 2, 2]  # segment a likes item 0 most; segment b item 2


def test_content_knn_retrieves_a_cold_item_from_its_vector_alone():
    v = np.array([[1, 0], [0.99, 0.14], [0, 1], [0.1, 0.99]], np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    m = np.array([[1, 0, 0, 0], [0, 0, 1, 0]], float)  # items 1 and 3 never interacted with
    rec = ContentKNN(2).fit(_data(m, vectors=v))
    ranked = top_k(rec.scores(np.arange(2)), 1, exclude=sp.csr_matrix(m))
    assert ranked[:, 0].tolist() == [1, 3]
    assert top_k(rec.item_scores(np.array([0])), 1)[0, 0] == 1


def test_cooccurrence_ranks_what_was_bought_in_the_same_basket():
    events = pd.DataFrame({"user_id": ["u0", "u0", "u1", "u1", "u2"], "item_id": ["i0", "i1", "i0", "i1", "i2"],
                           "event": "purchase", "order_id": ["o1", "o1", "o2", "o2", "o3"],
                           "session_id": ["s1", "s1", "s2", "s2", "s3"]})
    m = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], float)
    rec = CoOccurrence().fit(_data(m, events=events))
    assert top_k(rec.item_scores(np.array([0])), 2, sp.csr_matrix(([1.0], ([0], [0])), shape=(1, 3)))[0, 0] == 1


def test_top_k_excludes_and_breaks_ties_by_item_index():
    scores = np.array([[0.5, 0.9, 0.5, 0.5]], np.float32)
    assert top_k(scores, 3).tolist() == [[1, 0, 2]]
    assert top_k(scores, 3, sp.csr_matrix(np.array([[0, 1, 0, 0]]))).tolist() == [[0, 2, 3]]


class _Noise:
    name = "noise"

    def fit(self, data):
        self.n = data.interactions.n_items
        return self

    def scores(self, users):
        return np.random.default_rng(len(users)).random((len(users), self.n)).astype(np.float32)


def test_blend_standardises_each_part_and_tuning_drops_a_useless_part():
    from common.events import validate_events
    from common.interactions import build_interactions
    from common.recommenders.blend import Blend, TunedBlend, standardise

    s = standardise(np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    np.testing.assert_allclose(s[0], [-1.2247449, 0.0, 1.2247449], rtol=1e-6)
    assert s[1].tolist() == [0.0, 0.0, 0.0]
    rng = np.random.default_rng(1)
    rows = []  # two taste groups over 40 items; each user views 12 of their group's 20 items over time
    for u in range(40):
        group = np.arange(20) if u % 2 else np.arange(20, 40)
        for t, i in enumerate(rng.choice(group, 12, replace=False)):
            rows.append((f"u{u}", f"i{i}", "view", t))
    ev = validate_events(pd.DataFrame(rows, columns=["user_id", "item_id", "event", "ts"])).valid
    data = TrainData(build_interactions(ev), ev)
    tuned = TunedBlend([lambda: ItemKNN(20), _Noise], grid=(0.0, 1.0)).fit(data)
    assert tuned.weights == [1.0, 0.0]
    fixed = Blend([ItemKNN(20), _Noise()], [1.0, 0.0]).fit(data)
    np.testing.assert_allclose(tuned.scores(np.arange(4)), fixed.scores(np.arange(4)), rtol=1e-5)
