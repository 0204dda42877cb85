"""Local Milvus processes: the shared Milvus Lite server per data directory, and a Milvus standalone server.

A Milvus Lite data directory can be opened by one process only (it holds ``<data_dir>/LOCK``), yet Ray Data
actors and Ray Serve replicas in many processes must use the same collections. So the first process that opens
a local store starts one Milvus Lite gRPC server for that directory and every process on the machine connects
to it over loopback. Beside the data directory (``var/milvus`` -> in ``var/``) live:

- ``milvus.server.lock``: an ``fcntl`` lock that serialises start, reuse and stop across processes;
- ``milvus.server.json``: the running server's pid, port and start time (written by the server once it listens);
- ``milvus.server.log``: the server's output, appended across restarts.

The server runs in its own session, detached from the process that started it (which may be a short-lived Ray
worker), and lives until :func:`stop`. Three changes to Milvus Lite 3.2.2 apply inside the server process
only: gRPC's default ``SO_REUSEPORT`` is turned off (so two servers can never share a port silently) and
pymilvus' keep-alive pings are accepted; the RPCs that write are serialised against every other RPC (its engine
is single-writer per collection); and a collection is flushed once writes to it pause for 1 s (or after 10 s of
writing), because Milvus Lite searches unflushed rows by brute force in Python, which costs seconds per query at
20k rows of 1280-d.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError, StoreUnavailableError

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_LOG_TAIL_LINES = 30
_POLL_S = 0.05


@dataclass(frozen=True)
class ServerPaths:
    """Where the files that manage one data directory's server live."""

    data_dir: Path  # absolute Milvus Lite data directory
    lock: Path  # fcntl lock serialising start/stop
    state: Path  # JSON: pid, port, started_at (present while a server is believed to run)
    log: Path  # server stdout/stderr, appended


@dataclass(frozen=True)
class LocalServer:
    """A running Milvus Lite server for one data directory."""

    data_dir: str  # absolute path of the data directory it serves
    pid: int  # server process id
    port: int  # loopback port
    uri: str  # the address MilvusClient connects to: http://127.0.0.1:<port>
    started_at: float  # epoch seconds when it started listening
    log_path: str  # its log file
    reused: bool = False  # True when an already running server was found, False when this call started it


@dataclass(frozen=True)
class ServerStatus:
    """What :func:`status` found for a data directory."""

    data_dir: str  # absolute path of the data directory
    running: bool  # a live server answers on its port
    pid: int | None  # from the state file (None without one)
    port: int | None  # from the state file (None without one)
    uri: str | None  # the address to connect to, when running
    stale: bool  # a state file names a process that is gone
    log_path: str  # the server's log file


def server_paths(data_dir: str | os.PathLike[str]) -> ServerPaths:
    """The lock, state and log files for ``data_dir`` (kept in its parent, beside it)."""
    if not str(data_dir).strip():
        raise ConfigError("Milvus Lite data directory is empty; give a path such as 'var/milvus'")
    path = Path(os.path.realpath(os.path.expanduser(os.fspath(data_dir))))  # one server per directory, via any link
    parent, name = path.parent, path.name
    return ServerPaths(
        data_dir=path,
        lock=parent / f"{name}.server.lock",
        state=parent / f"{name}.server.json",
        log=parent / f"{name}.server.log",
    )


def ensure_server(data_dir: str | os.PathLike[str], *, timeout: float = 60.0) -> LocalServer:
    """Return the live server for ``data_dir``, starting one (detached) when none runs.

    Race-free across processes: the check and the start happen under the directory's lock. A state file whose
    process is gone is replaced. Raises StoreUnavailableError (with the server log's tail) when the server does
    not answer within ``timeout`` seconds.
    """
    paths = server_paths(data_dir)
    paths.data_dir.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with _locked(paths.lock, deadline):
        state = _read_state(paths.state)
        if state is not None:
            pid, port = int(state["pid"]), int(state["port"])
            if _is_server_process(pid, paths.data_dir):
                if _wait_port(port, pid, deadline, paths.data_dir):
                    return _server_from_state(state, paths, reused=True)
                raise StoreUnavailableError(
                    f"Milvus Lite server pid {pid} for {paths.data_dir} is alive but does not answer on port "
                    f"{port}; stop it with `vitrine milvus stop {paths.data_dir}`. "
                    + _log_tail_message(paths.log)
                )
            logger.warning(
                "Stale Milvus Lite state file %s: pid %d is gone; starting a new server", paths.state, pid
            )
            paths.state.unlink(missing_ok=True)
        return _spawn(paths, deadline)


