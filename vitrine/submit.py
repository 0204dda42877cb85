"""`vitrine submit JOB ...`: a batch job through Ray's job API (what `ray job submit` does), logs followed to the
end, the job's own exit status returned.

The job's arguments are parsed here first with the same parser the job will use, so a typo fails in a second
instead of after the upload. The job runs in a copy of ``--working-dir`` on the cluster: give it URIs (s3://,
gs://, http://milvus:19530) or absolute paths that exist on the cluster's nodes.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from common.errors import ConfigError, VitrineError

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # the dashboard of a head started by cluster/start-head.sh
EXCLUDES = [".venv", "var", ".git", "__pycache__", ".pytest_cache"]  # never uploaded with the working dir
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def entrypoint(job_argv: Sequence[str], python: str) -> str:
    """The shell command the cluster runs: ``python -m vitrine.cli <job argv>``."""
    return shlex.join([python, "-m", "vitrine.cli", *job_argv])


def check_job_argv(job_argv: Sequence[str]) -> None:
    """Parse the job's arguments as `vitrine` will on the cluster; ConfigError naming the problem otherwise."""
    from vitrine.cli import build_parser

    if not job_argv:
        raise ConfigError("name the job to submit, e.g. `vitrine submit embed --catalog s3://shop/catalog.parquet`")
    if job_argv[0] in ("submit", "serve", "milvus", "sample"):
        raise ConfigError(f"`{job_argv[0]}` is not a batch job; submit embed, rules, profiles, align, train, eval")
    try:
        build_parser().parse_args(list(job_argv))
    except SystemExit as e:  # argparse printed its message to stderr already
        raise ConfigError(f"the job's arguments do not parse: {shlex.join(job_argv)}") from e


def runtime_env(working_dir: str, file: str | None, env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if file:
        try:
            out = yaml.safe_load(Path(file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read the runtime env file {file}: {e}") from e
    out["working_dir"] = str(Path(working_dir).resolve())
    out["excludes"] = sorted(set(out.get("excludes") or []) | set(EXCLUDES))
    out["env_vars"] = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), **(out.get("env_vars") or {}),
                       **env}
    return out


def default_python(address: str) -> str:
    """On a head on this machine the workers run this environment's Python; elsewhere the nodes' `python`."""
    return sys.executable if urlparse(address).hostname in LOOPBACK else "python"


async def _follow(client: Any, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def submit(job_argv: Sequence[str], address: str = DEFAULT_ADDRESS, working_dir: str = ".",
           runtime_env_file: str | None = None, env: Mapping[str, str] | None = None, python: str | None = None,
           follow: bool = True, timeout: float = 24 * 3600.0) -> int:
    """Submit, follow the logs, wait for the end; 0 when the job succeeded, 1 when it failed or was stopped."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    check_job_argv(job_argv)
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise VitrineError(f"cannot reach the Ray job API at {address}: {str(e).splitlines()[0]}") from e
    command = entrypoint(job_argv, python or default_python(address))
    job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env(working_dir, runtime_env_file, env or {}))
    print(f"submitted {job_id} to {address}: {command}", flush=True)
    if follow:
        asyncio.run(_follow(client, job_id))
    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.monotonic() > deadline:
            raise VitrineError(f"job {job_id} still {status} after {timeout:.0f} s")
        time.sleep(1.0)
    info = client.get_job_info(job_id)
    print(f"job {job_id} {status}" + (f": {info.message}" if status != JobStatus.SUCCEEDED and info.message else ""))
    return 0 if status == JobStatus.SUCCEEDED else 1
