"""Live shopping sessions kept in the vector store, so every Serve replica reads and writes the same state.

One row per user in a collection of the catalogue's content space: the primary key ``item_id`` holds the *user* id
(as ``jobs/build_profiles`` stores users), ``vector`` the session vector (``common.profiles.session_update`` folded
over the session's positively weighted events), and the scalar fields ``n_events`` (int), ``updated_at`` (ISO UTC
of the latest event), ``recent`` and ``seen`` (JSON objects ``{"items": [ids, newest first]}``: a Milvus
server's JSON field must hold an object at the top level; Milvus Lite takes a bare list).

Rules, per user, events in time order:

* a gap longer than ``gap_seconds`` since ``updated_at`` starts a new session (vector, recent, seen and n_events
  restart); a late event (older than ``updated_at``) joins the current session;
* an event of positive weight (``EventWeights.weigh``) on an item with a vector folds that vector into the session
  and puts the item first in ``recent``; an event of weight <= 0 (dislike, return, "not interested") does not move
  the vector; every event puts its item first in ``seen`` (so it is not recommended again in this session);
* an item without a vector cannot move the session: the event is skipped for the vector (one log line counts
  them) but its item still goes in ``seen``.

Vector-less sessions are not stored (a row needs a unit vector and a placeholder would be a fake taste): a user
whose session so far has only non-positive events has no row, and ``update`` returns their session with
``vector=None`` for the caller's use. Once a positive event arrives in the same batch, the row is written with the
earlier items in ``seen``; those of earlier batches are not kept. When a gap ends a stored session and the new one
has no vector yet, the old row is deleted, so ``get`` never serves an ended session's vector as live.

Writes are read-modify-write per batch (one fresh ``get``, which sees every update acknowledged before it, and one
``upsert``). Within one process, batches touching the same user take that user's lock (striped locks held over
the read and the write), so concurrent requests never lose an update; two *processes* updating the same user at
the same moment may still lose one (last writer wins), which is why the serving graph sends each user's events
to one event sink (serve/events.py, ``shard_of``), a single replica.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.errors import ConfigError, SchemaError
from common.events import EventWeights
from common.locks import StripedLocks
from common.profiles import session_update
from common.vector_store import CollectionSpec, VectorStore

log = logging.getLogger(__name__)

MAX_RECENT = 20  # positively engaged items kept per session
MAX_SEEN = 200  # interacted items kept per session
LOCK_STRIPES = 64  # per-user locks of one process, by hash of the user id
SESSION_FIELDS = {"n_events": "int", "updated_at": "str", "recent": "json", "seen": "json"}


@dataclass(frozen=True, eq=False)
class Session:
    """One user's live session as stored."""

    user_id: str  # the shopper
    vector: np.ndarray | None  # unit session vector in the catalogue's content space (None: no session yet)
    recent: tuple[str, ...]  # most recent positively-engaged item ids, newest first (at most MAX_RECENT)
    seen: tuple[str, ...]  # item ids the user interacted with in this live session, newest first (at most MAX_SEEN)
    n_events: int  # events of this session applied so far
    updated_at: str  # ISO UTC time of the latest event


