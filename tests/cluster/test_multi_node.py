"""A two-node Ray cluster on this machine (cluster/start-head.sh + cluster/start-worker.sh, each with its own
ports): the embed job submitted with `vitrine submit` runs on both nodes, and killing the worker node in the
middle of a job loses no item (Ray Data retries; every item ends in the store exactly once); the Serve graph
deployed across both nodes keeps answering while the worker node is stopped and started again, and loses no
acknowledged event.

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
from tests.serve.conftest import shop  # noqa: F401 - the tiny shop fixture (embedded, rules, profiles, ranker)

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
def two_nodes(tmp_path, request):
    """Head and one worker node (1 CPU each, or ``(head, worker)`` CPUs from the test's parameter) on loopback;
    both stopped by their process groups."""
    head_cpus, worker_cpus = getattr(request, "param", (1, 1))
    gcs, dash, agent = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_GCS_PORT": str(gcs), "RAY_DASHBOARD_PORT": str(dash),
           "RAY_DASHBOARD_AGENT_PORT": str(agent), "RAY": str(BIN / "ray"), "NODE": "1",
           "RAY_WORKER_PORT_BASE": str(30000 + gcs % 20000),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}  # a head that accepts more nodes (cluster/env.sh)
    env.pop("RAY_ADDRESS", None)
    head = _start("start-head.sh", {**env, "RAY_TEMP_DIR": f"/tmp/ray-mn-{gcs}"}, tmp_path / "head.log",
                  "--num-cpus", str(head_cpus))
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    started = [head]  # stopped at the end even when the set-up fails half-way
    def start_worker(wait_until: float) -> subprocess.Popen:
        worker = _start("start-worker.sh", env, tmp_path / "worker.log", "--num-cpus", str(worker_cpus))
        started.append(worker)
        while _alive_nodes(address, env) < 2:
            assert time.time() < wait_until and worker.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
            time.sleep(1)
        return worker

    nodes = {"address": address, "gcs": f"127.0.0.1:{gcs}", "env": env, "head": head, "start_worker": start_worker}
    try:
        while _alive_nodes(address, env) < 1:
            assert time.time() < deadline and head.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(1)
        nodes["worker"] = start_worker(deadline)
        yield nodes
    finally:
        for proc in (nodes.get("worker"), *started):
            if proc is not None and proc.poll() is None:
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


@pytest.mark.parametrize("two_nodes", [(2, 1)], indirect=True)
def test_serve_across_nodes_keeps_answering_while_a_node_restarts(two_nodes, shop, tmp_path):
    import threading

    import requests
    import yaml
    from ray.util.state import list_actors

    from common.event_log import EventLog
    from tests.serve.conftest import BASE, free_port

    port = free_port()
    one = {"num_cpus": 0.1, "min_replicas": 1, "max_replicas": 1}
    settings = {"collection": BASE, "store_uri": shop["store"], "artifacts_uri": shop["artifacts"],
                "events": str(shop["tmp"] / "events.parquet"), "users": str(shop["tmp"] / "users.parquet"),
                "event_log": str(tmp_path / "event_log"), "port": port, "proxy_location": "HeadOnly",
                "ingress": one, "reranker": one, "business_filter": one, "text_encoder": one,
                "retriever": {**one, "min_replicas": 2, "max_replicas": 2},
                "events_sink": {**one, "min_replicas": 2, "max_replicas": 2}}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(settings))
    deploy = subprocess.run([sys.executable, "-m", "vitrine.cli", "serve", "--address", two_nodes["gcs"],
                             "--config", str(tmp_path / "serve.yaml")], env=two_nodes["env"], capture_output=True,
                            text=True, timeout=600)
    assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-3000:]
    replicas = [a for a in list_actors(address=two_nodes["address"], filters=[("state", "=", "ALIVE")])
                if (a.class_name or "").startswith("ServeReplica")]
    assert len({a.node_id for a in replicas}) == 2  # replicas placed on both nodes
    url = f"http://127.0.0.1:{port}"
    users, items = shop["events"]["user_id"].unique()[:5], shop["items"]["item_id"].tolist()
    statuses: list[int] = []
    acked: list[str] = []
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = requests.get(f"{url}/users/{users[i % len(users)]}/recommendations", timeout=10)
                statuses.append(r.status_code)
                e = requests.post(f"{url}/events", timeout=10, json={"events": [
                    {"user_id": f"roaming-{i % 7}", "item_id": items[i % len(items)], "event": "view",
                     "session_id": f"ack-{i}"}]})
                statuses.append(e.status_code)
                if e.status_code == 200:
                    acked.append(f"ack-{i}")
            except requests.RequestException:
                statuses.append(0)
            time.sleep(0.05)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(8)
        stop_group(two_nodes["worker"], timeout=5)  # the worker node goes away ...
        time.sleep(10)
        two_nodes["worker"] = two_nodes["start_worker"](time.time() + 120)  # ... and comes back
        time.sleep(10)
        tail = len(statuses)
        time.sleep(8)
    finally:
        stop.set()
        thread.join(timeout=30)
    errors = sum(s != 200 for s in statuses)
    print(f"serve across nodes: {errors} errors of {len(statuses)} requests "
          f"({sorted(set(statuses))}); {len(acked)} events acknowledged")
    assert len(statuses) > 50 and errors <= 0.25 * len(statuses), f"{errors} errors of {len(statuses)}"
    assert all(s == 200 for s in statuses[tail:]), statuses[tail:]  # recovered once the node was back
    logged = set(EventLog(str(tmp_path / "event_log")).read()["session_id"])
    assert set(acked) <= logged and acked  # no acknowledged event lost
