"""Item co-occurrence in baskets (orders, else sessions): "customers who bought this also bought"."""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from common.interactions import TrainData

POSITIVE_EVENTS = ("add_to_bag", "purchase", "wishlist", "rating")


def basket_matrix(events: pd.DataFrame, items: np.ndarray) -> sp.csr_matrix:
    """Baskets x items (1 = in basket): orders where events have an order_id, else sessions of positive events."""
    positive = events[events["event"].isin(POSITIVE_EVENTS)] if "event" in events else events
    key = positive["order_id"].where(positive["order_id"].notna(), "s:" + positive["session_id"].astype(str))
    baskets, b = np.unique(key.astype(str).to_numpy(), return_inverse=True)
    i = pd.Index(items).get_indexer(positive["item_id"])
    keep = i >= 0
    m = sp.csr_matrix((np.ones(keep.sum(), np.float32), (b[keep], i[keep])), shape=(len(baskets), len(items)))
    m.data[:] = 1.0  # duplicates summed by the constructor count once
    return m


class CoOccurrence:
    """score(query, i) = baskets holding both; popularity breaks ties (and answers for items never co-bought)."""

    def __init__(self) -> None:
        self.name = "cooccurrence"

    def fit(self, data: TrainData) -> CoOccurrence:
        inter = data.interactions
        b = basket_matrix(data.events, inter.items)
        b.sum_duplicates()
        b.data[:] = 1.0
        self.c = (b.T @ b).tocsr()
        self.c.setdiag(0)
        self.c.eliminate_zeros()
        pop = np.asarray(b.sum(axis=0)).ravel()
        self.tiebreak = (pop / (pop.max() + 1)).astype(np.float32)
        self.x = inter.positives
        return self

    def item_scores(self, items: np.ndarray) -> np.ndarray:
        return np.asarray(self.c[items].todense(), dtype=np.float32) + self.tiebreak

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.asarray((self.x[users] @ self.c).todense(), dtype=np.float32) + self.tiebreak
