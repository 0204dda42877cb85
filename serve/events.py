"""EventSink deployment: POST /events lands here. Each batch is validated, appended durably to the event log
(invalid rows quarantined with their reason) and folded into the users' live session vectors before the reply,
so the next request of any replica sees the session move."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
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
        self.log = EventLog(cfg.event_log, known_items=self._known)

    def _known(self, ids: Sequence[str]) -> set[str]:
        return {r["item_id"] for r in self.store.get(self.content, list(dict.fromkeys(ids)))}

    def append(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Validate + append durably, then update sessions. Returns counts, rejections and the sessions touched."""
        result = self.log.append(rows)
        sessions: dict[str, int] = {}
        if result.accepted:
            valid = pd.read_parquet(result.part).sort_values("ts", kind="stable")  # exactly what was logged
            vectors = {r["item_id"]: np.asarray(r["vector"], dtype=np.float32)
                       for r in self.store.get(self.content, list(dict.fromkeys(valid["item_id"].astype(str))),
                                               with_vectors=True)}
            updated = self.sessions.update(valid, vectors)
            sessions = {u: s.n_events for u, s in updated.items()}
        return {"accepted": result.accepted, "rejected": result.rejected, "sessions": sessions}

