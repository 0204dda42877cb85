"""What the offline events say about each user, held in memory for serving: seen items, latest items, segment,
and popularity overall and per segment (the fallback for users with nothing)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import pandas as pd

from common.events import EventWeights, age_group, user_segments

OVERALL = ""  # the segment key of overall popularity


def segment_of(age: object = None, region: object = None) -> str | None:
    """The segment label of request-time user features (None when neither is given)."""
    if age is None and region is None:
        return None
    return f"{age_group(age) if age is not None else 'unknown'}|{region if region else 'unknown'}"


@dataclass(frozen=True)
class UserHistory:
    """Per-user state from the events file; empty when the service starts without one."""

    seen: Mapping[str, frozenset[str]] = field(default_factory=dict)  # every item the user interacted with
    recent: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # positive items, newest first (bounded)
    segments: Mapping[str, str] = field(default_factory=dict)  # user -> "age_group|region"
    popular: Mapping[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)  # segment -> (item, score)

    @classmethod
    def from_events(cls, events: pd.DataFrame, users: pd.DataFrame | None = None, weights: EventWeights | None = None,
                    recent: int = 20, top: int = 1000, min_segment_users: int = 20) -> UserHistory:
        """``events`` validated (common.events); ``users`` with optional ``age``/``region`` for segments."""
        if events.empty:
            return cls()
        weights = weights or EventWeights()
        ev = events.assign(w=weights.weigh(events)).sort_values("ts", kind="stable")
        seen = {u: frozenset(g) for u, g in ev.groupby("user_id", sort=False)["item_id"]}
        pos = ev[ev["w"] > 0]
        latest = pos.drop_duplicates(["user_id", "item_id"], keep="last")
        newest = {u: tuple(g.iloc[::-1][:recent]) for u, g in latest.groupby("user_id", sort=False)["item_id"]}
        segments = user_segments(users).to_dict() if users is not None and len(users) else {}
        liked = pos.drop_duplicates(["user_id", "item_id"])  # popularity = users who liked the item
        popular = {OVERALL: _top(liked["item_id"], top)}
        if segments:
            seg = liked["user_id"].map(segments)
            sizes = pd.Series(segments).value_counts()
            for label, group in liked.groupby(seg):
                if sizes.get(label, 0) >= min_segment_users:
                    popular[str(label)] = _top(group["item_id"], top)
        return cls(seen=MappingProxyType(seen), recent=MappingProxyType(newest),
                   segments=MappingProxyType(segments), popular=MappingProxyType(popular))

    def knows(self, user_id: str) -> bool:
        return user_id in self.seen

    def popular_for(self, segment: str | None) -> tuple[tuple[str, float], ...]:
        """Popular items in ``segment`` (overall when the segment is unknown or too small)."""
        return self.popular.get(segment or OVERALL) or self.popular.get(OVERALL, ())


def _top(items: pd.Series, top: int) -> tuple[tuple[str, float], ...]:
    counts = items.value_counts()
    counts = counts.iloc[np.lexsort((counts.index.to_numpy(dtype=str), -counts.to_numpy()))][:top]
    peak = float(counts.iloc[0]) if len(counts) else 1.0
    return tuple((str(i), float(c) / peak) for i, c in counts.items())
