"""EASE (Steck 2019): a closed-form item-item linear model, B = I - P / diag(P), P = (X'X + lambda I)^-1."""
from __future__ import annotations

import numpy as np

from common.errors import ConfigError
from common.interactions import TrainData

MAX_ITEMS = 20_000  # the dense item x item inverse: 20k items take 1.6 GB in float32


class EASE:
    """Shallow autoencoder with a zero diagonal; strong on dense implicit data such as MovieLens."""

    def __init__(self, l2: float = 250.0):
        if l2 <= 0:
            raise ConfigError(f"EASE l2 must be positive. Got {l2}")
        self.l2 = l2  # ridge penalty lambda
        self.name = "ease"

    def fit(self, data: TrainData) -> EASE:
        x = data.interactions.positives
        if x.shape[1] > MAX_ITEMS:
            raise ConfigError(f"EASE inverts a dense {x.shape[1]}x{x.shape[1]} matrix; more than {MAX_ITEMS} items "
                              "does not fit here: prune rare items first")
        g = (x.T @ x).toarray().astype(np.float64)
        g[np.diag_indices_from(g)] += self.l2
        p = np.linalg.inv(g)
        b = -p / np.diag(p)
        b[np.diag_indices_from(b)] = 0.0
        self.b = b.astype(np.float32)
        self.x = x
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.asarray(self.x[users] @ self.b, dtype=np.float32)
