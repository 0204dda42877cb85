"""What the reranker sees: candidates gathered from the retrieval sources, item and user context, the feature matrix.

Plain numpy + pandas, no I/O: ``jobs/train_ranker`` builds the training rows with exactly the functions that the
online reranker calls, so a weight learned offline means the same thing online. ``common.ranking`` re-exports
every public name here; import from there.

Feature conventions (``FEATURES``, all float32, never NaN):

* ``score_<source>``: the source's raw score (cosine for the vector sources, popularity in [0, 1] for
  ``popular``), except ``rules``, whose lift enters as ``log1p(lift)`` (lifts run into the tens on sparse
  baskets and would dominate a linear model's scale); 0 when the source did not propose the item;
* ``has_<source>``: 1 when the source proposed the item (so a genuine score of 0 differs from "absent");
* ``n_sources``: how many sources proposed it; ``popularity``, ``recency``: ``ItemStats``;
* ``log_price``: ``log1p(price)`` (0 when unknown); ``price_gap``: ``|log1p(price) - log1p(mean_price)|``
  (0 when either is unknown);
* ``category_affinity``, ``brand_affinity``: the user's share of positive weight on the item's category/brand;
* ``user_item_cosine``: ``profile . vector`` (0 when either is missing).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from common.errors import ConfigError
from common.events import EventWeights

#: Retrieval sources, in the order the retriever asks them.
SOURCES: tuple[str, ...] = ("item", "learned", "profile", "session", "rules", "popular", "text")
_CONTEXT_FEATURES: tuple[str, ...] = ("n_sources", "popularity", "recency", "log_price", "price_gap",
                                      "category_affinity", "brand_affinity", "user_item_cosine")
#: Every feature the reranker can use, in matrix column order (see the module docstring).
FEATURES: tuple[str, ...] = (tuple(f"score_{s}" for s in SOURCES) + tuple(f"has_{s}" for s in SOURCES)
                             + _CONTEXT_FEATURES)


def check_source(source: str) -> str:
    if source not in SOURCES:
        raise ConfigError(f"source must be one of {', '.join(SOURCES)}. Got {source!r}")
    return source


@dataclass
class Candidate:
    """One candidate item gathered by the retriever from one or more sources."""

    item_id: str
    scores: dict[str, float] = field(default_factory=dict)  # source -> raw score (max over that source's hits)
    reasons: list[dict] = field(default_factory=list)  # why each source proposed it, e.g. {"source": "rules", ...}
    fields: dict = field(default_factory=dict)  # title, category, brand, color, price, in_stock
    vector: np.ndarray | None = None  # unit content vector (for MMR and user_item_cosine); None when unknown

    def add(self, source: str, score: float, reason: dict) -> None:
        """Record one more hit: the best score per source is kept, every reason is kept."""
        check_source(source)
        score = float(score)
        if source not in self.scores or score > self.scores[source]:
            self.scores[source] = score
        self.reasons.append(dict(reason))


def merge_candidates(lists: Iterable[Iterable[Candidate]]) -> list[Candidate]:
    """The union by ``item_id`` in first-seen order: max score per source, all reasons, first known fields/vector.

    The inputs are not modified.
    """
    merged: dict[str, Candidate] = {}
    for cands in lists:
        for c in cands:
            m = merged.get(c.item_id)
            if m is None:
                merged[c.item_id] = Candidate(c.item_id, dict(c.scores), list(c.reasons), dict(c.fields), c.vector)
                continue
            for source, score in c.scores.items():
                if source not in m.scores or score > m.scores[source]:
                    m.scores[source] = float(score)
            m.reasons.extend(c.reasons)
            m.fields = {**c.fields, **m.fields}
            if m.vector is None:
                m.vector = c.vector
    return list(merged.values())


@dataclass(frozen=True)
class ItemStats:
    """Per-item statistics from the event log (items without events are absent: 0 for both)."""

    popularity: Mapping[str, float]  # log1p(weighted positive events) / max over items, in [0, 1]
    recency: Mapping[str, float]  # share of the item's events within the last window_days of the log, in [0, 1]

    @classmethod
    def from_events(cls, events: pd.DataFrame, weights: EventWeights | None = None,
                    window_days: float = 7.0) -> ItemStats:
        """From validated events (``common.events`` schema); the window ends at the log's latest event."""
        if not window_days > 0:
            raise ConfigError(f"window_days must be > 0. Got {window_days!r}")
        if events.empty:
            return cls(popularity={}, recency={})
        w = (weights or EventWeights()).weigh(events).astype(np.float64)
        frame = pd.DataFrame({"item_id": events["item_id"].to_numpy(), "pos": np.where(w > 0, w, 0.0),
                              "recent": (events["ts"] > events["ts"].max()
                                         - pd.Timedelta(days=window_days)).to_numpy()})
        by_item = frame.groupby("item_id", sort=True).agg(pos=("pos", "sum"), recent=("recent", "mean"))
        pop = np.log1p(by_item["pos"].to_numpy())
        top = pop.max()
        pop = pop / top if top > 0 else np.zeros_like(pop)
        ids = by_item.index.to_numpy()
        return cls(popularity=dict(zip(ids, pop.astype(float))),
                   recency=dict(zip(ids, by_item["recent"].to_numpy(float))))

    def only(self, items: Iterable[str]) -> ItemStats:
        """The statistics of ``items`` alone (what one request's candidates need, to send with them)."""
        wanted = set(items)
        return ItemStats(popularity={i: self.popularity[i] for i in wanted if i in self.popularity},
                         recency={i: self.recency[i] for i in wanted if i in self.recency})


