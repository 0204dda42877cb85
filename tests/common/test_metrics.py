"""Vectorised ranking metrics equal a plain per-user loop (oracle), and known small cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from common.metrics import coverage, hits_matrix, intra_list_diversity, rank_metrics


def _loop(ranked: np.ndarray, truth: list[set[int]], k: int) -> dict[str, float]:
    sums = {"precision": 0.0, "recall": 0.0, "ndcg": 0.0, "hit_rate": 0.0, "map": 0.0}
    n = 0
    for row, rel in zip(ranked, truth):
        if not rel:
            continue
        n += 1
        top = list(row[:k])
        hits = [1.0 if i in rel else 0.0 for i in top]
        sums["precision"] += sum(hits) / k
        sums["recall"] += sum(hits) / len(rel)
        sums["hit_rate"] += 1.0 if any(hits) else 0.0
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(rel), k)))
        sums["ndcg"] += dcg / idcg
        ap, found = 0.0, 0
        for r, h in enumerate(hits):
            if h:
                found += 1
                ap += found / (r + 1)
        sums["map"] += ap / min(len(rel), k)
    return {m: v / n for m, v in sums.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_metrics_equal_a_plain_loop(seed):
    rng = np.random.default_rng(seed)
    users, items, depth = 40, 60, 25
    ranked = np.stack([rng.permutation(items)[:depth] for _ in range(users)])
    truth = [set(rng.choice(items, size=rng.integers(0, 12), replace=False).tolist()) for _ in range(users)]
    rows = [u for u, t in enumerate(truth) for _ in t]
    cols = [i for t in truth for i in t]
    m = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(users, items))
    got = rank_metrics(ranked, m, (1, 5, 10, 25))
    assert got["users"] == sum(1 for t in truth if t)
    for k in (1, 5, 10, 25):
        want = _loop(ranked, truth, k)
        for name, value in want.items():
            assert got[f"{name}@{k}"] == pytest.approx(value, abs=1e-12), (name, k)


def test_a_perfect_ranking_scores_one_and_a_useless_one_zero():
    truth = sp.csr_matrix(np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=float))
    perfect = np.array([[0, 1, 2, 3, 4], [4, 0, 1, 2, 3]])
    useless = np.array([[2, 3, 4, 0, 1], [0, 1, 2, 3, 4]])
    m = rank_metrics(perfect, truth, (2,))
    assert m["ndcg@2"] == 1.0 and m["recall@2"] == 1.0 and m["map@2"] == 1.0 and m["precision@2"] == 0.75
    u = rank_metrics(useless, truth, (2,))
    assert u["ndcg@2"] == 0.0 and u["hit_rate@2"] == 0.0


def test_hits_matrix_marks_exactly_the_relevant_positions():
    truth = sp.csr_matrix(np.array([[0, 1, 0], [1, 0, 1]], dtype=float))
    assert hits_matrix(np.array([[1, 0], [2, 1]]), truth).tolist() == [[True, False], [True, False]]


def test_coverage_and_diversity():
    ranked = np.array([[0, 1], [0, 2]])
    assert coverage(ranked, n_items=4, k=2) == 0.75
    v = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=np.float32)
    assert intra_list_diversity(ranked, v, 2) == pytest.approx(0.5)  # list 1 orthogonal (1), list 2 identical (0)


def test_k_beyond_the_ranked_depth_is_refused():
    with pytest.raises(ValueError, match="k=5"):
        rank_metrics(np.zeros((1, 3), int), sp.csr_matrix(np.ones((1, 3))), (5,))


def test_no_user_with_truth_gives_undefined_metrics_not_zero():
    m = rank_metrics(np.array([[0, 1]]), sp.csr_matrix((1, 2)), (1,))
    assert m["users"] == 0 and math.isnan(m["ndcg@1"])
