"""A Milvus standalone server (PyPI package ``milvus``) on loopback, started and owned by one process."""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import StoreUnavailableError
from common.milvus_local import LOOPBACK, log_tail_message

logger = logging.getLogger(__name__)


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


# The proxy's time tick (Milvus' default: 200 ms). A write becomes visible to other clients, and a "Strong" read
# returns, once the tick passes it: 260-500 ms after the acknowledgement at 200 ms, 15-38 ms at 20 ms, measured
# here on Milvus 2.3.5. The price is the ticks themselves: the idle server's CPU rose from 2.5% to 11.8% of a core
# (20.2% at 10 ms). Live sessions (POST /events, then the next recommendation) need the short tick.
TIME_TICK_MS = 20

_STANDALONE_COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")


def start_standalone(base_dir: str | os.PathLike[str], port: int = 0, *, timeout: float = 120.0,
                     time_tick_ms: int = TIME_TICK_MS) -> StandaloneServer:
    """Start the Milvus standalone server from the PyPI package ``milvus`` under ``base_dir`` on ``port``
    (0: a free one), every component bound to loopback, with the proxy's time tick at ``time_tick_ms``
    (see ``TIME_TICK_MS``). One per machine (it locks ``/run/milvus``).

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
    config.extra_configs["proxy.timeTickInterval"] = int(time_tick_ms)
    server = MilvusServer(config, wait_for_started=False)
    server.listen_port = port or _free_port()
    try:
        server.start()
        server.wait_started(timeout=int(timeout * 1000))
    except (RuntimeError, TimeoutError, OSError) as e:
        server.stop()
        log = base / "logs" / "milvus-stdout.log"
        raise StoreUnavailableError(
            f"The Milvus standalone server under {base} did not start: {e}. " + log_tail_message(log)
        ) from e
    handle = StandaloneServer(base_dir=str(base), port=server.listen_port, _server=server)
    logger.info("Milvus standalone pid %s serving %s", handle.pid, handle.uri)
    return handle


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])