@dataclass(frozen=True)
class UserContext:
    """What the ranker knows about the requesting user (all empty for an unknown user)."""

    category_affinity: Mapping[str, float] = field(default_factory=dict)  # category -> share of positive weight
    brand_affinity: Mapping[str, float] = field(default_factory=dict)  # brand -> share of positive weight
    mean_price: float | None = None  # weighted mean price of the items of the user's positive events
    profile: np.ndarray | None = None  # the user's unit vector in the content (fused) space, if any


def _shares(keys: pd.Series, w: np.ndarray) -> dict[str, float]:
    known = keys.notna().to_numpy() & (keys.astype("string").fillna("") != "").to_numpy()
    if not known.any():
        return {}
    sums = pd.Series(w[known]).groupby(keys[known].astype(str).to_numpy()).sum()
    return (sums / w.sum()).astype(float).to_dict()


def user_context(user_events: pd.DataFrame, item_fields: Mapping[str, Mapping], profile: np.ndarray | None = None,
                 weights: EventWeights | None = None) -> UserContext:
    """One user's context from their events (``common.events`` schema) and the catalogue's fields per item.

    Only positively weighted events count; shares are of the total positive weight (events on items without
    a category or brand count in the denominator, so shares can sum below 1). Empty events -> empty context.
    """
    if user_events.empty:
        return UserContext(profile=profile)
    w = (weights or EventWeights()).weigh(user_events).astype(np.float64)
    pos = w > 0
    if not pos.any():
        return UserContext(profile=profile)
    ids = user_events["item_id"].to_numpy()[pos]
    w = w[pos]
    f = [item_fields.get(i) or {} for i in ids]
    category = pd.Series([x.get("category") for x in f], dtype=object)
    brand = pd.Series([x.get("brand") for x in f], dtype=object)
    price = pd.to_numeric(pd.Series([x.get("price") for x in f], dtype=object), errors="coerce").to_numpy(float)
    priced = np.isfinite(price) & (price >= 0)
    mean_price = float(np.average(price[priced], weights=w[priced])) if priced.any() else None
    return UserContext(category_affinity=_shares(category, w), brand_affinity=_shares(brand, w),
                       mean_price=mean_price, profile=profile)


def _price(value: object) -> float | None:
    try:
        p = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return p if np.isfinite(p) and p >= 0 else None


