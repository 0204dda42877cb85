"""The evaluation protocols, one for every recommender: what is held out, what is ranked, what is measured.

* ``user`` protocol (MovieLens, the fashion sample, any events file): a per-user temporal split; each user's
  training items are excluded from their ranking; the whole catalogue is ranked; metrics at K over users with
  held-out items, plus slices: light users (the fifth of users with the shortest training history) and
  cold items (held-out items with fewer than ``COLD_ITEM_USERS`` training users).
* ``basket`` protocol (Instacart): each user's last order is held out; its first item added to the cart is the
  query and the rest of that basket the truth; a model ranks the whole catalogue for the query item (the query
  itself excluded).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from common.interactions import Interactions, TrainData
from common.metrics import coverage, intra_list_diversity, rank_metrics
from common.recommenders.base import top_k

log = logging.getLogger(__name__)

COLD_ITEM_USERS = 5  # a held-out item liked by fewer training users than this counts as cold
LIGHT_USER_SHARE = 0.2  # the lightest fifth of users by training history forms the light-user slice
USER_BATCH = 512


@dataclass
class ModelReport:
    """One recommender's results under one protocol."""

    model: str
    metrics: dict[str, float]  # "<metric>@<K>" -> mean, plus coverage@K, diversity@K
    slices: dict[str, dict[str, float]] = field(default_factory=dict)  # slice name -> metrics at K
    fit_seconds: float = 0.0
    score_seconds: float = 0.0


def _rank_all(rec, rows: np.ndarray, k: int, exclude: sp.csr_matrix | None, scorer: str = "scores") -> np.ndarray:
    out = []
    for lo in range(0, len(rows), USER_BATCH):
        batch = rows[lo:lo + USER_BATCH]
        s = getattr(rec, scorer)(batch)
        ex = exclude[lo:lo + USER_BATCH] if exclude is not None else None
        out.append(top_k(s, k, ex))
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def _catalogue_metrics(ranked: np.ndarray, n_items: int, ks: tuple[int, ...],
                       item_vectors: np.ndarray | None) -> dict[str, float]:
    out = {f"coverage@{k}": coverage(ranked, n_items, k) for k in ks}
    if item_vectors is not None:
        out.update({f"diversity@{k}": intra_list_diversity(ranked, item_vectors, k) for k in ks if k <= 20})
    return out


def evaluate_users(rec, data: TrainData, test: Interactions, ks: tuple[int, ...]) -> ModelReport:
    """Fit on ``data``, rank the full catalogue for every user with held-out items, seen items excluded."""
    train = data.interactions
    t0 = time.perf_counter()
    rec.fit(data)
    t1 = time.perf_counter()
    truth = test.positives
    rows = np.flatnonzero(np.asarray(truth.sum(axis=1)).ravel() > 0)
    ranked = _rank_all(rec, rows, max(ks), train.seen[rows])
    t2 = time.perf_counter()
    truth_rows = truth[rows]
    metrics = rank_metrics(ranked, truth_rows, ks)
    metrics.update(_catalogue_metrics(ranked, train.n_items, ks, data.item_vectors))
    history = np.asarray(train.positives[rows].sum(axis=1)).ravel()
    light = history <= np.quantile(history, LIGHT_USER_SHARE)
    slice_ks = tuple(k for k in ks if k <= 20)
    slices = {"light_users": rank_metrics(ranked[light], truth_rows[light], slice_ks)}
    cold = train.item_popularity() < COLD_ITEM_USERS
    cold_truth = truth_rows.multiply(sp.csr_matrix(cold.astype(np.float32))).tocsr()
    cold_truth.eliminate_zeros()
    slices["cold_items"] = rank_metrics(ranked, cold_truth, slice_ks)
    return ModelReport(rec.name, metrics, slices, t1 - t0, t2 - t1)


@dataclass(frozen=True, eq=False)
class BasketQueries:
    """Item-to-item queries: ``query[q]`` (item row) with the truth ``truth[q]`` ([Q, I] sparse)."""

    query: np.ndarray
    truth: sp.csr_matrix
    users: np.ndarray  # the user row each query came from


def basket_queries(test_events: pd.DataFrame, train: Interactions) -> BasketQueries:
    """First item added to each held-out basket -> the rest of that basket (items outside the index dropped)."""
    ev = test_events.sort_values(["user_id", "order_id", "ts"], kind="stable")
    ev = ev[ev["item_id"].isin(train.item_index)]
    first = ev.groupby(["user_id", "order_id"]).head(1)
    rest = ev.drop(first.index).drop_duplicates(["user_id", "order_id", "item_id"])
    keys = pd.MultiIndex.from_frame(first[["user_id", "order_id"]])
    q_of_rest = keys.get_indexer(pd.MultiIndex.from_frame(rest[["user_id", "order_id"]]))
    cols = pd.Index(train.items).get_indexer(rest["item_id"])
    query = pd.Index(train.items).get_indexer(first["item_id"])
    truth = sp.csr_matrix((np.ones(len(rest), np.float32), (q_of_rest, cols)), shape=(len(first), train.n_items))
    truth.data[:] = 1.0
    users = pd.Index(train.users).get_indexer(first["user_id"])
    return BasketQueries(query=query, truth=truth, users=users)


def evaluate_baskets(rec, data: TrainData, queries: BasketQueries, ks: tuple[int, ...]) -> ModelReport:
    """Fit on ``data``; for each query item rank the catalogue (the query item excluded) and score the basket."""
    t0 = time.perf_counter()
    rec.fit(data)
    t1 = time.perf_counter()
    n = len(queries.query)
    exclude = sp.csr_matrix((np.ones(n, np.float32), (np.arange(n), queries.query)), shape=queries.truth.shape)
    ranked = np.concatenate([top_k(_item_scores(rec, queries, slice(lo, lo + USER_BATCH)), max(ks),
                                   exclude[lo:lo + USER_BATCH]) for lo in range(0, n, USER_BATCH)])
    t2 = time.perf_counter()
    metrics = rank_metrics(ranked, queries.truth, ks)
    metrics.update(_catalogue_metrics(ranked, data.interactions.n_items, ks, data.item_vectors))
    return ModelReport(rec.name, metrics, {}, t1 - t0, t2 - t1)


def _item_scores(rec, queries: BasketQueries, rows: slice) -> np.ndarray:
    """A personal model (``personal = True``) also learns who asks; the others see the query item only."""
    if getattr(rec, "personal", False):
        return rec.item_scores(queries.query[rows], users=queries.users[rows])
    return rec.item_scores(queries.query[rows])
