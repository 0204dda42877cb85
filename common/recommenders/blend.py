"""Blends: a weighted sum of several recommenders' per-user standardised scores, weights tuned honestly.

Scores of different models live on different scales (EASE regressions, cosine sums, dot products), so each
model's row is standardised (zero mean, unit variance over the catalogue) before the weighted sum. ``TunedBlend``
chooses the weights on a validation split carved from the TRAINING events only (the last ``holdout`` of each
user's training items), then refits every part on all training events: the test split is never looked at.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence

import numpy as np

from common.errors import ConfigError
from common.events import EventWeights
from common.interactions import TrainData, build_interactions, temporal_split

log = logging.getLogger(__name__)


def standardise(scores: np.ndarray) -> np.ndarray:
    """Row-wise (x - mean) / std; constant rows become zeros."""
    s = np.asarray(scores, np.float32)
    std = s.std(axis=1, keepdims=True)
    std[std == 0] = 1.0
    return (s - s.mean(axis=1, keepdims=True)) / std


class Blend:
    """score = sum_m w_m * standardise(score_m)."""

    def __init__(self, parts: Sequence[object], weights: Sequence[float], name: str = "blend"):
        if len(parts) != len(weights) or not parts:
            raise ConfigError(f"a blend needs one weight per part. Got {len(parts)} parts, {len(weights)} weights")
        self.parts, self.weights, self.name = list(parts), [float(w) for w in weights], name

    def fit(self, data: TrainData) -> Blend:
        for part in self.parts:
            part.fit(data)
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        total = None
        for part, w in zip(self.parts, self.weights):
            if w == 0:
                continue
            s = w * standardise(part.scores(users))
            total = s if total is None else total + s
        return total if total is not None else np.zeros((len(users), 0), np.float32)


class TunedBlend:
    """A Blend whose weights are picked by NDCG@``k`` on a validation split of the training data."""

    def __init__(self, factories: Sequence[Callable[[], object]], grid: Sequence[float] = (0.0, 0.25, 0.5, 1.0),
                 holdout: float = 0.2, k: int = 10, name: str = "blend", weights: EventWeights | None = None):
        self.factories, self.grid, self.holdout, self.k, self.name = list(factories), list(grid), holdout, k, name
        self.event_weights = weights  # how the training matrix was weighted (rebuilt the same way for validation)
        self.weights: list[float] = []

    def fit(self, data: TrainData) -> TunedBlend:
        from common.evaluation import evaluate_users

        inter = data.interactions
        inner_train, inner_val = temporal_split(data.events, self.holdout)
        train = build_interactions(inner_train, self.event_weights, inter.users, inter.items)
        val = build_interactions(inner_val, self.event_weights, inter.users, inter.items)
        inner = TrainData(train, inner_train, data.item_vectors, data.segments, data.extras)
        parts = [f() for f in self.factories]
        for p in parts:
            p.fit(inner)
        best, best_w = -1.0, None
        for w in itertools.product(self.grid, repeat=len(parts) - 1):
            weights = [1.0, *w]
            fixed = _Fitted(Blend(parts, weights))
            ndcg = evaluate_users(fixed, inner, val, (self.k,)).metrics[f"ndcg@{self.k}"]
            log.debug("blend weights %s: validation ndcg@%d %.4f", weights, self.k, ndcg)
            if ndcg > best:
                best, best_w = ndcg, weights
        self.weights, self.validation_ndcg = best_w, best
        log.info("%s: weights %s (validation ndcg@%d %.4f)", self.name, best_w, self.k, best)
        self.blend = Blend([f() for f in self.factories], best_w, self.name).fit(data)
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return self.blend.scores(users)


class _Fitted:
    """Wraps an already fitted model so evaluate_users' fit() call is a no-op."""

    def __init__(self, model: object):
        self.model, self.name = model, getattr(model, "name", "fitted")

    def fit(self, data: TrainData) -> _Fitted:
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return self.model.scores(users)
