"""A bounded, thread-safe cache of rows by id whose entries expire after a fixed time (``cachetools.TTLCache``).

Serving reads the same rows again and again within seconds: the fields of the popular items every personal
request proposes, and a returning shopper's offline vectors (profile, two-tower, GraphSAGE), which change only
when a batch job republishes them. Each read is a Milvus round trip whose decoding costs the replica more CPU
than anything it computes. The cache trades that for a bounded staleness: an entry is at most ``ttl_s`` old.
Misses are remembered too (``None``), so a user without a profile is not looked up on every request.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from cachetools import TTLCache

from common.errors import ConfigError

_ABSENT = object()


class TtlRows:
    """``get_many(ids, fetch)``: cached rows for ``ids``, calling ``fetch(missing_ids) -> {id: row}`` once for the
    ids not cached (or expired); ids ``fetch`` does not return are cached as ``None``. ``ttl_s == 0`` disables
    caching (every call fetches)."""

    def __init__(self, ttl_s: float, max_entries: int = 100_000, timer: Callable[[], float] = time.monotonic) -> None:
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not 0 <= ttl_s <= 86_400:
            raise ConfigError(f"cache ttl_s must be a number of seconds in [0, 86400]. Got {ttl_s!r}")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigError(f"cache max_entries must be an integer >= 1. Got {max_entries!r}")
        self.ttl_s = float(ttl_s)
        self._cache: TTLCache | None = TTLCache(maxsize=max_entries, ttl=ttl_s, timer=timer) if ttl_s > 0 else None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_many(self, ids: Iterable[Hashable], fetch: Callable[[list], dict[Hashable, Any]]) -> dict[Hashable, Any]:
        """``{id: row or None}`` for every distinct id asked."""
        wanted = list(dict.fromkeys(ids))
        out: dict[Hashable, Any] = {}
        missing = []
        with self._lock:
            for i in wanted:
                row = _ABSENT if self._cache is None else self._cache.get(i, _ABSENT)
                if row is _ABSENT:
                    missing.append(i)
                else:
                    out[i] = row
            self.hits += len(wanted) - len(missing)
            self.misses += len(missing)
        if missing:
            fetched = fetch(missing)
            fresh = {i: fetched.get(i) for i in missing}
            out.update(fresh)
            if self._cache is not None:
                with self._lock:
                    self._cache.update(fresh)
        return out

    def get(self, key: Hashable, fetch: Callable[[list], dict[Hashable, Any]]) -> Any:
        return self.get_many([key], fetch)[key]

    def clear(self) -> None:
        with self._lock:
            if self._cache is not None:
                self._cache.clear()

    def stats(self) -> dict[str, float]:
        with self._lock:
            asked = self.hits + self.misses
            return {"hits": self.hits, "misses": self.misses, "hit_rate": round(self.hits / asked, 4) if asked else 0.0,
                    "entries": len(self._cache) if self._cache is not None else 0}
