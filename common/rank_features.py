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
