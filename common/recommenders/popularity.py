"""Most popular items, overall or within the user's segment (age group | region) when user features exist."""
from __future__ import annotations

import numpy as np

from common.interactions import TrainData


class Popularity:
    """Score = users who liked the item (in the user's segment when ``by_segment`` and segments are known)."""

    def __init__(self, by_segment: bool = False, min_segment_users: int = 20):
        self.by_segment = by_segment  # rank by the user's segment's popularity (falls back to overall)
        self.min_segment_users = min_segment_users  # smaller segments use the overall ranking
        self.name = "popularity-segment" if by_segment else "popularity"

    def fit(self, data: TrainData) -> Popularity:
        inter = data.interactions
        self.overall = inter.item_popularity()
        self.user_rows = np.zeros(inter.n_users, dtype=np.int64)  # row of self.table per user
        self.table = self.overall[None, :]
        if self.by_segment and data.segments is not None:
            seg = data.segments.reindex(inter.users).fillna("unknown").to_numpy()
            labels, codes = np.unique(seg, return_inverse=True)
            rows = [self.overall]
            for s in range(len(labels)):
                members = np.flatnonzero(codes == s)
                if len(members) >= self.min_segment_users:
                    counts = np.asarray(inter.positives[members].sum(axis=0)).ravel()
                    rows.append(counts + self.overall / (self.overall.max() + 1))  # overall breaks ties
                    self.user_rows[members] = len(rows) - 1
            self.table = np.stack(rows).astype(np.float32)
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return self.table[self.user_rows[users]]

    def item_scores(self, items: np.ndarray) -> np.ndarray:
        """The same overall ranking whatever the query item (the baseline every item query must beat)."""
        return np.tile(self.overall, (len(items), 1))
