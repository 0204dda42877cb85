"""Client side of the shared local Milvus Lite server: start one per data directory, find it, report on it, stop it.

A Milvus Lite data directory can be opened by one process only (it holds ``<data_dir>/LOCK``), yet Ray Data
actors and Ray Serve replicas in many processes must use the same collections. So the first process that opens
a local store starts one Milvus Lite gRPC server for that directory and every process on the machine connects
to it over loopback. Beside the data directory (``var/milvus`` -> in ``var/``) live:

- ``milvus.server.lock``: an ``fcntl`` lock that serialises start, reuse and stop across processes;
- ``milvus.server.json``: the running server's pid, port and start time (written by the server once it listens);
- ``milvus.server.log``: the server's output, appended across restarts.

The server (``common.milvus_lite_server``) runs in its own session, detached from the process that started it
(which may be a short-lived Ray worker), and lives until :func:`stop`.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError, StoreUnavailableError

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
SERVER_MODULE = "common.milvus_lite_server"  # what _spawn runs with `python -m`, and how /proc names it
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


def ensure_server(data_dir: str | os.PathLike[str], *, timeout: float = 60.0, port: int = 0) -> LocalServer:
    """Return the live server for ``data_dir``, starting one (detached) when none runs.

    ``port`` 0 picks a free loopback port; a fixed port lets clients hold an ``http://127.0.0.1:<port>`` URI
    across restarts (a running server keeps the port it has).

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
                    + log_tail_message(paths.log)
                )
            logger.warning(
                "Stale Milvus Lite state file %s: pid %d is gone; starting a new server", paths.state, pid
            )
            paths.state.unlink(missing_ok=True)
        return _spawn(paths, deadline, port)


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


def _spawn(paths: ServerPaths, deadline: float, port: int = 0) -> LocalServer:
    """Start a detached server (double fork, new session) and wait until it listens."""
    nonce = secrets.token_hex(8)
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    cmd = [
        sys.executable, "-m", SERVER_MODULE, "serve",
        "--data-dir", str(paths.data_dir), "--state-file", str(paths.state), "--nonce", nonce, "--port", str(port),
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
            f"The Milvus Lite server for {paths.data_dir} did not start. " + log_tail_message(paths.log)
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
                f"The Milvus Lite server for {paths.data_dir} exited during start-up. " + log_tail_message(paths.log)
            )
        time.sleep(_POLL_S)
    _signal(pid, signal.SIGKILL)
    raise StoreUnavailableError(
        f"The Milvus Lite server for {paths.data_dir} was not ready in time; killed pid {pid}. "
        + log_tail_message(paths.log)
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
    return SERVER_MODULE.encode() in cmdline and os.fsencode(str(data_dir)) in cmdline


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


def log_tail_message(path: Path) -> str:
    """The log's tail, headed by its path, for an error message."""
    tail = log_tail(path)
    return f"Log {path}:\n{tail}" if tail else f"Log {path} is empty."
