"""The recommender interface and full-catalogue top-k with seen items excluded."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from common.interactions import TrainData


@runtime_checkable
class Recommender(Protocol):
    """Fits once on training data, then scores every catalogue item for a batch of users."""

    name: str

    def fit(self, data: TrainData) -> Recommender: ...

    def scores(self, users: np.ndarray) -> np.ndarray:
        """User row indices ``[B]`` -> float32 ``[B, n_items]``; higher is better."""
        ...


def top_k(scores: np.ndarray, k: int, exclude: sp.csr_matrix | None = None) -> np.ndarray:
    """Indices of the ``k`` best items per row, best first; items set in ``exclude`` never appear.

    Ties break towards the lower item index (stable), so equal scores give a reproducible order.
    """
    scores = np.array(scores, dtype=np.float32, copy=True)
    if exclude is not None:
        rows, cols = exclude.nonzero()
        scores[rows, cols] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :min(k, scores.shape[1])]
