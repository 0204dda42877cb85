"""EventSink deployment: POST /events lands here. Each batch is validated, appended durably to the event log
(invalid rows quarantined with their reason) and folded into the users' live session vectors before the reply,
so the next request of any replica sees the session move. An event sent again under its ``event_id`` (a client
that timed out cannot know whether its batch was written) is answered as a duplicate and neither appended nor
folded again: each sink remembers the ids of its latest events (``ServeConfig.dedup_event_ids``), reading them back
from the log when it starts, and holds the batch's users' locks from that check to the session update, so a retry
that arrives while the first attempt is still being written waits for it.

The sinks scale out by user (``ServeConfig.event_shards``): the ingress sends each user's events to the one sink
that owns the user (``shard_of``), where per-user locks order them, so no two processes ever update one session at
the same moment (each would read the session and overwrite the other's update)."""
from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ray import serve

from common.event_log import EventLog
from common.item_index import collection_name
from common.locks import RecentSet, StripedLocks
from common.session_store import SessionStore
from common.vector_store import open_store
from serve.config import ServeConfig
from serve.messages import load_in_replica
from serve.retriever import sessions_collection

log = logging.getLogger(__name__)


@serve.deployment
class EventSink:
    def __init__(self, cfg: ServeConfig, compacts: bool = False) -> None:
        load_in_replica(self)
        self.store = open_store(cfg.store_uri, connect_timeout=cfg.store_timeout_s,
                                call_timeout=cfg.store_timeout_s, search_ef=cfg.search_ef)
        self.content = collection_name(cfg.collection, cfg.kind)
        spec = self.store.describe(self.content)
        self.sessions = SessionStore(self.store, sessions_collection(cfg.collection), dim=spec.dim, model=spec.model,
                                     gap_seconds=cfg.session_gap_s)
        self.log = EventLog(cfg.event_log)
        self.recent = RecentSet(cfg.dedup_event_ids)
        self.recent.add(self.log.recent_keys(cfg.dedup_event_ids))
        self._users = StripedLocks()
        self._stop = threading.Event()
        if compacts and cfg.compact_events_s > 0:  # one compactor for the log (the first sink, a single replica)
            threading.Thread(target=self._compact, args=(cfg.compact_events_s,), name="compact-event-log",
                             daemon=True).start()

    def _compact(self, every_s: float) -> None:
        """Merge the log's parts older than ``every_s`` every ``every_s`` seconds, beside the appends."""
        while not self._stop.wait(every_s):
            try:
                removed = self.log.compact(older_than_s=every_s)
                if removed:
                    log.info("event log compacted: %d part(s) merged", removed)
            except Exception as e:  # noqa: BLE001 - a failed compaction leaves the log as it was; try again later
                log.warning("event log compaction failed (%s: %s); next try in %.0f s", type(e).__name__, e, every_s)

    def append(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Validate + append durably, then update sessions. Returns counts, rejections, the batch positions of
        duplicates (events already appended under their ``event_id``) and the sessions touched."""
        vectors: dict[str, np.ndarray] = {}

        def known(ids: Sequence[str]) -> set[str]:  # the catalogue check fetches the vectors the sessions need
            vectors.update((r["item_id"], np.asarray(r["vector"], dtype=np.float32))
                           for r in self.store.get(self.content, list(ids), with_vectors=True))
            return set(vectors)

        sessions: dict[str, int] = {}
        with self._users.held({str(r.get("user_id")) for r in rows}):  # duplicate check, append, fold: one user's
            result = self.log.append(rows, known_items=known, seen=self.recent)  # batches in the log's order
            self.recent.add(result.keys())
            if result.accepted:
                updated = self.sessions.update(result.events.sort_values("ts", kind="stable"), vectors)  # as logged
                sessions = {u: s.n_events for u, s in updated.items()}
        return {"accepted": result.accepted, "duplicates": result.duplicates, "rejected": result.rejected,
                "sessions": sessions}


def shard_of(user_id: str, shards: int) -> int:
    """The event sink that owns ``user_id``: every event of a user goes to one sink, whose per-user locks order
    them (two sink processes could each read a session and overwrite the other's update)."""
    return zlib.crc32(user_id.encode()) % shards


def split_by_user(rows: Sequence[Mapping[str, Any]], shards: int) -> list[list[int]]:
    """Batch positions per shard (``shard_of`` each row's user), in batch order."""
    positions: list[list[int]] = [[] for _ in range(shards)]
    for i, row in enumerate(rows):
        positions[shard_of(str(row.get("user_id") or ""), shards)].append(i)
    return positions


def merge_answers(answers: Sequence[Mapping[str, Any]], positions: Sequence[Sequence[int]]) -> dict[str, Any]:
    """One answer for the batch from the shards' answers (``answers[i]`` for the rows at ``positions[i]``):
    counts added, rejections back at their batch positions, sessions together."""
    out: dict[str, Any] = {"accepted": 0, "duplicates": [], "rejected": [], "sessions": {}}
    for answer, where in zip(answers, positions):
        out["accepted"] += answer["accepted"]
        out["duplicates"] += [where[i] for i in answer.get("duplicates", ())]
        out["rejected"] += [{**r, "index": where[r["index"]]} for r in answer["rejected"]]
        out["sessions"].update(answer["sessions"])
    out["duplicates"].sort()
    out["rejected"].sort(key=lambda r: r["index"])
    return out


def partial_answer(answers: Sequence[Mapping[str, Any] | BaseException],
                   positions: Sequence[Sequence[int]]) -> dict[str, Any]:
    """The answer for a batch some of whose sinks failed (``answers[i]`` an exception): what the others appended,
    as ``merge_answers``, plus ``not_appended``, the batch positions to send again (nothing else needs resending)."""
    done = [(a, where) for a, where in zip(answers, positions) if not isinstance(a, BaseException)]
    out = merge_answers([a for a, _ in done], [where for _, where in done])
    out["not_appended"] = sorted(i for a, where in zip(answers, positions) if isinstance(a, BaseException)
                                 for i in where)
    return out