class SessionStore:
    """Reads and updates live sessions in ``collection`` of ``store`` (created if missing)."""

    def __init__(self, store: VectorStore, collection: str, dim: int, model: str, gap_seconds: float = 1800.0,
                 weights: EventWeights | None = None) -> None:
        if isinstance(gap_seconds, bool) or not isinstance(gap_seconds, (int, float)) \
                or not np.isfinite(gap_seconds) or gap_seconds <= 0:
            raise ConfigError(f"gap_seconds must be a finite number of seconds > 0. Got {gap_seconds!r}")
        if weights is not None and not isinstance(weights, EventWeights):
            raise ConfigError(f"weights must be EventWeights. Got {type(weights).__name__}")
        self.store = store
        self.collection = collection
        self.dim = dim
        self.gap_seconds = float(gap_seconds)
        self.weights = weights or EventWeights()
        self._locks = StripedLocks(LOCK_STRIPES)
        store.ensure_collection(CollectionSpec(name=collection, dim=dim, model=model, fields=dict(SESSION_FIELDS)))

    def get(self, user_id: str, fresh: bool = False) -> Session | None:
        """The stored session of ``user_id``; None when the user has none (or only non-positive events so far).
        ``fresh``: see every update acknowledged before the call, by any process (``VectorStore.get``)."""
        rows = self.store.get(self.collection, [user_id], with_vectors=True, fresh=fresh)
        return _session(rows[0]) if rows else None

    def update(self, events: pd.DataFrame, item_vectors: Mapping[str, np.ndarray]) -> dict[str, Session]:
        """Apply a batch of events (one or many users) and store the sessions; returns user id -> new session."""
        missing = [c for c in ("user_id", "item_id", "event", "ts") if c not in events.columns]
        if missing:
            raise SchemaError(f"session events lack column(s) {missing}; they need user_id, item_id, event, ts")
        if events.empty:
            return {}
        frame = pd.DataFrame({"user_id": events["user_id"].astype(str).to_numpy(),
                              "item_id": events["item_id"].astype(str).to_numpy(),
                              "ts": _timestamps(events["ts"]).to_numpy(),
                              "weight": self.weights.weigh(events)})
        frame = frame.sort_values("ts", kind="stable")
        users = list(dict.fromkeys(frame["user_id"]))
        with self._locks.held(users):
            return self._update(frame, users, item_vectors)

    def _update(self, frame: pd.DataFrame, users: list[str],
                item_vectors: Mapping[str, np.ndarray]) -> dict[str, Session]:
        stored = {r["item_id"]: _session(r)  # fresh: fold onto every update acknowledged so far, by any replica
                  for r in self.store.get(self.collection, users, with_vectors=True, fresh=True)}
        out: dict[str, Session] = {}
        skipped = 0
        for user, rows in frame.groupby("user_id", sort=False):
            session, n_skipped = self._fold(stored.get(user), user, rows, item_vectors)
            out[user] = session
            skipped += n_skipped
        upserts = [_row(s) for s in out.values() if s.vector is not None]
        ended = [u for u, s in out.items() if s.vector is None and u in stored]
        if upserts:
            self.store.upsert(self.collection, upserts)
        if ended:
            self.store.delete(self.collection, ended)
        if skipped:
            log.info("sessions: %d event(s) on items without a vector did not move their session", skipped)
        return out

    def _fold(self, current: Session | None, user: str, rows: pd.DataFrame,
              item_vectors: Mapping[str, np.ndarray]) -> tuple[Session, int]:
        vector = current.vector if current else None
        recent = list(current.recent) if current else []
        seen = list(current.seen) if current else []
        n = current.n_events if current else 0
        last = pd.Timestamp(current.updated_at) if current else None
        skipped = 0
        for item, ts, w in zip(rows["item_id"], rows["ts"], rows["weight"]):
            ts = pd.Timestamp(ts)
            if last is not None and (ts - last).total_seconds() > self.gap_seconds:
                vector, recent, seen, n = None, [], [], 0
            last = ts if last is None or ts > last else last
            n += 1
            seen = _push(seen, item, MAX_SEEN)
            if w <= 0:
                continue
            v = item_vectors.get(item)
            if v is None:
                skipped += 1
                continue
            v = np.asarray(v, dtype=np.float32)
            if v.shape != (self.dim,):
                raise ConfigError(f"item {item!r} has a vector of shape {list(v.shape)}; sessions in "
                                  f"{self.collection!r} are [{self.dim}]")
            vector = session_update(vector, v)
            recent = _push(recent, item, MAX_RECENT)
        return Session(user_id=user, vector=vector, recent=tuple(recent), seen=tuple(seen), n_events=n,
                       updated_at=last.isoformat()), skipped


def _push(ids: list[str], item: str, limit: int) -> list[str]:
    """``item`` first, without an older copy, at most ``limit`` long."""
    return [item, *(i for i in ids if i != item)][:limit]


def _timestamps(ts: pd.Series) -> pd.Series:
    """UTC datetimes from datetimes, ISO strings or epoch seconds; SchemaError naming a bad value."""
    if pd.api.types.is_numeric_dtype(ts) and not pd.api.types.is_bool_dtype(ts):
        out = pd.to_datetime(ts, unit="s", utc=True, errors="coerce")
    else:
        out = pd.to_datetime(ts, utc=True, errors="coerce", format="ISO8601") \
            if not pd.api.types.is_datetime64_any_dtype(ts) else pd.to_datetime(ts, utc=True)
    bad = out.isna()
    if bad.any():
        raise SchemaError(f"session events need a time in ts; got {ts[bad].iloc[0]!r}")
    return out


def _items(value: object) -> tuple[str, ...]:
    """A stored id list: ``{"items": [...]}`` (a Milvus server's JSON field must hold an object at the top)."""
    if isinstance(value, dict):
        value = value.get("items") or []
    return tuple(value or ())


def _session(row: dict) -> Session:
    return Session(user_id=row["item_id"], vector=np.asarray(row["vector"], dtype=np.float32),
                   recent=_items(row["recent"]), seen=_items(row["seen"]), n_events=int(row["n_events"]),
                   updated_at=row["updated_at"])


def _row(s: Session) -> dict:
    return {"item_id": s.user_id, "vector": s.vector, "n_events": s.n_events, "updated_at": s.updated_at,
            "recent": {"items": list(s.recent)}, "seen": {"items": list(s.seen)}}
