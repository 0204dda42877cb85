"""The user x item interaction matrix that every recommender fits on, and the evaluation splits.

``Interactions`` indexes users and items once (string ids, in a fixed order) and holds a sparse matrix of summed
event weights (see ``common.events.EventWeights``; negative sums mean the shopper disliked or returned the item).
``TrainData`` bundles it with what some recommenders also read: the raw training events (sessions, order),
item content vectors aligned to the item index, and user segments.

Splits (one protocol for every recommender, see jobs/evaluate):
* ``temporal_split``: per user, events in time order; the last ``holdout`` share of each user's distinct items
  is the test set (the source projects' 50% and 20% holdouts are options);
* ``last_basket_split``: each user's last order is held out (Instacart protocol); earlier orders train.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
import scipy.sparse as sp

from common.errors import ConfigError
from common.events import EventWeights


@dataclass(frozen=True, eq=False)
class Interactions:
    """``matrix[u, i]``: summed event weight of user ``users[u]`` on item ``items[i]`` (float32 CSR)."""

    users: np.ndarray  # [U] str user ids, in index order
    items: np.ndarray  # [I] str item ids, in index order: the full catalogue being ranked
    matrix: sp.csr_matrix  # [U, I] float32

    def __post_init__(self) -> None:
        if self.matrix.shape != (len(self.users), len(self.items)):
            raise ValueError(f"matrix shape {self.matrix.shape} != ({len(self.users)}, {len(self.items)})")

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @cached_property
    def user_index(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.users)}

    @cached_property
    def item_index(self) -> dict[str, int]:
        return {it: i for i, it in enumerate(self.items)}

    @cached_property
    def positives(self) -> sp.csr_matrix:
        """1 where the summed weight is positive (liked), else absent: what ranking metrics and CF count."""
        m = (self.matrix > 0).astype(np.float32).tocsr()
        m.eliminate_zeros()
        return m

    @cached_property
    def seen(self) -> sp.csr_matrix:
        """1 wherever the user interacted at all (liked or not): excluded from that user's rankings."""
        m = self.matrix.copy()
        m.data = np.ones_like(m.data)
        return m.tocsr()

    def item_popularity(self) -> np.ndarray:
        """Users with a positive interaction per item, [I] float32."""
        return np.asarray(self.positives.sum(axis=0)).ravel().astype(np.float32)


def build_interactions(events: pd.DataFrame, weights: EventWeights | None = None,
                       users: np.ndarray | None = None, items: np.ndarray | None = None) -> Interactions:
    """Events -> Interactions; ``users``/``items`` fix the index (rows with ids outside it are dropped)."""
    weights = weights or EventWeights()
    users = np.asarray(sorted(events["user_id"].unique()) if users is None else users, dtype=object)
    items = np.asarray(sorted(events["item_id"].unique()) if items is None else items, dtype=object)
    u = pd.Index(users).get_indexer(events["user_id"])
    i = pd.Index(items).get_indexer(events["item_id"])
    keep = (u >= 0) & (i >= 0)
    w = weights.weigh(events)[keep]
    m = sp.csr_matrix((w, (u[keep], i[keep])), shape=(len(users), len(items)), dtype=np.float32)
    m.sum_duplicates()
    return Interactions(users=users, items=items, matrix=m)


@dataclass(frozen=True, eq=False)
class TrainData:
    """What a recommender may learn from: the matrix, the events behind it, and optional side information."""

    interactions: Interactions
    events: pd.DataFrame  # the training events (EVENTS_SCHEMA), sorted by user and time
    item_vectors: np.ndarray | None = None  # [I, D] L2-normalised content vectors aligned to interactions.items
    segments: pd.Series | None = None  # user_id -> segment label (age group | region), when user features exist
    extras: dict = field(default_factory=dict)  # named side inputs (e.g. item metadata) for specific models


def temporal_split(events: pd.DataFrame, holdout: float = 0.2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per user, the last ``holdout`` share of distinct items (by first interaction time) becomes the test set.

    A user with ``n`` distinct items keeps ``round(n * (1 - holdout))`` in training (at least 1); all events on a
    test item (and only those) move to test. Ties in time keep file order (stable sort).
    """
    if not 0 < holdout < 1:
        raise ConfigError(f"holdout must be within (0, 1). Got {holdout}")
    ev = events.sort_values(["user_id", "ts"], kind="stable")
    first = ev.drop_duplicates(["user_id", "item_id"])
    rank = first.groupby("user_id").cumcount()
    n = first.groupby("user_id")["item_id"].transform("size")
    n_train = np.maximum(1, np.round(n * (1 - holdout)).astype(int))
    test_pairs = first.loc[rank >= n_train, ["user_id", "item_id"]]
    key = pd.MultiIndex.from_frame(ev[["user_id", "item_id"]])
    is_test = key.isin(pd.MultiIndex.from_frame(test_pairs))
    return ev[~is_test].reset_index(drop=True), ev[is_test].reset_index(drop=True)


def last_basket_split(events: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each user's last order (latest ``ts``, then the larger ``order_id``) is the test set; earlier ones train."""
    orders = events.dropna(subset=["order_id"])
    if orders.empty:
        raise ConfigError("last_basket_split needs events with an order_id")
    last = (orders.groupby(["user_id", "order_id"])["ts"].max().reset_index()
            .sort_values(["user_id", "ts", "order_id"], kind="stable").groupby("user_id").tail(1))
    key = pd.MultiIndex.from_frame(events[["user_id", "order_id"]].astype(object))
    is_test = key.isin(pd.MultiIndex.from_frame(last[["user_id", "order_id"]].astype(object)))
    return events[~is_test].reset_index(drop=True), events[is_test].reset_index(drop=True)
