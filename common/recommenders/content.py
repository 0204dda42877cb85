"""Content similarity: item-to-item neighbours by the cosine of content vectors (no interaction learning)."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from common.errors import ConfigError
from common.interactions import TrainData

_CHUNK = 2048  # rows of the item x item similarity computed at a time


class ContentKNN:
    """score(u, i) = sum over the user's liked items j of cos(v_i, v_j), each item keeping its ``k`` nearest."""

    def __init__(self, neighbours: int = 100):
        self.neighbours = neighbours  # content neighbours kept per item
        self.name = "content"

    def fit(self, data: TrainData) -> ContentKNN:
        if data.item_vectors is None:
            raise ConfigError("the content recommender needs item vectors (TrainData.item_vectors)")
        v = np.asarray(data.item_vectors, np.float32)
        n, k = len(v), min(self.neighbours, len(v) - 1)
        rows, cols, vals = [], [], []
        for lo in range(0, n, _CHUNK):
            sim = v[lo:lo + _CHUNK] @ v.T
            sim[np.arange(len(sim)), np.arange(lo, lo + len(sim))] = -np.inf  # not its own neighbour
            top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            rows.append(np.repeat(np.arange(lo, lo + len(sim)), k))
            cols.append(top.ravel())
            vals.append(np.take_along_axis(sim, top, 1).ravel())
        self.sim = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                 shape=(n, n), dtype=np.float32)
        self.x = data.interactions.positives
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.asarray((self.x[users] @ self.sim).todense(), dtype=np.float32)

    def item_scores(self, items: np.ndarray) -> np.ndarray:
        """Query item rows -> [B, n_items] similarity (the 'similar items' use)."""
        return np.asarray(self.sim[items].todense(), dtype=np.float32)
