"""A value a serving replica keeps current in the background: rebuilt off the request path when its source changes.

``Refresher(version, build, every_s)`` builds ``build(version())`` at construction (a failure there raises: a
replica must not start on nothing), then a daemon thread reads ``version()`` every ``every_s`` seconds (0: never)
and, when it differs from the version built last, builds again and swaps the new value in whole. A failed build
is logged and counted, the current value stays, and the next look tries again. A ``None`` version means there is
nothing to build yet (the current value stays). Used for the published rules and ranker
(``common.artifacts.LatestArtifact``) and for what the services know from the event history.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from common.errors import ConfigError, first_line

log = logging.getLogger(__name__)

T = TypeVar("T")
V = TypeVar("V", bound=Hashable)


class Refresher(Generic[V, T]):
    """``value`` (and the ``version`` it was built from), rebuilt when ``version()`` changes."""

    def __init__(self, version: Callable[[], V | None], build: Callable[[V | None], T], every_s: float,
                 name: str) -> None:
        if isinstance(every_s, bool) or not isinstance(every_s, (int, float)) or not 0 <= every_s <= 86_400:
            raise ConfigError(f"{name}: the refresh interval must be in [0, 86400] seconds. Got {every_s!r}")
        self._version_of, self._build, self.every_s, self.name = version, build, float(every_s), name
        first = version()
        self._state: tuple[V | None, T] = (first, build(first))
        self.refreshes = 0  # rebuilds swapped in after the first
        self.failures = 0  # rebuilds (or looks at the version) that failed
        self._stop = threading.Event()
        if self.every_s > 0:
            threading.Thread(target=self._watch, name=f"refresh-{name}", daemon=True).start()

    @property
    def value(self) -> T:
        return self._state[1]

    @property
    def version(self) -> V | None:
        return self._state[0]

    def refresh(self) -> bool:
        """Look once: rebuild when the version changed; True when a new value was swapped in."""
        version = self._version_of()
        if version is None or version == self._state[0]:
            return False
        try:
            value = self._build(version)
        except Exception as e:  # noqa: BLE001 - a bad new source must not take the service down
            self.failures += 1
            log.warning("%s: building from %s failed (%s: %s); keeping the current one", self.name,
                        _short(version), type(e).__name__, first_line(e))
            return False
        self._state = (version, value)
        self.refreshes += 1
        log.info("%s: now from %s", self.name, _short(version))
        return True

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 - the source unreadable for a moment (object store hiccup)
                self.failures += 1
                log.warning("%s: could not look for a change (%s)", self.name, first_line(e))


def _short(version: object) -> str:
    text = str(version)
    return text if len(text) <= 80 else f"{text[:77]}..."
