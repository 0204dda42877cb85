"""EventSink deployment: POST /events lands here. Each batch is validated, appended durably to the event log
(invalid rows quarantined with their reason) and folded into the users' live session vectors before the reply,
so the next request of any replica sees the session move.

Requests that arrive together are appended together (``@serve.batch``): one log part, one fsync, one read of
item vectors and one session upsert for all of them, then each request gets its own counts back. A failure
fails every request of that batch, none of which was acknowledged.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from ray import serve

from common.event_log import AppendResult, EventLog
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

    async def append(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Validate + append durably, then update sessions. Returns counts, rejections and the sessions touched."""
        return await self._append_together(rows)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _append_together(self, batches: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._append_all, batches)

    def _append_all(self, batches: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        rows = [row for batch in batches for row in batch]
        result = self.log.append(rows)
        updated: dict[str, int] = {}
        if result.accepted:
            valid = pd.read_parquet(result.part).sort_values("ts", kind="stable")  # exactly what was logged
            vectors = {r["item_id"]: np.asarray(r["vector"], dtype=np.float32)
                       for r in self.store.get(self.content, list(dict.fromkeys(valid["item_id"].astype(str))),
                                               with_vectors=True)}
            updated = {u: s.n_events for u, s in self.sessions.update(valid, vectors).items()}
        return split_result(batches, result, updated)


def split_result(batches: Sequence[Sequence[dict[str, Any]]], result: AppendResult,
                 sessions: dict[str, int]) -> list[dict[str, Any]]:
    """Each request's share of one append of their concatenated rows: its accepted count, its rejected rows (at
    their positions in that request) and the sessions of its users that the append updated."""
    out, start = [], 0
    rejected = sorted(result.rejected, key=lambda r: r["index"])
    for batch in batches:
        end = start + len(batch)
        mine = [{**r, "index": r["index"] - start} for r in rejected if start <= r["index"] < end]
        bad = {r["index"] for r in mine}
        users = dict.fromkeys(str(row.get("user_id")) for i, row in enumerate(batch) if i not in bad)
        out.append({"accepted": len(batch) - len(mine), "rejected": mine,
                    "sessions": {u: sessions[u] for u in users if u in sessions}})
        start = end
    return out
