"""The vector store: a small Protocol over Milvus, chosen by URI (shared local Milvus Lite server or a Milvus server).

``open_store(uri)`` accepts:
- a local path (``var/milvus``, ``./x.db``), ``milvus-lite:///abs/path`` or ``milvus-lite://rel/path``: the
  shared Milvus Lite server for that data directory (started on demand, see ``common.milvus_local``);
- ``http://host:port``, ``https://host:port``, ``tcp://host:port``: a Milvus server as is.

Every collection holds one vector field ``vector`` (float32, L2-normalised, inner product = cosine), a varchar
primary key ``item_id`` and typed scalar fields; the encoder identity and dimension are recorded in the
collection's properties. Every error from pymilvus is mapped onto ``common.errors``.

Visibility: a store always reads its own writes (on Milvus Lite it flushes what it wrote before reading, and the
server flushes by itself once writes pause). count, delete and scan see every write made before the call; search
and get use "Session" consistency, so on a Milvus server another process's latest writes show once the server's
time tick passes them (measured on Milvus 2.3.5: 260-500 ms with its default 200 ms tick, 15-38 ms with a 20 ms
tick, ``common.milvus_standalone.TIME_TICK_MS``). ``get(..., fresh=True)`` reads under "Strong" consistency: it sees
every write any process had acknowledged before the call, at the cost of waiting for that tick; when the wait
passes ``FRESH_TIMEOUT_S`` (a lagging server) it reads without waiting instead, logs it and counts ``stale_reads``,
and for ``FRESH_BACKOFF_S`` fresh reads do not wait at all (then one tries again).
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from common import milvus_local
from common.errors import (
    CollectionMismatchError,
    ConfigError,
    FilterError,
    NotFoundError,
    StoreError,
    StoreUnavailableError,
    first_line,
)
from common.store_schema import (
    MAX_ID_LENGTH,
    PRIMARY_KEY,
    VECTOR_FIELD,
    check_ids,
    combine_filter,
    fields_from_schema,
    ids_filter,
    normalised,
    parse_store_uri,
    prepare_row,
    row_out,
    search_params,
)

logger = logging.getLogger(__name__)

MAX_TOP_K = 16384  # Milvus' limit on k (and on a query's page)
FIELD_TYPES = ("str", "float", "int", "bool", "json")
INDEX_TYPES = ("AUTOINDEX", "FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_PROP_MODEL, _PROP_DIM, _PROP_FIELDS, _PROP_INDEX = "vitrine.model", "vitrine.dim", "vitrine.fields", "vitrine.index"
# HNSW M 32 / efConstruction 400: at 100k items (benchmarks/filtered_recall.py) M 16 / 200 held filtered
# recall@10 at 0.92-0.94 with 10% of the rows matching, M 32 / 400 at 0.97, M 48 / 500 at 0.99 (index build
# 16 s, 32 s, 60 s; search CPU grows with M at a given beam).
_INDEX_BUILD_PARAMS: dict[str, dict[str, int]] = {"HNSW": {"M": 32, "efConstruction": 400}, "IVF_FLAT": {"nlist": 128},
                                                  "IVF_SQ8": {"nlist": 128}}
_BATCH_BYTES = 16 * 1024 * 1024  # vector payload per upsert request (gRPC messages stay far below the limits)
_IDS_PER_REQUEST = 1000
EXACT_FILTER_ROWS = 256  # a filter matching at most this many rows is searched exactly (brute force)
EXACT_FALLBACK_ROWS = 16384  # ... and up to this many when graph search still came back short
MAX_EF = 4096  # the widest HNSW beam a filtered search asks for
FRESH_TIMEOUT_S = 1.0  # a fresh (Strong) read waits this long for the server's tick, then reads without waiting
FRESH_BACKOFF_S = 5.0  # after a fresh read ran out of time, fresh reads read without waiting this long, then retry
DEFAULT_EF = 64  # HNSW beam of an unfiltered search (open_store(search_ef=...): recall against latency)
COUNT_TTL_S = 10.0  # how long a filter's match count (which picks the filtered-search strategy) is reused
_FILTER_HINT = re.compile(r"expr|pars|field|column|token|compar|operator|syntax|unexpected|type|invalid|predicate")


@dataclass(frozen=True)
class CollectionSpec:
    """What a collection holds: one vector kind from one encoder, plus filterable scalar fields."""

    name: str  # collection name: letters, digits, underscore; not starting with a digit
    dim: int  # vector dimension
    model: str  # encoder identity that produced the vectors, recorded in the collection
    fields: dict[str, str] = field(default_factory=dict)  # scalar fields: name -> one of FIELD_TYPES
    index: str = "AUTOINDEX"  # one of INDEX_TYPES; the metric is always inner product on normalised vectors

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise ConfigError(f"collection name must match {_NAME_RE.pattern}. Got {self.name!r}")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or not 1 <= self.dim <= 32768:
            raise ConfigError(f"collection dim must be an integer in [1, 32768]. Got {self.dim!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"collection model must name the encoder (non-empty). Got {self.model!r}")
        for name, kind in self.fields.items():
            if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (PRIMARY_KEY, VECTOR_FIELD):
                raise ConfigError(f"field name {name!r} is invalid or reserved ({PRIMARY_KEY!r}, {VECTOR_FIELD!r})")
            if kind not in FIELD_TYPES:
                raise ConfigError(f"field {name!r} has type {kind!r}; valid types are {', '.join(FIELD_TYPES)}")
        if self.index not in INDEX_TYPES:
            raise ConfigError(f"index must be one of {', '.join(INDEX_TYPES)}. Got {self.index!r}")


@dataclass(frozen=True)
class Hit:
    """One search result."""

    item_id: str  # the matching item
    score: float  # cosine similarity, higher is better
    fields: dict[str, Any]  # the collection's scalar fields for this item


@runtime_checkable
class VectorStore(Protocol):
    """Collections of normalised vectors with scalar fields; searches by cosine with Milvus filter expressions."""

    uri: str

    def ensure_collection(self, spec: CollectionSpec) -> None: ...
    def describe(self, name: str) -> CollectionSpec: ...
    def has_collection(self, name: str) -> bool: ...
    def list_collections(self) -> list[str]: ...
    def drop_collection(self, name: str) -> None: ...
    def swap(self, alias: str, collection: str) -> str | None: ...
    def resolve(self, name: str) -> str | None: ...
    def upsert(self, name: str, rows: list[dict[str, Any]]) -> int: ...
    def delete(self, name: str, ids: list[str]) -> int: ...
    def get(self, name: str, ids: list[str], with_vectors: bool = False,
            fresh: bool = False) -> list[dict[str, Any]]: ...
    def scan(self, name: str, fields: list[str], batch_size: int = 1000) -> Iterator[list[dict[str, Any]]]: ...
    def count(self, name: str) -> int: ...
    def search(self, name: str, vectors: np.ndarray, k: int, filter: str | None = None,
               exclude_ids: Sequence[str] = ()) -> list[list[Hit]]: ...
    def search_where(self, name: str, vectors: np.ndarray, k: int, filter: str | None, on: str,
                     exclude_ids: Sequence[str] = ()) -> list[list[Hit]]: ...
    def flush(self, name: str) -> None: ...
    def close(self) -> None: ...


def open_store(uri: str, *, connect_timeout: float = 5.0, call_timeout: float = 120.0,
               start_timeout: float = 60.0, search_ef: int = DEFAULT_EF) -> MilvusStore:
    """Open the store at ``uri`` (see the module docstring); StoreUnavailableError when it cannot be reached.

    ``connect_timeout`` bounds reaching the server, ``call_timeout`` each call, ``start_timeout`` starting the local
    Milvus Lite server. The store pickles as its URI (a Ray task or actor that receives it connects again).
    """
    store = _open(uri, connect_timeout, call_timeout, start_timeout)
    store.search_ef = check_ef(search_ef)
    store._open_args["search_ef"] = store.search_ef
    return store


def replace_vectors(store: VectorStore, name: str, tag: str, model: str, ids: Sequence[str], vectors: np.ndarray,
                    index: str = "HNSW", batch: int = 2048) -> int:
    """Replace everything readers find under ``name`` with these vectors (a new model's: two trainings' spaces never
    mix): written to a new collection ``<name>__<tag>``, flushed, then ``name`` is moved to it in one step
    (``VectorStore.swap``), so searches see the old vectors until the new ones are complete. Returns rows written."""
    physical = f"{name}__{tag}"
    store.drop_collection(physical)  # what a failed run of the same version left
    store.ensure_collection(CollectionSpec(name=physical, dim=int(vectors.shape[1]), model=model, index=index))
    written = 0
    for start in range(0, len(ids), batch):
        written += store.upsert(physical, [{"item_id": str(i), "vector": v}
                                           for i, v in zip(ids[start:start + batch], vectors[start:start + batch])])
    store.flush(physical)
    store.swap(name, physical)
    return written


def check_ef(ef: int) -> int:
    if isinstance(ef, bool) or not isinstance(ef, (int, np.integer)) or not 1 <= int(ef) <= MAX_EF:
        raise ConfigError(f"search_ef must be an integer in [1, {MAX_EF}]. Got {ef!r}")
    return int(ef)


def _open(uri: str, connect_timeout: float, call_timeout: float, start_timeout: float) -> MilvusStore:
    target = parse_store_uri(uri)
    if target.kind == "server":
        return MilvusStore(uri, target.location, connect_timeout=connect_timeout, call_timeout=call_timeout)
    data_dir = Path(target.location)
    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(f"{data_dir} is a file; a Milvus Lite 3 store is a directory (use a new path)")
    server = milvus_local.ensure_server(data_dir, timeout=start_timeout)
    try:
        return MilvusStore(uri, server.uri, connect_timeout=connect_timeout, call_timeout=call_timeout,
                           data_dir=data_dir, start_timeout=start_timeout)
    except StoreUnavailableError:
        # The server may have been stopped between the check and the connection: check (and start) once more.
        server = milvus_local.ensure_server(data_dir, timeout=start_timeout)
        return MilvusStore(uri, server.uri, connect_timeout=connect_timeout, call_timeout=call_timeout,
                           data_dir=data_dir, start_timeout=start_timeout)


# pymilvus logs every failed RPC with a traceback at ERROR level; inside this module each one is raised again as a
# Vitrine error, so those records are dropped while one of our calls runs (and only then).
_translating: contextvars.ContextVar[bool] = contextvars.ContextVar("vitrine_store_translating", default=False)
_log_filter_lock = threading.Lock()
_log_filter_installed = False


class _TranslatedRpcErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _translating.get()


def _install_log_filter() -> None:
    global _log_filter_installed
    with _log_filter_lock:
        if not _log_filter_installed:
            for name in ("pymilvus.decorators", "pymilvus.client.iterator.query_iterator",
                         "pymilvus.client.connection_manager"):
                logging.getLogger(name).addFilter(_TranslatedRpcErrors())
            _log_filter_installed = True


T = TypeVar("T")


def _one_line(message: str, expr: str | None = None) -> str:
    """Milvus Lite explains filter errors over several lines (expression, caret); keep the words on one line."""
    parts = [line.strip() for line in str(message).splitlines()]
    parts = [p for p in parts if p and set(p) - set("^~ ") and p != (expr or "").strip()]
    return "; ".join(parts)


class MilvusStore:
    """VectorStore over one Milvus endpoint (a Milvus Lite server or a Milvus server) via pymilvus MilvusClient."""

    def __init__(self, uri: str, endpoint: str, *, connect_timeout: float = 5.0, call_timeout: float = 120.0,
                 data_dir: Path | None = None, start_timeout: float = 60.0) -> None:
        """Connect to ``endpoint``. With ``data_dir`` (a shared local Milvus Lite server), a lost server is
        started again and the call retried once."""
        _install_log_filter()
        self.uri = uri
        self.endpoint = endpoint
        self._timeout = call_timeout
        self._fresh_timeout = min(FRESH_TIMEOUT_S, call_timeout)
        self.stale_reads = 0  # fresh reads served without waiting (ran out of time, or during the back-off)
        self._fresh_paused_until = 0.0  # monotonic time until which fresh reads do not wait (a lagging server)
        self._connect_timeout = connect_timeout
        self._data_dir = data_dir
        self._start_timeout = start_timeout
        self.search_ef = DEFAULT_EF  # HNSW beam of unfiltered searches; filtered ones widen it (see search)
        self._specs: dict[str, CollectionSpec] = {}
        self._dirty: set[str] = set()
        self._counts: dict[tuple[str, str], tuple[int, float]] = {}  # (collection, filter) -> (matches, when)
        self._closed = False
        self._open_args = {"connect_timeout": connect_timeout, "call_timeout": call_timeout,
                           "start_timeout": start_timeout}
        self._client, self.server_version = self._connect(endpoint)
        # Milvus Lite searches unflushed rows by brute force in Python (seconds at 100k rows): flush before reading.
        self.is_lite = self.server_version.startswith("milvus_lite")
        logger.debug("Opened vector store %s at %s (server %s)", uri, endpoint, self.server_version)

    def _connect(self, endpoint: str) -> tuple[Any, str]:
        import grpc  # noqa: PLC0415
        from pymilvus import MilvusClient  # noqa: PLC0415 - keeps `import common.vector_store` light
        from pymilvus.exceptions import MilvusException  # noqa: PLC0415

        try:
            with self._muted():
                client = MilvusClient(uri=endpoint, timeout=self._connect_timeout)
                version = str(client.get_server_version(timeout=self._connect_timeout))
        except MilvusException as e:
            raise StoreUnavailableError(
                f"cannot reach Milvus at {endpoint} (from {self.uri!r}): {_one_line(e.message)}") from e
        except grpc.RpcError as e:
            raise StoreUnavailableError(f"cannot reach Milvus at {endpoint} (from {self.uri!r}): {e}") from e
        return client, version

    def _reconnect(self) -> None:
        """Find (or start) the local server again and open a new connection to it."""
        from pymilvus.exceptions import MilvusException  # noqa: PLC0415

        assert self._data_dir is not None
        server = milvus_local.ensure_server(self._data_dir, timeout=self._start_timeout)
        client, version = self._connect(server.uri)
        with self._muted(), contextlib.suppress(MilvusException):  # the old channel is dead
            self._client.close()
        logger.warning("Reconnected vector store %s to the Milvus Lite server at %s (was %s)",
                       self.uri, server.uri, self.endpoint)
        self._client, self.server_version, self.endpoint = client, version, server.uri

    def __enter__(self) -> MilvusStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (self.uri, self._open_args))

    def __repr__(self) -> str:
        return f"MilvusStore(uri={self.uri!r}, endpoint={self.endpoint!r}, server={self.server_version!r})"

    # ------------------------------------------------------------------------------------------ collections

    def ensure_collection(self, spec: CollectionSpec) -> None:
        """Create the collection if missing; CollectionMismatchError if it exists with another model/dim/fields."""
        if not isinstance(spec, CollectionSpec):
            raise ConfigError(f"ensure_collection takes a CollectionSpec. Got {type(spec).__name__}")
        existing = self.describe(spec.name) if self.has_collection(spec.name) else None
        if existing is None:
            try:
                self._create(spec)
                logger.info("Created collection %s (%s, dim %d, %s)", spec.name, spec.model, spec.dim, spec.index)
            except StoreError:
                if not self.has_collection(spec.name):
                    raise
                existing = self.describe(spec.name)  # another process created it meanwhile
        if existing is not None:
            self._check_same(existing, spec)
        self._call("load", spec.name, "load_collection", spec.name)
        self._specs[spec.name] = existing or spec

    def describe(self, name: str) -> CollectionSpec:
        """The spec recorded in the collection; NotFoundError if it does not exist."""
        info = self._call("describe", name, "describe_collection", name)
        by_name = {f["name"]: f for f in info["fields"]}
        pk, vec = by_name.get(PRIMARY_KEY), by_name.get(VECTOR_FIELD)
        if pk is None or not pk.get("is_primary") or vec is None:
            raise CollectionMismatchError(
                f"collection {name!r} was not created by Vitrine: it needs a primary key {PRIMARY_KEY!r} and a "
                f"vector field {VECTOR_FIELD!r}; it has {sorted(by_name)}"
            )
        props = info.get("properties") or {}
        try:
            fields = json.loads(props[_PROP_FIELDS]) if _PROP_FIELDS in props else fields_from_schema(by_name)
        except ValueError as e:
            raise CollectionMismatchError(f"collection {name!r} has an unreadable {_PROP_FIELDS} property") from e
        spec = CollectionSpec(
            name=name,
            dim=int(vec["params"]["dim"]),
            model=props.get(_PROP_MODEL) or "(unknown: not created by Vitrine)",
            fields=fields,
            index=props.get(_PROP_INDEX) if props.get(_PROP_INDEX) in INDEX_TYPES else "AUTOINDEX",
        )
        self._specs[name] = spec
        return spec

    def has_collection(self, name: str) -> bool:
        return bool(self._call("has_collection", name, "has_collection", name))

    def list_collections(self) -> list[str]:
        """Every name a read can use: the collections and the aliases pointing at them."""
        names = list(self._call("list_collections", None, "list_collections"))
        for name in list(names):
            names.extend(self._aliases_of(name))
        return sorted(set(names))

    def drop_collection(self, name: str) -> None:
        """Drop the collection and its data (an alias: the alias and the collection it names); a no-op when it
        does not exist."""
        target = self._alias_target(name)
        if target is not None:
            self._call("drop_alias", name, "drop_alias", name)
            self._forget(name)
            name = target
        if self.has_collection(name):
            for alias in self._aliases_of(name):
                self._call("drop_alias", alias, "drop_alias", alias)
                self._forget(alias)
            self._call("drop", name, "drop_collection", name)
            logger.info("Dropped collection %s", name)
        self._forget(name)

    def swap(self, alias: str, collection: str) -> str | None:
        """Point ``alias`` at ``collection`` in one step, so readers of ``alias`` move from the old data to the new
        with no moment in between; then drop the collection it named before and return that name. A plain
        collection called ``alias`` (written before aliases were used) is dropped first: a gap once."""
        previous = self._alias_target(alias)
        if previous is None:
            if self.has_collection(alias):
                logger.warning("replacing the plain collection %s by an alias (a one-off gap for its readers)", alias)
                self.drop_collection(alias)
            self._call("create_alias", alias, "create_alias", collection, alias)
        elif previous != collection:
            self._call("alter_alias", alias, "alter_alias", collection, alias)
        self._forget(alias)
        logger.info("%s now names %s (was %s)", alias, collection, previous)
        if previous is not None and previous != collection:
            self.drop_collection(previous)
        return previous if previous != collection else None

    def resolve(self, name: str) -> str | None:
        """The collection a read of ``name`` uses: an alias's target, a plain collection's own name; None when
        neither exists."""
        target = self._alias_target(name)
        if target is not None:
            return target
        return name if self.has_collection(name) else None

    def _alias_target(self, name: str) -> str | None:
        """The collection ``name`` points at when it is an alias; None when it is not one."""
        try:
            return str(self._call("describe_alias", name, "describe_alias", name)["collection_name"])
        except StoreUnavailableError:
            raise
        except (NotFoundError, StoreError):
            return None

    def _aliases_of(self, collection: str) -> list[str]:
        return list(self._call("list_aliases", collection, "list_aliases", collection).get("aliases") or [])

    def _forget(self, name: str) -> None:
        """Drop what this client remembers of ``name`` (its spec, pending flush, filter counts)."""
        self._specs.pop(name, None)
        self._dirty.discard(name)
        self._forget_counts(name)

    # ------------------------------------------------------------------------------------------- rows

    def upsert(self, name: str, rows: list[dict[str, Any]]) -> int:
        """Insert or replace rows by item_id (vectors are validated and L2-normalised); returns the distinct ids
        written. A later row with the same id in one call wins."""
        spec = self._spec(name)
        by_id: dict[str, dict[str, Any]] = {}
        for row in rows:
            prepared = prepare_row(spec, row)
            by_id[prepared[PRIMARY_KEY]] = prepared
        if not by_id:
            return 0
        prepared_rows = list(by_id.values())
        step = max(1, _BATCH_BYTES // (4 * spec.dim + 256))
        for start in range(0, len(prepared_rows), step):
            self._call("upsert", name, "upsert", name, prepared_rows[start:start + step])
            self._dirty.add(name)
        self._forget_counts(name)
        return len(prepared_rows)

    def delete(self, name: str, ids: list[str]) -> int:
        """Delete rows by id; returns how many of them existed."""
        self._spec(name)
        wanted = list(dict.fromkeys(check_ids(ids)))
        existing = len(self._get_rows(name, wanted, [PRIMARY_KEY], consistency="Strong"))
        for start in range(0, len(wanted), _IDS_PER_REQUEST):  # all of them: a row may have landed meanwhile
            self._call("delete", name, "delete", name, ids=wanted[start:start + _IDS_PER_REQUEST])
            self._dirty.add(name)
        self._forget_counts(name)
        return existing

    def get(self, name: str, ids: list[str], with_vectors: bool = False,
            fresh: bool = False) -> list[dict[str, Any]]:
        """Rows for ``ids`` in the order asked (missing ids are absent): item_id, the scalar fields and, when
        asked, ``vector`` as a float32 array. Consistency is "Session", as for search; ``fresh`` reads under
        "Strong" consistency (every write acknowledged to any process before the call is seen; on a Milvus
        server it waits for the next time tick)."""
        spec = self._spec(name)
        fields = [PRIMARY_KEY, *spec.fields, *([VECTOR_FIELD] if with_vectors else [])]
        wanted = list(dict.fromkeys(check_ids(ids)))
        self._before_read(name)
        rows, consistency = None, "Session"
        if fresh and not self.is_lite:  # Milvus Lite has no time tick: every read already sees every write
            if time.monotonic() < self._fresh_paused_until:  # the server lagged a moment ago: do not wait again
                self.stale_reads += 1
                consistency = "Eventually"
            else:
                try:
                    rows = self._get_rows(name, wanted, fields, consistency="Strong", timeout=self._fresh_timeout)
                except StoreUnavailableError as e:
                    # The server's time tick lags: seen for minutes after a restart, while it replays the write
                    # log. "Session" would wait as well (for this client's own last write): read what is there
                    # now, and for FRESH_BACKOFF_S do not wait again (each wait would cost every caller a second).
                    self.stale_reads += 1
                    consistency = "Eventually"
                    self._fresh_paused_until = time.monotonic() + FRESH_BACKOFF_S
                    logger.warning("a fresh read of %s failed or took over %.1f s; reading without waiting for the "
                                   "next %.0f s (%d stale reads so far): %s", name, self._fresh_timeout,
                                   FRESH_BACKOFF_S, self.stale_reads, first_line(e))
        if rows is None:
            rows = self._get_rows(name, wanted, fields, consistency=consistency)
        found = {row[PRIMARY_KEY]: row for row in rows}
        return [found[i] for i in wanted if i in found]

    def scan(self, name: str, fields: list[str], batch_size: int = 1000) -> Iterator[list[dict[str, Any]]]:
        """Every row exactly once, in batches of at most ``batch_size``, with item_id and ``fields`` (which may
        include ``vector``): a snapshot that holds every write made before the call."""
        spec = self._spec(name)
        valid = {PRIMARY_KEY, VECTOR_FIELD, *spec.fields}
        unknown = [f for f in fields if f not in valid]
        if unknown:
            raise StoreError(f"scan of {name!r}: unknown fields {unknown}; valid: {sorted(valid)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_TOP_K:
            raise StoreError(f"scan batch_size must be an integer in [1, {MAX_TOP_K}]. Got {batch_size!r}")
        self._before_read(name)
        output = list(dict.fromkeys([PRIMARY_KEY, *fields]))
        iterator = self._call("scan", name, "query_iterator", name, batch_size=batch_size,
                              output_fields=output)
        return self._iterate(name, iterator)

    def _iterate(self, name: str, iterator: Any) -> Iterator[list[dict[str, Any]]]:
        try:
            while True:
                batch = self._call("scan", name, iterator.next, timed=False)
                if not batch:
                    return
                yield [row_out(row) for row in batch]
        finally:
            iterator.close()  # local bookkeeping only, no RPC

    def count(self, name: str) -> int:
        """Number of rows (live, after upserts and deletes), counting every write made before the call."""
        self._spec(name)
        self._before_read(name)
        res = self._call("count", name, "query", name, filter="", output_fields=["count(*)"],
                         consistency_level="Strong")
        return int(res[0]["count(*)"]) if res else 0

    # ------------------------------------------------------------------------------------------- search

    def search(self, name: str, vectors: np.ndarray, k: int, filter: str | None = None,
               exclude_ids: Sequence[str] = ()) -> list[list[Hit]]:
        """Top-``k`` by cosine for each query vector, best first. ``filter`` is a Milvus boolean expression over
        the scalar fields (FilterError when invalid); ``exclude_ids`` are removed inside the query, so up to
        ``k`` other results still come back.

        Consistency is "Session": this process's own writes are always seen; on a Milvus server another process's
        writes show up within about a second. ("Strong", as count and delete use, costs ~200 ms per call on
        Milvus 2.3.5: it waits for the next time tick. Milvus Lite sees every write at once.)"""
        spec = self._spec(name)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= MAX_TOP_K:
            raise StoreError(f"k must be an integer in [1, {MAX_TOP_K}]. Got {k!r}")
        queries = normalised(np.asarray(vectors, dtype=np.float32), spec, what="query vectors")
        if filter is not None and not isinstance(filter, str):
            raise FilterError(f"filter must be a string expression. Got {type(filter).__name__}")
        expr = combine_filter(filter, check_ids(list(exclude_ids)))
        if len(queries) == 0:
            return []
        self._before_read(name)
        k = int(k)
        if not (filter or "").strip():
            return self._ann(name, spec, queries, k, expr, filter, ef=max(self.search_ef, k))
        # A filter starves graph search: HNSW walks the graph and drops non-matching nodes, so a selective
        # filter returned 0 of 10 hits here at 1.6% selectivity (milvus-io/milvus #44854). So: count the
        # matches, search small sets exactly, and widen ef by the inverse selectivity for the rest.
        # The counts only choose the strategy: they are taken on the filter alone (not the excluded ids, which
        # differ per request) and kept for COUNT_TTL_S or until this store writes to the collection.
        matches = self._cached_count(name, filter)
        if matches == 0:
            return [[] for _ in queries]
        if matches <= EXACT_FILTER_ROWS:
            return self._exact(name, spec, queries, k, expr)
        total = max(matches, self._cached_count(name, ""))
        # A filter keeping a share s of the rows leaves about s * ef matching nodes in the beam: widen the beam
        # by 1/s so the search sees as many candidates as an unfiltered one (benchmarks/filtered_recall.py).
        ef = min(MAX_EF, -(-max(self.search_ef, 2 * k) * total // matches))  # ceil(base * total / matches)
        results = self._ann(name, spec, queries, k, expr, filter, ef=ef)
        short = [i for i, hits in enumerate(results) if len(hits) < min(k, matches)]
        if short and matches <= EXACT_FALLBACK_ROWS:
            exact = self._exact(name, spec, queries[short], k, expr)
            for i, hits in zip(short, exact):
                results[i] = hits
        elif short:
            logger.warning("filtered search on %s returned fewer than k hits for %d queries (%d matches)",
                           name, len(short), matches)
        return results

    def search_where(self, name: str, vectors: np.ndarray, k: int, filter: str | None, on: str,
                     exclude_ids: Sequence[str] = ()) -> list[list[Hit]]:
        """Top-``k`` of ``name`` among the ids whose row in the collection ``on`` passes ``filter``: for vectors
        kept apart from the catalogue's fields (a learned model's item vectors), filtered by the catalogue as it is
        now. A few matching rows (at most EXACT_FILTER_ROWS) are searched by id; otherwise ``name`` is searched for
        twice ``k`` over the filter's share of ``on`` and the hits are checked against ``on`` in one query. A query
        left with fewer than ``k`` admitted hits (its neighbourhood is poor in matching rows) is searched again
        for four times as many, until it has ``k``, the collection has no more rows, or MAX_TOP_K was fetched;
        only then can it come back short."""
        if not (filter or "").strip():
            return self.search(name, vectors, k, None, exclude_ids)
        self._before_read(on)
        matches = self._cached_count(on, filter)
        if matches == 0:
            return [[] for _ in range(len(np.atleast_2d(vectors)))]
        if matches <= EXACT_FILTER_ROWS:
            return self.search(name, vectors, k, ids_filter(sorted(self._ids_where(on, filter, filter))), exclude_ids)
        total = max(matches, self._cached_count(on, ""))
        vectors = np.atleast_2d(vectors)
        fetch = min(MAX_TOP_K, -(-2 * k * total // matches))
        out: list[list[Hit]] = [[] for _ in range(len(vectors))]
        pending = list(range(len(vectors)))
        while pending:
            results = self.search(name, vectors[pending], fetch, None, exclude_ids)
            admitted = self._admitted(on, list(dict.fromkeys(h.item_id for hits in results for h in hits)), filter)
            short = []
            for i, hits in zip(pending, results):
                out[i] = [h for h in hits if h.item_id in admitted][:k]
                if len(out[i]) < k and len(hits) == fetch and fetch < MAX_TOP_K:  # more rows may match further out
                    short.append(i)
            pending, fetch = short, min(MAX_TOP_K, 4 * fetch)
        return out

    def _admitted(self, name: str, ids: list[str], filter: str, chunk: int = 1000) -> set[str]:
        """The ids among ``ids`` whose row in ``name`` passes ``filter``."""
        out: set[str] = set()
        for start in range(0, len(ids), chunk):
            out |= self._ids_where(name, f"({filter}) and {ids_filter(ids[start:start + chunk])}", filter)
        return out

    def _ids_where(self, name: str, expr: str, user_filter: str) -> set[str]:
        """The ids of the rows of ``name`` that pass ``expr`` (``user_filter``: the caller's part, for errors)."""
        return {str(r[PRIMARY_KEY]) for r in self._call("search", name, "query", name, filter=expr,
                                                         output_fields=[PRIMARY_KEY], user_filter=user_filter,
                                                         sent_filter=expr)}

    def _ann(self, name: str, spec: CollectionSpec, queries: np.ndarray, k: int, expr: str,
             user_filter: str | None, ef: int) -> list[list[Hit]]:
        params: dict[str, Any] = {"metric_type": "IP", "params": search_params(spec.index, k, ef)}
        res = self._call("search", name, "search", name, data=list(queries), limit=k,
                         filter=expr, output_fields=list(spec.fields), search_params=params,
                         anns_field=VECTOR_FIELD, consistency_level="Session", user_filter=user_filter,
                         sent_filter=expr)
        return [[Hit(item_id=str(h[PRIMARY_KEY] if PRIMARY_KEY in h else h["id"]),
                     score=float(h["distance"]), fields=dict(h.get("entity") or {})) for h in hits]
                for hits in res]

    def _forget_counts(self, name: str) -> None:
        for key in [key for key in self._counts if key[0] == name]:
            self._counts.pop(key, None)

    def _cached_count(self, name: str, user_filter: str) -> int:
        key, now = (name, user_filter.strip()), time.monotonic()
        hit = self._counts.get(key)
        if hit is None or hit[0] == 0 or now - hit[1] > COUNT_TTL_S:  # "none match" is never served stale
            hit = self._counts[key] = (self._count_matching(name, key[1], key[1] or None), now)
        return hit[0]

    def _count_matching(self, name: str, expr: str, user_filter: str | None) -> int:
        res = self._call("search", name, "query", name, filter=expr, output_fields=["count(*)"],
                         consistency_level="Session", user_filter=user_filter, sent_filter=expr)
        return int(res[0]["count(*)"]) if res else 0

    def _exact(self, name: str, spec: CollectionSpec, queries: np.ndarray, k: int, expr: str) -> list[list[Hit]]:
        """Brute-force top-k over the rows that match ``expr`` (used where the filter leaves few rows)."""
        ids: list[str] = []
        rows: list[np.ndarray] = []
        iterator = self._call("search", name, "query_iterator", name, batch_size=1000, filter=expr,
                              output_fields=[PRIMARY_KEY, VECTOR_FIELD])
        for page in self._iterate(name, iterator):
            ids.extend(r[PRIMARY_KEY] for r in page)
            rows.extend(r[VECTOR_FIELD] for r in page)
        if not ids:
            return [[] for _ in queries]
        scores = queries @ np.stack(rows).T
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        wanted = sorted({ids[j] for j in top.ravel()})
        fields = {r[PRIMARY_KEY]: {f: r[f] for f in spec.fields} for r in
                  self._get_rows(name, wanted, [PRIMARY_KEY, *spec.fields], consistency="Session")}
        return [[Hit(item_id=ids[j], score=float(scores[q, j]), fields=fields.get(ids[j], {})) for j in top[q]]
                for q in range(len(queries))]

    # ----------------------------------------------------------------------------------------- lifecycle

    def flush(self, name: str) -> None:
        """Persist and seal what was written (searches on Milvus Lite are fast only over flushed data)."""
        self._call("flush", name, "flush", name)
        self._dirty.discard(name)

    def close(self) -> None:
        """Release the connection (idempotent); on Milvus Lite, flush what this store wrote first."""
        if self._closed:
            return
        try:
            for name in sorted(self._dirty) if self.is_lite else ():
                try:
                    self.flush(name)
                except (StoreError, NotFoundError) as e:  # the server flushes by itself; closing must not fail
                    logger.warning("Could not flush %s while closing %s: %s", name, self.uri, e)
        finally:
            self._closed = True
            with self._muted():
                self._client.close()

    # ------------------------------------------------------------------------------------------ internals

    def _spec(self, name: str) -> CollectionSpec:
        spec = self._specs.get(name)
        return spec if spec is not None else self.describe(name)

    def _before_read(self, name: str) -> None:
        if self.is_lite and name in self._dirty:
            self.flush(name)

    def _create(self, spec: CollectionSpec) -> None:
        from pymilvus import DataType  # noqa: PLC0415

        kinds = {"str": DataType.VARCHAR, "float": DataType.DOUBLE, "int": DataType.INT64, "bool": DataType.BOOL,
                 "json": DataType.JSON}
        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(PRIMARY_KEY, DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=spec.dim)
        for fname, kind in spec.fields.items():
            extra = {"max_length": 65535} if kind == "str" else {}
            schema.add_field(fname, kinds[kind], **extra)
        index = self._client.prepare_index_params()
        index.add_index(VECTOR_FIELD, index_type=spec.index, metric_type="IP",
                        params=_INDEX_BUILD_PARAMS.get(spec.index, {}))
        properties = {_PROP_MODEL: spec.model, _PROP_DIM: str(spec.dim), _PROP_FIELDS: json.dumps(spec.fields),
                      _PROP_INDEX: spec.index}
        self._call("create", spec.name, "create_collection", spec.name, schema=schema,
                   index_params=index, consistency_level="Session", properties=properties)

    @staticmethod
    def _check_same(existing: CollectionSpec, wanted: CollectionSpec) -> None:
        if existing.model != wanted.model or existing.dim != wanted.dim:
            raise CollectionMismatchError(
                f"collection {wanted.name!r} holds vectors of model {existing.model!r} (dim {existing.dim}), not "
                f"{wanted.model!r} (dim {wanted.dim}); use another collection name or drop it first"
            )
        if existing.fields != wanted.fields:
            raise CollectionMismatchError(
                f"collection {wanted.name!r} has fields {existing.fields}, not {wanted.fields}; use another "
                "collection name or drop it first"
            )
        if existing.index != wanted.index:
            logger.warning("Collection %s keeps its index %s (asked for %s)", wanted.name, existing.index, wanted.index)

    def _get_rows(self, name: str, ids: list[str], fields: list[str], consistency: str,
                  timeout: float | None = None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for start in range(0, len(ids), _IDS_PER_REQUEST):
            chunk = ids[start:start + _IDS_PER_REQUEST]
            rows.extend(row_out(r) for r in self._call("get", name, "get", name, chunk, output_fields=fields,
                                                        consistency_level=consistency,
                                                        timeout=timeout or self._timeout))
        return rows

    @contextlib.contextmanager
    def _muted(self) -> Iterator[None]:
        token = _translating.set(True)
        try:
            yield
        finally:
            _translating.reset(token)

    def _call(self, op: str, name: str | None, method: str | Callable[..., T], *args: Any,
              user_filter: str | None = None, sent_filter: str | None = None, timed: bool = True,
              **kwargs: Any) -> T:
        """Run one pymilvus call (a MilvusClient method by name, or a callable) with this store's timeout,
        mapping every failure onto common.errors. A client method on a lost local server is retried once after
        the server is found or started again."""
        if self._closed:
            raise StoreError(f"vector store {self.uri!r} is closed")
        if timed:
            kwargs.setdefault("timeout", self._timeout)
        try:
            return self._call_once(op, name, method, args, kwargs, user_filter, sent_filter)
        except _NotLoaded:
            # A restarted server holds its collections released until someone loads them: load, then once more.
            logger.warning("collection %r was released (server restarted?); loading it again", name)
            self._call_once("load", name, "load_collection", (name,), {"timeout": self._timeout}, None, None)
            return self._call_once(op, name, method, args, kwargs, user_filter, sent_filter)
        except StoreUnavailableError:
            if self._data_dir is None or not isinstance(method, str):
                raise
            self._reconnect()
            return self._call_once(op, name, method, args, kwargs, user_filter, sent_filter)

    def _call_once(self, op: str, name: str | None, method: str | Callable[..., T], args: tuple[Any, ...],
                   kwargs: dict[str, Any], user_filter: str | None, sent_filter: str | None) -> T:
        import grpc  # noqa: PLC0415
        from pymilvus.exceptions import MilvusException  # noqa: PLC0415

        fn = getattr(self._client, method) if isinstance(method, str) else method
        try:
            with self._muted():
                return fn(*args, **kwargs)
        except MilvusException as e:
            raise self._translate(e.code, _one_line(str(e.message), sent_filter), op, name, user_filter) from e
        except grpc.RpcError as e:
            raise StoreUnavailableError(f"Milvus at {self.endpoint} failed during {op}: {e}") from e

    def _translate(self, code: Any, text: str, op: str, name: str | None, user_filter: str | None) -> Exception:
        low = text.lower()
        where = f" on collection {name!r}" if name else ""
        if name and op != "load" and ("state 'released'" in low or "not loaded" in low or "call load()" in low):
            return _NotLoaded(f"{op}{where}: {text}")
        if code in (2, 1) and ("connect" in low or "unavailable" in low or "unimplemented" in low) or \
                "deadline" in low or "timeout" in low or "timed out" in low:
            return StoreUnavailableError(f"Milvus at {self.endpoint} is unavailable ({op}{where}): {text}")
        if code == 100 or ("collection" in low and ("not found" in low or "not exist" in low)):
            self._specs.pop(name or "", None)
            return NotFoundError(f"collection {name!r} does not exist in vector store {self.uri!r}")
        if user_filter and op == "search" and _FILTER_HINT.search(low):
            return FilterError(f"invalid filter {user_filter!r}: {text}")
        self._specs.pop(name or "", None)  # a changed collection (dropped and recreated elsewhere) is re-read
        return StoreError(f"{op}{where} failed at {self.endpoint}: {text}")


# ----------------------------------------------------------------------------------------------- helpers


class _NotLoaded(StoreError):
    """A collection exists but is released (internal: ``MilvusStore._call`` loads it and retries)."""


def _reopen(uri: str, open_args: dict[str, float]) -> MilvusStore:
    return open_store(uri, **open_args)
