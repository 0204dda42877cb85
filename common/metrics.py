"""Ranking metrics at K, vectorised over users (tests check them against a plain per-user loop).

Conventions (the standard ones; see the issue's protocol):
* ``precision@K`` = hits in the top K / K;  ``recall@K`` = hits / |truth|;  ``hit_rate@K`` = 1 if any hit;
* ``ndcg@K`` = DCG / IDCG with binary gains, DCG = sum_r hit_r / log2(r + 2) (r from 0), and the ideal DCG of
  ``min(|truth|, K)`` hits at the top;
* ``map@K`` = sum_r precision@(r+1) * hit_r / min(|truth|, K);
* users without truth are not evaluated; every metric is a mean over the evaluated users.
Catalogue-level: ``coverage@K`` = distinct items recommended / catalogue size; ``diversity@K`` = mean pairwise
``1 - cos`` within each list (intra-list diversity), when item vectors exist.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

RANK_METRICS = ("precision", "recall", "ndcg", "hit_rate", "map")


def hits_matrix(ranked: np.ndarray, truth: sp.csr_matrix) -> np.ndarray:
    """``hits[u, r]`` = True when ``ranked[u, r]`` is in row ``u`` of ``truth`` ([U, I] sparse, nonzero = relevant)."""
    truth = truth.tocsr()
    n_items = truth.shape[1]
    rows, cols = truth.nonzero()
    keys = np.sort(rows.astype(np.int64) * n_items + cols)
    probe = np.arange(len(ranked), dtype=np.int64)[:, None] * n_items + ranked.astype(np.int64)
    pos = np.searchsorted(keys, probe)
    pos[pos == len(keys)] = 0
    return keys[pos] == probe if len(keys) else np.zeros(ranked.shape, bool)


def rank_metrics(ranked: np.ndarray, truth: sp.csr_matrix, ks: tuple[int, ...]) -> dict[str, float]:
    """Mean precision, recall, ndcg, hit_rate and map at each K in ``ks`` (``ranked``: [U, >=max(ks)] indices)."""
    n_true = np.asarray((truth != 0).sum(axis=1)).ravel()
    users = n_true > 0
    hits = hits_matrix(ranked, truth)[users].astype(np.float64)
    n_true = n_true[users].astype(np.float64)
    out: dict[str, float] = {"users": float(users.sum())}
    if not users.any():  # nothing held out (e.g. an empty slice): every metric undefined
        return out | {f"{m}@{k}": float("nan") for k in ks for m in RANK_METRICS}
    discount = 1.0 / np.log2(np.arange(hits.shape[1]) + 2.0)
    ideal = np.concatenate([[0.0], np.cumsum(discount)])
    for k in ks:
        if k > hits.shape[1]:
            raise ValueError(f"k={k} exceeds the {hits.shape[1]} ranked items per user")
        h = hits[:, :k]
        n_hits = h.sum(1)
        out[f"precision@{k}"] = float(np.mean(n_hits / k))
        out[f"recall@{k}"] = float(np.mean(n_hits / n_true))
        out[f"hit_rate@{k}"] = float(np.mean(n_hits > 0))
        out[f"ndcg@{k}"] = float(np.mean((h * discount[:k]).sum(1) / ideal[np.minimum(n_true, k).astype(int)]))
        prec_at_r = np.cumsum(h, 1) / np.arange(1, k + 1)
        out[f"map@{k}"] = float(np.mean((prec_at_r * h).sum(1) / np.minimum(n_true, k)))
    return out


def coverage(ranked: np.ndarray, n_items: int, k: int) -> float:
    """Share of the catalogue that appears in at least one top-K list."""
    return float(len(np.unique(ranked[:, :k])) / n_items) if n_items else 0.0


def intra_list_diversity(ranked: np.ndarray, item_vectors: np.ndarray, k: int) -> float:
    """Mean over lists of the mean pairwise cosine distance among their top-K items (unit vectors)."""
    if k < 2:
        return 0.0
    v = item_vectors[ranked[:, :k]]  # [U, k, D]
    sims = np.einsum("ukd,ujd->ukj", v, v)
    off = (sims.sum((1, 2)) - np.einsum("ukk->u", sims)) / (k * (k - 1))
    return float(np.mean(1.0 - off))