def _key(value: object) -> str | None:
    """A category or brand as ``_shares`` groups it (its text); None when missing or empty, so not a key."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return None
    return str(value) or None


@dataclass(frozen=True)
class AffinitySums:
    """A user's positive event weight summed by category, by brand, in all and over priced items.

    These sums are what ``user_context`` derives its shares and mean price from. Kept as sums (not shares) so
    serving can add a live session's views per request (``plus``) instead of re-grouping the user's whole
    history with pandas; ``context`` turns them into the same ``UserContext``. The empty default is a user
    without positive events.
    """

    category: Mapping[str, float] = field(default_factory=dict)  # category -> positive weight on its items
    brand: Mapping[str, float] = field(default_factory=dict)  # brand -> positive weight on its items
    total: float = 0.0  # all positive weight, items without category/brand/price included (the shares' divisor)
    priced_weight: float = 0.0  # positive weight on items with a usable price (finite, >= 0)
    priced_sum: float = 0.0  # price * weight summed over those items

    def plus(self, item_ids: Iterable[str], item_fields: Mapping[str, Mapping], weight: float) -> AffinitySums:
        """New sums with one event of ``weight`` per listed id (a repeated id counts each time), as a frame of
        those events would count in ``user_context``: not at all when ``weight`` <= 0."""
        w = float(np.float32(weight))  # weigh() hands out float32 weights
        ids = list(item_ids)
        if not w > 0 or not ids:
            return self
        category, brand = dict(self.category), dict(self.brand)
        priced_weight, priced_sum = self.priced_weight, self.priced_sum
        for item in ids:
            f = item_fields.get(item) or {}
            for sums, key in ((category, _key(f.get("category"))), (brand, _key(f.get("brand")))):
                if key is not None:
                    sums[key] = sums.get(key, 0.0) + w
            price = _price(f.get("price"))
            if price is not None:
                priced_weight += w
                priced_sum += price * w
        return AffinitySums(category, brand, self.total + w * len(ids), priced_weight, priced_sum)

    def context(self, profile: np.ndarray | None = None) -> UserContext:
        """The ``UserContext`` that ``user_context`` gives for the events these sums were made from."""
        if not self.total > 0:
            return UserContext(profile=profile)
        return UserContext(category_affinity={k: v / self.total for k, v in self.category.items()},
                           brand_affinity={k: v / self.total for k, v in self.brand.items()},
                           mean_price=self.priced_sum / self.priced_weight if self.priced_weight > 0 else None,
                           profile=profile)


def _item_keys(items: Sequence, item_fields: Mapping[str, Mapping]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per item: category and brand key (None: not a key) and price (NaN: unusable), as object/float arrays.

    One row more than ``items``, an item without fields, so the code -1 that ``pd.factorize`` gives a missing
    item id indexes it.
    """
    f = [item_fields.get(i) or {} for i in items] + [{}]
    price = np.array([np.nan if (p := _price(x.get("price"))) is None else p for x in f], dtype=np.float64)
    return (np.array([_key(x.get("category")) for x in f], dtype=object),
            np.array([_key(x.get("brand")) for x in f], dtype=object), price)


