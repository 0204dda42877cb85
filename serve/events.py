"""EventSink deployment: POST /events lands here. Each batch is validated, appended durably to the event log
(invalid rows quarantined with their reason) and folded into the users' live session vectors before the reply,
so the next request of any replica sees the session move."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from ray import serve

from common.event_log import EventLog
from common.item_index import collection_name
from common.session_store import SessionStore
from common.vector_store import open_store
from serve.config import ServeConfig
from serve.retriever import sessions_collection

log = logging.getLogger(__name__)


@serve.deployment
class EventSink:
    def __init__(self, cfg: ServeConfig) -> None:
        self.store = open_store(cfg.store_uri, connect_timeout=cfg.store_timeout_s,
                                call_timeout=cfg.store_timeout_s, search_ef=cfg.search_ef)
        self.content = collection_name(cfg.collection, cfg.kind)
        spec = self.store.describe(self.content)
        self.sessions = SessionStore(self.store, sessions_collection(cfg.collection), dim=spec.dim, model=spec.model,
                                     gap_seconds=cfg.session_gap_s)
        self.log = EventLog(cfg.event_log)

    def append(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Validate + append durably, then update sessions. Returns counts, rejections and the sessions touched."""
        vectors: dict[str, np.ndarray] = {}

        def known(ids: Sequence[str]) -> set[str]:  # the catalogue check fetches the vectors the sessions need
            vectors.update((r["item_id"], np.asarray(r["vector"], dtype=np.float32))
                           for r in self.store.get(self.content, list(ids), with_vectors=True))
            return set(vectors)

        result = self.log.append(rows, known_items=known)
        sessions: dict[str, int] = {}
        if result.accepted:
            updated = self.sessions.update(result.events.sort_values("ts", kind="stable"), vectors)  # as logged
            sessions = {u: s.n_events for u, s in updated.items()}
        return {"accepted": result.accepted, "rejected": result.rejected, "sessions": sessions}
