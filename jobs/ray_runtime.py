"""Connecting a job to Ray: the cluster in ``RAY_ADDRESS`` (as ``ray job submit`` sets it) or a local one."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None) -> None:
    """Connect once. Token auth is off unless ``RAY_AUTH_MODE`` says otherwise: Ray's default depends on a
    leftover ``~/.ray/auth_token`` and then breaks ``ray job submit`` (see README, Local cluster)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        log.info("starting a local Ray instance in this process")
        try:
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        except RuntimeError as e:  # seen once on a loaded 2-core machine: the GCS port file came too late
            if "Timed out waiting for file" not in str(e):
                raise
            log.warning("the local Ray start timed out (%s); retrying once", str(e).splitlines()[0][:160])
            ray.shutdown()
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)


def cluster_gpus() -> float:
    """GPUs in the connected cluster (0 when none): the one place that decides GPU vs CPU encoders."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))