def _keyed_sums(user: np.ndarray, keys: np.ndarray, w: np.ndarray, n_users: int) -> list[dict[str, float]]:
    """Per user, ``key -> summed w`` over the rows whose key is not None (one sort, no Python loop over rows)."""
    code, names = pd.factorize(keys, sort=True)
    known = code >= 0
    width = max(len(names), 1)
    pair, inverse = np.unique(user[known] * width + code[known], return_inverse=True)
    sums = np.bincount(inverse, weights=w[known])
    out: list[dict[str, float]] = [{} for _ in range(n_users)]
    for u, key, s in zip((pair // width).tolist(), np.asarray(names, dtype=object)[pair % width], sums.tolist()):
        out[u][key] = s
    return out


def affinity_sums(events: pd.DataFrame, item_fields: Mapping[str, Mapping],
                  weights: EventWeights | None = None) -> dict[str, AffinitySums]:
    """``AffinitySums`` of every user of validated events (``common.events`` schema), vectorised over the frame.

    ``affinity_sums(events, fields)[u].context(profile)`` equals ``user_context(<u's events>, fields, profile)``
    (up to float summation order); users whose events are all non-positive get empty sums. Serving computes
    every known user once at start-up rather than running ``user_context`` per request.
    """
    if events.empty:
        return {}
    w = (weights or EventWeights()).weigh(events).astype(np.float64)
    user, users = pd.factorize(events["user_id"])
    item, items = pd.factorize(events["item_id"])
    pos = (w > 0) & (user >= 0)
    user, item, w = user[pos].astype(np.int64), item[pos], w[pos]
    category, brand, price = _item_keys(items.tolist(), item_fields)
    n = len(users)
    by_category = _keyed_sums(user, category[item], w, n)
    by_brand = _keyed_sums(user, brand[item], w, n)
    p = price[item]
    priced = ~np.isnan(p)
    total = np.bincount(user, weights=w, minlength=n).tolist()
    priced_weight = np.bincount(user[priced], weights=w[priced], minlength=n).tolist()
    priced_sum = np.bincount(user[priced], weights=p[priced] * w[priced], minlength=n).tolist()
    return {u: AffinitySums(by_category[i], by_brand[i], total[i], priced_weight[i], priced_sum[i])
            for i, u in enumerate(users.tolist())}


def _columns(cands: Sequence[Candidate], ctx: UserContext, stats: ItemStats) -> dict[str, list[float]]:
    """Every feature of FEATURES as one list per name (one value per candidate)."""
    cols: dict[str, list[float]] = {}
    for s in SOURCES:
        raw = [c.scores.get(s) for c in cands]
        cols[f"has_{s}"] = [0.0 if v is None else 1.0 for v in raw]
        if s == "rules":
            cols[f"score_{s}"] = [0.0 if v is None else float(np.log1p(max(v, 0.0))) for v in raw]
        else:
            cols[f"score_{s}"] = [0.0 if v is None else float(v) for v in raw]
    cols["n_sources"] = [float(len(c.scores)) for c in cands]
    cols["popularity"] = [stats.popularity.get(c.item_id, 0.0) for c in cands]
    cols["recency"] = [stats.recency.get(c.item_id, 0.0) for c in cands]
    prices = [_price(c.fields.get("price")) for c in cands]
    cols["log_price"] = [0.0 if p is None else float(np.log1p(p)) for p in prices]
    mean = None if ctx.mean_price is None else float(np.log1p(ctx.mean_price))
    cols["price_gap"] = [0.0 if p is None or mean is None else abs(float(np.log1p(p)) - mean) for p in prices]
    cols["category_affinity"] = [ctx.category_affinity.get(c.fields.get("category"), 0.0) for c in cands]
    cols["brand_affinity"] = [ctx.brand_affinity.get(c.fields.get("brand"), 0.0) for c in cands]
    profile = None if ctx.profile is None else np.asarray(ctx.profile, dtype=np.float32).ravel()
    cols["user_item_cosine"] = [0.0 if profile is None or c.vector is None
                                else float(np.dot(profile, np.asarray(c.vector, dtype=np.float32).ravel()))
                                for c in cands]
    return cols


def feature_matrix(cands: Sequence[Candidate], ctx: UserContext, stats: ItemStats,
                   features: Sequence[str] = FEATURES) -> np.ndarray:
    """float32 ``[len(cands), len(features)]`` in the order of ``features`` (names from FEATURES), no NaN."""
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise ConfigError(f"unknown ranking feature(s) {unknown}; valid: {', '.join(FEATURES)}")
    if not cands:
        return np.zeros((0, len(features)), dtype=np.float32)
    cols = _columns(cands, ctx, stats)
    x = np.column_stack([np.asarray(cols[f], dtype=np.float64) for f in features]) if features \
        else np.zeros((len(cands), 0))
    return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def stack_vectors(cands: Sequence[Candidate]) -> np.ndarray | None:
    """``[n, D]`` float32 vectors of the candidates for ``mmr`` (zero rows where unknown); None when none has one."""
    known = [c.vector for c in cands if c.vector is not None]
    if not known:
        return None
    dim = np.asarray(known[0]).size
    out = np.zeros((len(cands), dim), dtype=np.float32)
    for row, c in enumerate(cands):
        if c.vector is not None:
            out[row] = np.asarray(c.vector, dtype=np.float32).ravel()
    return out
