"""Which learned models (two-tower, GraphSAGE) the retriever uses, and which version of their vectors it reads.

A training publishes ``<collection>_<model>_items`` and ``_users`` as aliases it moves to new collections
``<name>__<version>`` (``common.vector_store.replace_vectors``), items first, then users. A user vector must only
ever meet item vectors of the same training (two trainings' spaces do not mix), so the retriever reads the
versioned collections behind the aliases, resolved at most every ``check_s`` seconds, and leaves a model out
while its two aliases name different versions (between a retraining's two moves). A model trained after the
service started is picked up the same way, and user vectors are cached per version, so none outlives its model.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common.vector_store import VectorStore

log = logging.getLogger(__name__)

LEARNED_MODELS = ("two_tower", "graphsage")  # <collection>_<model>_users / _items, written by the training jobs


@dataclass(frozen=True)
class LearnedVectors:
    """One model's user and item collections of one training."""

    model: str
    users: str  # the versioned collection (or, for a model published before aliases, the plain one)
    items: str
    version: str  # "" for a plain collection


def version_of(collection: str) -> str:
    """``name__v3`` -> ``v3``; "" for a collection that is not versioned."""
    return collection.rpartition("__")[2] if "__" in collection else ""


class LearnedModels:
    """``current()``: the learned models ready to read, as of at most ``check_s`` seconds ago (thread-safe)."""

    def __init__(self, store: VectorStore, base: str, check_s: float = 5.0, models: Sequence[str] = LEARNED_MODELS,
                 timer: Callable[[], float] = time.monotonic) -> None:
        self.store, self.base, self.check_s, self.models, self._timer = store, base, check_s, tuple(models), timer
        self._lock = threading.Lock()
        self._current: list[LearnedVectors] = []
        self._checked_at: float | None = None
        self.mismatches = 0  # checks that found a model's users and items at different versions

    def current(self) -> list[LearnedVectors]:
        with self._lock:
            now = self._timer()
            if self._checked_at is None or now - self._checked_at >= self.check_s:
                self._current, self._checked_at = self._resolve(), now
            return list(self._current)

    def invalidate(self) -> None:
        """Resolve again on the next ``current()`` (a read found a version gone: a retraining moved on)."""
        with self._lock:
            self._checked_at = None

    def _resolve(self) -> list[LearnedVectors]:
        found = []
        for model in self.models:
            users = self.store.resolve(f"{self.base}_{model}_users")
            items = self.store.resolve(f"{self.base}_{model}_items")
            if users is None or items is None:
                continue
            if version_of(users) != version_of(items):
                self.mismatches += 1
                log.info("%s: users at %r, items at %r (a retraining between its two moves): left out until they "
                         "match", model, version_of(users), version_of(items))
                continue
            found.append(LearnedVectors(model, users, items, version_of(items)))
        if [v.model for v in found] != [v.model for v in self._current]:
            log.info("learned models: %s", [f"{v.model}@{v.version or 'plain'}" for v in found] or "none")
        return found