def status(data_dir: str | os.PathLike[str]) -> ServerStatus:
    """Report whether a server runs for ``data_dir`` (reads the state file; takes no lock, starts nothing)."""
    paths = server_paths(data_dir)
    state = _read_state(paths.state)
    if state is None:
        return ServerStatus(str(paths.data_dir), False, None, None, None, False, str(paths.log))
    pid, port = int(state["pid"]), int(state["port"])
    alive = _is_server_process(pid, paths.data_dir)
    running = alive and _port_open(port)
    return ServerStatus(
        data_dir=str(paths.data_dir),
        running=running,
        pid=pid,
        port=port,
        uri=f"http://{LOOPBACK}:{port}" if running else None,
        stale=not alive,
        log_path=str(paths.log),
    )


def stop(data_dir: str | os.PathLike[str], *, timeout: float = 20.0) -> bool:
    """Stop the server for ``data_dir`` (SIGTERM: it drains and closes the data; SIGKILL after ``timeout``).

    Returns True when a live server was stopped, False when none ran (a stale state file is removed).
    """
    paths = server_paths(data_dir)
    if not paths.lock.parent.is_dir():
        return False
    deadline = time.monotonic() + timeout
    with _locked(paths.lock, deadline + 10.0):
        state = _read_state(paths.state)
        if state is None:
            return False
        pid = int(state["pid"])
        stopped = False
        if _is_server_process(pid, paths.data_dir):
            _signal(pid, signal.SIGTERM)
            if not _wait_exit(pid, deadline):
                logger.warning("Milvus Lite server pid %d ignored SIGTERM for %.0f s; killing it", pid, timeout)
                _signal(pid, signal.SIGKILL)
                _wait_exit(pid, time.monotonic() + 5.0)
            stopped = True
            logger.info("Stopped Milvus Lite server pid %d for %s", pid, paths.data_dir)
        paths.state.unlink(missing_ok=True)
        return stopped


# ---------------------------------------------------------------------------------------------- start-up


def _spawn(paths: ServerPaths, deadline: float) -> LocalServer:
    """Start a detached server (double fork, new session) and wait until it listens."""
    nonce = secrets.token_hex(8)
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    cmd = [
        sys.executable, "-m", "common.milvus_local", "serve",
        "--data-dir", str(paths.data_dir), "--state-file", str(paths.state), "--nonce", nonce,
    ]
    with open(paths.log, "ab") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} started by pid {os.getpid()}\n".encode())
        log.flush()
        try:
            launcher = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                env=env, cwd=str(paths.data_dir.parent), close_fds=True, start_new_session=True,
            )
        except OSError as e:
            raise StoreUnavailableError(f"Cannot start the Milvus Lite server ({cmd[0]}): {e}") from e
    assert launcher.stdout is not None
    with launcher.stdout:
        first_line = launcher.stdout.readline().decode(errors="replace").strip()
    launcher.wait()
    if not first_line.isdigit():
        raise StoreUnavailableError(
            f"The Milvus Lite server for {paths.data_dir} did not start. " + _log_tail_message(paths.log)
        )
    pid = int(first_line)
    while time.monotonic() < deadline:
        state = _read_state(paths.state)
        if state is not None and state.get("nonce") == nonce and _port_open(int(state["port"])):
            server = _server_from_state(state, paths, reused=False)
            logger.info("Started Milvus Lite server pid %d on %s for %s", pid, server.uri, paths.data_dir)
            return server
        if not _pid_alive(pid):
            raise StoreUnavailableError(
                f"The Milvus Lite server for {paths.data_dir} exited during start-up. " + _log_tail_message(paths.log)
            )
        time.sleep(_POLL_S)
    _signal(pid, signal.SIGKILL)
    raise StoreUnavailableError(
        f"The Milvus Lite server for {paths.data_dir} was not ready in time; killed pid {pid}. "
        + _log_tail_message(paths.log)
    )


def _server_from_state(state: dict[str, Any], paths: ServerPaths, *, reused: bool) -> LocalServer:
    return LocalServer(
        data_dir=str(paths.data_dir),
        pid=int(state["pid"]),
        port=int(state["port"]),
        uri=f"http://{LOOPBACK}:{int(state['port'])}",
        started_at=float(state.get("started_at", 0.0)),
        log_path=str(paths.log),
        reused=reused,
    )


