"""Neighbourhood collaborative filtering: item-based (ItemKNN) and user-based (UserKNN), cosine similarity."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from common.interactions import TrainData


def _normalised_rows(m: sp.csr_matrix) -> sp.csr_matrix:
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return sp.diags(1.0 / norms) @ m


def keep_top_k(sim: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep each row's ``k`` largest entries (the neighbours), drop the rest."""
    sim = sim.tocsr()
    rows, cols, vals = [], [], []
    for r in range(sim.shape[0]):
        lo, hi = sim.indptr[r], sim.indptr[r + 1]
        if hi == lo:
            continue
        data, idx = sim.data[lo:hi], sim.indices[lo:hi]
        top = np.argsort(-data, kind="stable")[:k]
        rows.append(np.full(len(top), r))
        cols.append(idx[top])
        vals.append(data[top])
    if not rows:
        return sp.csr_matrix(sim.shape, dtype=np.float32)
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=sim.shape,
                         dtype=np.float32)


class ItemKNN:
    """score(u, i) = sum over the user's liked items j of sim(i, j), keeping each item's ``k`` nearest."""

    def __init__(self, neighbours: int = 200):
        self.neighbours = neighbours  # neighbours kept per item
        self.name = "itemknn"

    def fit(self, data: TrainData) -> ItemKNN:
        x = data.interactions.positives
        xn = _normalised_rows(x.T.tocsr())  # items x users
        sim = (xn @ xn.T).tocsr()
        sim.setdiag(0)
        sim.eliminate_zeros()
        self.sim = keep_top_k(sim, self.neighbours).T.tocsr()  # [j, i]: j's contribution to i, i keeps top-k
        self.x = x
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.asarray((self.x[users] @ self.sim).todense(), dtype=np.float32)

    def item_scores(self, items: np.ndarray) -> np.ndarray:
        """Query item rows -> [B, n_items]: the cosine of their user columns (neighbours only)."""
        return np.asarray(self.sim.T.tocsr()[items].todense(), dtype=np.float32)


class UserKNN:
    """score(u, i) = sum over the ``k`` users most similar to u (cosine) of sim(u, v) * liked(v, i)."""

    def __init__(self, neighbours: int = 50):
        self.neighbours = neighbours  # similar users kept per user
        self.name = "userknn"

    def fit(self, data: TrainData) -> UserKNN:
        self.x = data.interactions.positives
        self.xn = _normalised_rows(self.x)
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        sim = (self.xn[users] @ self.xn.T).tocsr()
        sim[np.arange(len(users)), users] = 0
        sim.eliminate_zeros()
        return np.asarray((keep_top_k(sim, self.neighbours) @ self.x).todense(), dtype=np.float32)
