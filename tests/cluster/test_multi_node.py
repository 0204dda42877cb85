"""A two-node Ray cluster on this machine (cluster/start-head.sh + cluster/start-worker.sh, each with its own
ports): the embed job submitted with `vitrine submit` runs on both nodes, and killing the worker node in the
middle of a job loses no item (Ray Data retries; every item ends in the store exactly once).

Slow (two Ray nodes, two embed runs): `make test-cluster` runs it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.item_index import collection_name
from common.vector_store import open_store
from tests.cluster.test_job_submit import BIN, ROOT, free_port, stop_group
from tests.jobs.test_embed_catalog import tiny_catalog, write

pytestmark = pytest.mark.slow


def _start(script: str, env: dict, log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(ROOT / "cluster" / script), *args, "--block"], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _alive_nodes(address: str, env: dict) -> int:
    from ray.util.state import list_nodes

    try:
        return sum(n.state == "ALIVE" for n in list_nodes(address=address))
    except Exception:  # noqa: BLE001 - the API is not up yet
        return 0


@pytest.fixture
def two_nodes(tmp_path):
    """Head (1 CPU) and one worker node (1 CPU) on loopback; both stopped by their process groups."""
    gcs, dash, agent = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_GCS_PORT": str(gcs), "RAY_DASHBOARD_PORT": str(dash),
           "RAY_DASHBOARD_AGENT_PORT": str(agent), "RAY": str(BIN / "ray"), "NODE": "1",
           "RAY_WORKER_PORT_BASE": str(30000 + gcs % 20000),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}  # a head that accepts more nodes (cluster/env.sh)
    env.pop("RAY_ADDRESS", None)
    head = _start("start-head.sh", {**env, "RAY_TEMP_DIR": f"/tmp/ray-mn-{gcs}"}, tmp_path / "head.log",
                  "--num-cpus", "1")
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while _alive_nodes(address, env) < 1:
        assert time.time() < deadline and head.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
        time.sleep(1)
    worker = _start("start-worker.sh", env, tmp_path / "worker.log", "--num-cpus", "1")
    while _alive_nodes(address, env) < 2:
        assert time.time() < deadline and worker.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
        time.sleep(1)
    nodes = {"address": address, "env": env, "head": head, "worker": worker}
    yield nodes
    for proc in (nodes["worker"], head):
        if proc.poll() is None:
            stop_group(proc)


def _submit(two_nodes, argv: list[str], follow: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vitrine.cli", "submit", "--address", two_nodes["address"], "--working-dir",
           str(ROOT), *([] if follow else ["--no-follow"]), *argv]
    return subprocess.Popen(cmd, env=two_nodes["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _embed_argv(tmp_path: Path, store_dir: str, name: str, per_class: int) -> list[str]:
    catalog = write(tiny_catalog(tmp_path, per_class=per_class), tmp_path / f"{name}.parquet")
    return ["embed", "--catalog", catalog, "--collection", name, "--precision", "fp32", "--encoders", "2",
            "--batch-size", "4", "--store", store_dir, "--artifacts", str(tmp_path / "artifacts")]


def _nodes_that_ran(address: str, job_submission_id: str) -> set[str]:
    from ray.util.state import list_jobs, list_tasks

    job_id = next(j.job_id for j in list_jobs(address=address) if j.submission_id == job_submission_id)
    return {t.node_id for t in list_tasks(address=address, filters=[("job_id", "=", job_id)], limit=10000,
                                          detail=True) if t.node_id}


def test_a_submitted_job_runs_on_both_nodes(two_nodes, store_dir, tmp_path):
    proc = _submit(two_nodes, _embed_argv(tmp_path, store_dir, "twonodes", 3), follow=True)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    submission = next(w for w in out.split() if w.startswith("raysubmit_"))
    assert len(_nodes_that_ran(two_nodes["address"], submission)) == 2, out[-2000:]
    assert open_store(store_dir).count(collection_name("twonodes", "fused")) == 30


def test_killing_the_worker_node_mid_job_loses_no_item(two_nodes, store_dir, tmp_path):
    from ray.job_submission import JobSubmissionClient

    n = 10 * 12
    proc = _submit(two_nodes, _embed_argv(tmp_path, store_dir, "survivor", 12), follow=False)
    out, _ = proc.communicate(timeout=120)
    submission = next(w for w in out.split() if w.startswith("raysubmit_"))
    client = JobSubmissionClient(two_nodes["address"])
    deadline = time.time() + 600
    while "encoded" not in client.get_job_logs(submission):  # some batches are through: kill mid-job
        assert time.time() < deadline and client.get_job_status(submission).is_terminal() is False
        time.sleep(0.5)
    stop_group(two_nodes["worker"], timeout=0.1)  # the worker node's raylet and workers die at once
    while not client.get_job_status(submission).is_terminal():
        assert time.time() < deadline, client.get_job_logs(submission)[-3000:]
        time.sleep(1)
    logs = client.get_job_logs(submission)
    assert str(client.get_job_status(submission)) == "SUCCEEDED", logs[-3000:]
    store = open_store(store_dir)
    name = collection_name("survivor", "fused")
    ids = [r["item_id"] for page in store.scan(name, ["item_id"]) for r in page]
    assert len(ids) == n == len(set(ids))  # every item, exactly once
