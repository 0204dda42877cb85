"""The embed job submitted to a local Ray head started like cluster/start-head.sh: with `ray job submit` (as
cluster/submit-embed.sh does) and with `vitrine submit` (follows the logs, returns the job's status)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.item_index import collection_name
from common.vector_store import open_store
from tests.jobs.test_embed_catalog import tiny_catalog, write

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head on loopback with its own ports and temp dir, stopped by its process group (not `ray stop`,
    which would also end the test session's own Ray)."""
    tmp_path = tmp_path_factory.mktemp("head")
    gcs, dash, agent = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_GCS_PORT": str(gcs), "RAY_DASHBOARD_PORT": str(dash), "RAY_DASHBOARD_AGENT_PORT": str(agent),
           "RAY_TEMP_DIR": str(Path("/tmp") / f"ray-test-{gcs}"), "RAY": str(BIN / "ray")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(["bash", str(ROOT / "cluster" / "start-head.sh"), "--num-cpus", "2", "--block"],
                            env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while time.time() < deadline:
        ok = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                            capture_output=True).returncode == 0
        if ok:
            break
        assert proc.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
        time.sleep(1)
    else:
        pytest.fail("the Ray head did not come up: " + (tmp_path / "head.log").read_text()[-2000:])
    yield {"address": address, "env": env}
    stop_group(proc)


def stop_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group led by ``proc``, then SIGKILL what is left of it after ``timeout`` seconds."""
    pgid = proc.pid
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline:
        proc.poll()  # reap the leader, or it lingers as a zombie member of the group
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(pgid, signal.SIGKILL)


def test_embed_job_runs_through_ray_job_submit(ray_head, store_dir, tmp_path):
    df = tiny_catalog(tmp_path, per_class=2)
    catalog = write(df, tmp_path / "catalog.parquet")
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_head["address"], "--working-dir", str(ROOT),
           "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"), "--",
           sys.executable, "-m", "vitrine.cli", "embed", "--catalog", catalog, "--collection", "submitted",
           "--precision", "fp32",  # 20 items: compiling the bf16 forward would cost more than it saves
           "--store", store_dir, "--artifacts", str(tmp_path / "artifacts")]
    for _ in range(15):  # the job agent registers a few seconds after the dashboard answers
        done = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=400)
        if "No available agent" not in done.stderr:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "embed submitted: items=20" in done.stdout
    assert "succeeded" in done.stdout
    store = open_store(store_dir)
    assert store.count(collection_name("submitted", "fused")) == 20


def test_vitrine_submit_follows_the_job_and_returns_its_status(ray_head, store_dir, tmp_path, capfd):
    from vitrine.cli import main

    df = tiny_catalog(tmp_path, per_class=1)
    catalog = write(df, tmp_path / "catalog.parquet")
    argv = ["submit", "--address", ray_head["address"], "--working-dir", str(ROOT), "embed", "--catalog", catalog,
            "--collection", "viasubmit", "--precision", "fp32", "--store", store_dir,
            "--artifacts", str(tmp_path / "artifacts")]
    assert main(argv) == 0
    out = capfd.readouterr().out
    assert "embed viasubmit: items=10" in out and "SUCCEEDED" in out  # the job's own summary line, followed
    assert open_store(store_dir).count(collection_name("viasubmit", "fused")) == 10
    missing = argv[:argv.index("--catalog") + 1] + [str(tmp_path / "missing.parquet")] + argv[argv.index(catalog) + 1:]
    assert main(missing) == 1  # the job fails on the cluster: its status comes back
    assert "FAILED" in capfd.readouterr().out
