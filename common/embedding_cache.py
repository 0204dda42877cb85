"""A content-addressed cache of item vectors: Parquet parts keyed by content hash, appended as work finishes.

Every finished batch of the embed job lands here as one complete Parquet file (written to a temporary name,
then renamed), so a job that dies keeps what it encoded, and the next run encodes only what is missing.
"""
from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from common.artifacts import write_atomic

log = logging.getLogger(__name__)

HASH = "content_hash"


def vector_column(vectors) -> pa.FixedSizeListArray:
    """A float32 fixed-size list column from a 2-D array."""
    import numpy as np

    arr = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])


class EmbeddingCache:
    """Vectors by content hash under ``uri`` (a folder: local path or fsspec URI)."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self._fs, self._path = url_to_fs(self.uri)

    def _parts(self) -> list[str]:
        if not self._fs.exists(self._path):
            return []
        return sorted(p for p in self._fs.ls(self._path, detail=False) if p.endswith(".parquet"))

    def _read(self, columns: list[str] | None = None) -> pa.Table | None:
        tables = []
        for part in self._parts():
            with self._fs.open(part, "rb") as f:
                tables.append(pq.read_table(f, columns=columns))
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def known_hashes(self) -> set[str]:
        table = self._read([HASH])
        return set(table.column(HASH).to_pylist()) if table is not None else set()

    def write(self, table: pa.Table, run_id: str) -> str:
        """Add one part (a table with a ``content_hash`` column and vector columns); returns its path."""
        self._fs.makedirs(self._path, exist_ok=True)
        name = f"{self._path}/part-{run_id}-{uuid.uuid4().hex[:12]}.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf)
        write_atomic(self._fs, name, buf.getvalue())
        return name

    def lookup(self, hashes: Iterable[str]) -> pa.Table:
        """The cached rows for ``hashes`` (one per hash, the newest part wins); empty table when none."""
        table = self._read()
        if table is None:
            return pa.table({HASH: pa.array([], pa.string())})
        table = table.filter(pc.is_in(table.column(HASH), value_set=pa.array(sorted(set(hashes)), pa.string())))
        # Keep the last occurrence of each hash (parts are read in name order; duplicates hold equal vectors).
        seen: dict[str, int] = {h: i for i, h in enumerate(table.column(HASH).to_pylist())}
        return table.take(pa.array(sorted(seen.values()), pa.int64()))

    def aligned(self, hashes: list[str]) -> pa.Table:
        """The cached rows for ``hashes``, one per entry and in the same order; KeyError names a missing hash."""
        cached = self.lookup(hashes)
        index = {h: i for i, h in enumerate(cached.column(HASH).to_pylist())}
        missing = [h for h in hashes if h not in index]
        if missing:
            raise KeyError(f"{len(missing)} content hashes are not in the embedding cache {self.uri}, e.g. {missing[0]}")
        return cached.take(pa.array([index[h] for h in hashes], pa.int64()))

    def compact(self, live_hashes: set[str], run_id: str, max_parts: int = 64) -> bool:
        """Rewrite the cache as one part holding only ``live_hashes`` when it has grown past ``max_parts``
        parts or holds more dead rows than live ones. Returns whether it compacted."""
        parts = self._parts()
        if not parts:
            return False
        hashes = self.known_hashes()
        if len(parts) <= max_parts and len(hashes - live_hashes) <= len(live_hashes):
            return False
        live = self.lookup(live_hashes)
        self.write(live, f"{run_id}-compact")
        for part in parts:
            self._fs.rm(part)
        log.info("compacted embedding cache %s: %d parts -> 1 (%d rows)", self.uri, len(parts), live.num_rows)
        return True
