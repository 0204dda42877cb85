"""The shared Milvus Lite server process for one data directory (``python -m common.milvus_lite_server serve ...``).

:func:`common.milvus_local.ensure_server` starts it detached, in its own session; it serves on a free loopback port,
publishes its pid and port in the state file and lives until SIGTERM (:func:`common.milvus_local.stop`). Three
changes to Milvus Lite 3.2.2 apply inside this process only: gRPC's default ``SO_REUSEPORT`` is turned off (so two
servers can never share a port silently) and pymilvus' keep-alive pings are accepted; the RPCs that write are
serialised against every other RPC (its engine is single-writer per collection); and a collection is flushed once
writes to it pause for 1 s (or after 10 s of writing), because Milvus Lite searches unflushed rows by brute force in
Python, which costs seconds per query at 20k rows of 1280-d.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common.milvus_local import LOOPBACK

logger = logging.getLogger(__name__)


class _ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (so writes are not starved)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


_MUTATING_RPCS = frozenset({
    "CreateCollection", "DropCollection", "Insert", "Upsert", "Delete", "CreateIndex", "DropIndex",
    "LoadCollection", "ReleaseCollection", "CreatePartition", "DropPartition", "Flush", "TruncateCollection",
    "CreateDatabase", "DropDatabase", "AlterDatabase", "RenameCollection", "CreateAlias", "AlterAlias",
    "DropAlias", "AlterCollection", "LoadPartitions", "ReleasePartitions", "ManualCompaction",
})


_WRITE_RPCS = frozenset({"Insert", "Upsert", "Delete"})


class _AutoFlusher:
    """Flushes each collection once writes to it pause (or grow old), so that readers in other processes search
    flushed, indexed data even when no writer calls flush (unflushed rows are searched by brute force in Python:
    seconds per query at 20k x 1280)."""

    def __init__(self, idle_s: float = 1.0, max_age_s: float = 10.0) -> None:
        self._idle_s, self._max_age_s = idle_s, max_age_s
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], tuple[float, float]] = {}  # (db, collection) -> (first, last write)
        self._servicer: Any = None

    def written(self, servicer: Any, db_name: str, collection: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._servicer = servicer
            first, _ = self._pending.get((db_name, collection), (now, now))
            self._pending[(db_name, collection)] = (first, now)

    def flushed(self, db_name: str, collections: list[str]) -> None:
        with self._lock:
            for name in collections:
                self._pending.pop((db_name, name), None)

    def run(self, stopping: threading.Event) -> None:
        from pymilvus.grpc_gen import milvus_pb2  # noqa: PLC0415

        while not stopping.wait(0.2):
            now = time.monotonic()
            with self._lock:
                due = [key for key, (first, last) in self._pending.items()
                       if now - last >= self._idle_s or now - first >= self._max_age_s]
                servicer = self._servicer
            for db_name, name in due:
                t = time.monotonic()
                response = servicer.Flush(milvus_pb2.FlushRequest(db_name=db_name, collection_names=[name]), None)
                if response.status.code:
                    logger.warning("Auto-flush of %s.%s failed: %s", db_name, name, response.status.reason)
                    self.flushed(db_name, [name])
                else:
                    logger.info("Auto-flushed %s.%s in %.2f s", db_name, name, time.monotonic() - t)


def _guard_servicer(servicer_cls: type, lock: _ReadWriteLock, flusher: _AutoFlusher) -> None:
    """Wrap every RPC method: writes take the lock exclusively, reads shared; writes and flushes are reported
    to the auto-flusher."""

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        exclusive = name in _MUTATING_RPCS

        @functools.wraps(fn)
        def guarded(self: Any, request: Any, context: Any) -> Any:
            with (lock.write() if exclusive else lock.read()):
                response = fn(self, request, context)
            if name in _WRITE_RPCS and not response.status.code:
                flusher.written(self, self._database_name(request, context), request.collection_name)
            elif name == "Flush" and not response.status.code:
                flusher.flushed(self._database_name(request, context), list(request.collection_names))
            return response

        return guarded

    for name, fn in list(vars(servicer_cls).items()):
        if name[:1].isupper() and callable(fn):
            setattr(servicer_cls, name, wrap(name, fn))


_SERVER_GRPC_OPTIONS = (
    ("grpc.so_reuseport", 0),  # a port in use must fail to bind, not be shared with another server
    # pymilvus pings every 10 s, idle or not; under gRPC's default server policy the stock server drops an idle
    # client within a minute with GOAWAY "too_many_pings" (the client logs an error and reconnects; a call in
    # flight at that moment fails). Accept the pings, as the Milvus server does.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
    ("grpc.http2.max_ping_strikes", 0),
)


def _serve(data_dir: str, state_file: str, nonce: str, port: int = 0) -> int:
    """Body of the detached server: fork once more (so the starter's exit or cleanup cannot take it down),
    print the server's pid for the starter, listen on ``port`` (0: a free loopback port), publish the state file, and serve
    until SIGTERM/SIGINT, then drain and close the data directory."""
    child = os.fork()
    if child:
        sys.stdout.write(f"{child}\n")
        sys.stdout.flush()
        os._exit(0)
    os.dup2(2, 1)  # stdout joins stderr in the log file
    sys.stdout = sys.stderr

    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import grpc  # noqa: PLC0415 - only the server process needs these
    from milvus_lite import __version__ as lite_version  # noqa: PLC0415
    from milvus_lite.adapter.grpc import server as lite_server  # noqa: PLC0415
    from milvus_lite.adapter.grpc.servicer import MilvusServicer  # noqa: PLC0415

    grpc_server = grpc.server

    def server_without_reuseport(*args: Any, **kwargs: Any) -> Any:
        kwargs["options"] = [*(kwargs.get("options") or ()), *_SERVER_GRPC_OPTIONS]
        return grpc_server(*args, **kwargs)

    grpc.server = server_without_reuseport
    flusher = _AutoFlusher()
    _guard_servicer(MilvusServicer, _ReadWriteLock(), flusher)

    server, db, port = lite_server.start_server_in_thread(data_dir=data_dir, host=LOOPBACK, port=port)
    state = {
        "pid": os.getpid(), "port": port, "host": LOOPBACK, "data_dir": data_dir, "nonce": nonce,
        "started_at": time.time(), "milvus_lite_version": lite_version,
    }
    tmp = f"{state_file}.{os.getpid()}.tmp"
    Path(tmp).write_text(json.dumps(state))
    os.replace(tmp, state_file)
    logger.info("Milvus Lite %s serving %s on %s:%d (pid %d)", lite_version, data_dir, LOOPBACK, port, os.getpid())
    stopping = threading.Event()
    flushing = threading.Thread(target=flusher.run, args=(stopping,), name="auto-flush", daemon=True)
    flushing.start()
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        logger.info("Stopping: draining requests, then closing %s", data_dir)
    finally:
        stopping.set()
        server.stop(grace=5).wait()
        flushing.join(timeout=30)
        db.close()
    logger.info("Stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Internal entry point of the detached server process (``python -m common.milvus_lite_server serve ...``)."""
    parser = argparse.ArgumentParser(prog="python -m common.milvus_lite_server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the Milvus Lite server for a data directory (detaches)")
    serve.add_argument("--data-dir", required=True)
    serve.add_argument("--state-file", required=True)
    serve.add_argument("--nonce", required=True)
    serve.add_argument("--port", type=int, default=0, help="loopback port (0: a free one)")
    args = parser.parse_args(argv)
    return _serve(args.data_dir, args.state_file, args.nonce, args.port)


if __name__ == "__main__":
    raise SystemExit(main())
