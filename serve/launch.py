"""Start and stop the service on a Ray cluster: the one named by ``--address`` / ``RAY_ADDRESS``, a local head
that is already running, or a local head started here (so the service outlives the command, like ``serve run``
on a cluster)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from common.errors import ConfigError, VitrineError
from serve.config import ServeConfig

log = logging.getLogger(__name__)

APP_NAME = "vitrine"
LOCAL_HEAD = ("--head", "--node-ip-address", "127.0.0.1", "--port", "6379", "--dashboard-host", "127.0.0.1",
              "--include-dashboard", "true", "--disable-usage-stats")  # the settings of cluster/start-head.sh


def _ray_cli() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def started_marker() -> Path:
    """Where `vitrine serve` notes the Ray session of a local head it started (beside the other var/ state)."""
    from common.config import resolve_uri

    return Path(resolve_uri("var/ray-head-started-by-vitrine.json"))


def _session_name() -> str:
    """The connected cluster's session (a new one each time a head starts)."""
    import ray

    return str(ray._private.worker.global_worker.node.session_name)


def connect(address: str | None = None, start_local: bool = True) -> str:
    """Connect this process to Ray; start a local head (loopback) when none runs and ``start_local``, and note its
    session (``started_marker``), so that ``stop`` stops only a head this command started."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        if start_local and address == "auto" and not _started_here():
            log.info("joined the local Ray cluster already running (%s CPUs); `vitrine serve --stop` will leave it "
                     "running", ray.cluster_resources().get("CPU"))
        return address
    except ConnectionError:
        if address != "auto" or not start_local:
            raise
    log.info("no Ray cluster running: starting a local head (stop it with `vitrine serve --stop`)")
    done = subprocess.run([_ray_cli(), "start", *LOCAL_HEAD], capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise VitrineError(f"`ray start --head` failed: {(done.stderr or done.stdout).strip()[-400:]}")
    ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)
    marker = started_marker()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"session": _session_name(), "started": time.time()}))
    return "auto"


def wait_ready(url: str, timeout: float = 300.0) -> dict:
    """Poll ``/readyz`` until it answers 200; VitrineError with the last answer when it never does."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            last = f"{e.code} {e.read().decode(errors='replace')[:300]}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(1.0)
    raise VitrineError(f"the service at {url} did not become ready in {timeout:.0f} s: {last}")


def app_config(cfg: ServeConfig) -> dict[str, Any]:
    """The Serve config (``serve deploy`` / RayService ``serveConfigV2`` schema) that runs ``cfg``.

    The business rules travel as the BusinessFilter's ``user_config``, not as an application argument: deploying
    again with only new rules is then a lightweight update (``reconfigure`` on the running replicas), while a
    change of any argument restarts the graph.
    """
    args = cfg.to_dict()
    rules = args.pop("rules") or {}
    return {
        "proxy_location": cfg.proxy_location,
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [{
            "name": APP_NAME, "route_prefix": "/", "import_path": "serve.app:build_app", "args": args,
            "deployments": [{"name": "BusinessFilter", "user_config": dict(rules)}],
        }],
    }


def deploy(cfg: ServeConfig) -> None:
    """Apply ``app_config(cfg)`` to the connected cluster's Serve (starting Serve when it is not running).

    This is what the dashboard's ``PUT /api/serve/applications/`` (``serve deploy``) does, without needing the
    dashboard; it goes through Serve's controller client (``ray.serve._private``: no public Python API applies a
    declarative config in Ray 2.60).
    """
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(app_config(cfg))
    client = serve_start(http_options=config.http_options.model_dump(), proxy_location=config.proxy_location)
    client.deploy_apps(config)


def start(cfg: ServeConfig, address: str | None = None, timeout: float = 300.0) -> str:
    """Deploy the graph (a running one is updated in place) and wait until it is ready; returns its base URL."""
    connect(address)
    deploy(cfg)
    url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
    wait_ready(url, timeout)
    return url


def stop(address: str | None = None, stop_ray: bool = True) -> None:
    """Shut the service down; then stop the local Ray head too (``ray stop``) when `vitrine serve` started it (its
    session is the one noted in ``started_marker``) and not told otherwise; a cluster started by someone else
    keeps running."""
    from ray import serve

    try:
        connect(address, start_local=False)
    except ConnectionError:
        log.info("no Ray cluster running: nothing to stop")
        started_marker().unlink(missing_ok=True)
        return
    serve.shutdown()
    if stop_ray and not (address or os.environ.get("RAY_ADDRESS")):
        import ray

        ours = _started_here()
        ray.shutdown()
        if ours:
            subprocess.run([_ray_cli(), "stop"], capture_output=True, timeout=120)
            started_marker().unlink(missing_ok=True)
        else:
            log.info("the local Ray cluster was not started by `vitrine serve`: left running (`ray stop` stops it)")


def _started_here() -> bool:
    """Whether the connected cluster is the local head `vitrine serve` started (by its noted session)."""
    try:
        noted = json.loads(started_marker().read_text())
    except (OSError, ValueError):
        return False
    return noted.get("session") == _session_name()


def examples(url: str, item_id: str, user_id: str) -> str:
    """curl calls to try, printed by `vitrine serve`."""
    if not url.startswith("http"):
        raise ConfigError(f"not an HTTP URL: {url!r}")
    return "\n".join([
        f"curl -s '{url}/items/{item_id}/similar?k=5'",
        f"curl -s '{url}/items/{item_id}/bought-together?k=5'",
        f"curl -s '{url}/users/{user_id}/recommendations?k=5'",
        f"curl -s '{url}/users/new-shopper/recommendations?k=5&age=29&region=PL'",
        f"curl -s '{url}/search?q=black+ankle+boots&k=5&price_max=80'",
        f"curl -s -X POST '{url}/events' -H 'content-type: application/json' "
        f"-d '{{\"events\": [{{\"user_id\": \"new-shopper\", \"item_id\": \"{item_id}\", \"event\": \"view\"}}]}}'",
        f"curl -s '{url}/docs'   # OpenAPI",
    ])
