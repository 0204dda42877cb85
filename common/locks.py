"""Per-key locks for one process: a fixed set of locks ("stripes") chosen by a hash of the key, so any number of
keys (users) share a bounded number of locks and two batches never wait on each other in a cycle."""
from __future__ import annotations

import threading
import zlib
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator
from contextlib import ExitStack, contextmanager

from common.errors import ConfigError


class StripedLocks:
    """``with locks.held(keys):`` holds the lock of every key's stripe, taken in stripe order."""

    def __init__(self, stripes: int = 64) -> None:
        if isinstance(stripes, bool) or not isinstance(stripes, int) or stripes < 1:
            raise ConfigError(f"stripes must be a positive integer. Got {stripes!r}")
        self._locks = [threading.Lock() for _ in range(stripes)]

    def stripe(self, key: str) -> int:
        return zlib.crc32(key.encode()) % len(self._locks)

    @contextmanager
    def held(self, keys: Iterable[str]) -> Iterator[None]:
        with ExitStack() as stack:
            for i in sorted({self.stripe(k) for k in keys}):
                stack.enter_context(self._locks[i])
            yield


class RecentSet:
    """The last ``capacity`` keys added (a set that forgets its oldest): an appender's memory of recent event ids.
    ``add`` may be called from several threads (it takes a lock); a membership test is one dict lookup."""

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ConfigError(f"capacity must be an integer >= 0. Got {capacity!r}")
        self.capacity = capacity
        self._keys: OrderedDict[Hashable, None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, keys: Iterable[Hashable]) -> None:
        with self._lock:
            for key in keys:
                self._keys[key] = None
                self._keys.move_to_end(key)
                if len(self._keys) > self.capacity:
                    self._keys.popitem(last=False)