@contextlib.contextmanager
def _locked(lock_path: Path, deadline: float) -> Iterator[None]:
    """Hold an exclusive fcntl lock on ``lock_path`` (polls until ``deadline``)."""
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreUnavailableError(
                        f"Timed out waiting for the lock {lock_path} (another process is starting or stopping "
                        "the Milvus Lite server)"
                    ) from None
                time.sleep(_POLL_S)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _read_state(path: Path) -> dict[str, Any] | None:
    """The state file's content, or None when absent or unreadable (an interrupted write counts as absent)."""
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("Ignoring unreadable Milvus Lite state file %s: %s", path, e)
        return None
    if not isinstance(state, dict) or "pid" not in state or "port" not in state:
        logger.warning("Ignoring malformed Milvus Lite state file %s", path)
        return None
    return state


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")  # a zombie has exited


def _is_server_process(pid: int, data_dir: Path) -> bool:
    """Alive, and (where /proc tells) really our server for this directory, not a recycled pid."""
    if not _pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True
    return b"common.milvus_local" in cmdline and os.fsencode(str(data_dir)) in cmdline


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_port(port: int, pid: int, deadline: float, data_dir: Path) -> bool:
    while True:
        if _port_open(port):
            return True
        if time.monotonic() >= deadline or not _is_server_process(pid, data_dir):
            return False
        time.sleep(_POLL_S)


def _wait_exit(pid: int, deadline: float) -> bool:
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def log_tail(path: str | os.PathLike[str], lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _log_tail_message(path: Path) -> str:
    tail = log_tail(path)
    return f"Log {path}:\n{tail}" if tail else f"Log {path} is empty."


# ------------------------------------------------------------------------------- the server process itself


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


def _serve(data_dir: str, state_file: str, nonce: str) -> int:
    """Body of the detached server: fork once more (so the starter's exit or cleanup cannot take it down),
    print the server's pid for the starter, listen on a free loopback port, publish the state file, and serve
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

    server, db, port = lite_server.start_server_in_thread(data_dir=data_dir, host=LOOPBACK, port=0)
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


# ----------------------------------------------------------------------- the Milvus standalone server


@dataclass
class StandaloneServer:
    """A running Milvus standalone server (PyPI package ``milvus``), owned by the process that started it."""

    base_dir: str  # its config, logs and data
    port: int  # gRPC port on loopback
    _server: Any  # milvus.MilvusServer

    @property
    def uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        proc = self._server.server_proc
        return proc.pid if proc is not None else None

    def stop(self) -> None:
        """Terminate the server (idempotent)."""
        self._server.stop()


_STANDALONE_COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")


def start_standalone(base_dir: str | os.PathLike[str], port: int = 0, *, timeout: float = 120.0) -> StandaloneServer:
    """Start the Milvus standalone server from the PyPI package ``milvus`` under ``base_dir`` on ``port``
    (0: a free one), every component bound to loopback. One per machine (it locks ``/run/milvus``).

    Raises StoreUnavailableError when the package is missing or the server does not become healthy.
    """
    try:
        from milvus import MilvusServer, MilvusServerConfig  # noqa: PLC0415 - optional test/benchmark dependency
    except ImportError as e:
        raise StoreUnavailableError(
            "The Milvus standalone server needs the PyPI package `milvus` (pip install 'milvus==2.3.5')"
        ) from e
    base = Path(base_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    config = MilvusServerConfig(data_dir=str(base))
    for component in _STANDALONE_COMPONENTS:
        config.extra_configs[f"{component}.ip"] = LOOPBACK
    server = MilvusServer(config, wait_for_started=False)
    server.listen_port = port or _free_port()
    try:
        server.start()
        server.wait_started(timeout=int(timeout * 1000))
    except (RuntimeError, TimeoutError, OSError) as e:
        server.stop()
        log = base / "logs" / "milvus-stdout.log"
        raise StoreUnavailableError(
            f"The Milvus standalone server under {base} did not start: {e}. " + _log_tail_message(log)
        ) from e
    handle = StandaloneServer(base_dir=str(base), port=server.listen_port, _server=server)
    logger.info("Milvus standalone pid %s serving %s", handle.pid, handle.uri)
    return handle


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    """Internal entry point of the detached server process (``python -m common.milvus_local serve ...``)."""
    parser = argparse.ArgumentParser(prog="python -m common.milvus_local")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the Milvus Lite server for a data directory (detaches)")
    serve.add_argument("--data-dir", required=True)
    serve.add_argument("--state-file", required=True)
    serve.add_argument("--nonce", required=True)
    args = parser.parse_args(argv)
    return _serve(args.data_dir, args.state_file, args.nonce)


if __name__ == "__main__":
    raise SystemExit(main())
