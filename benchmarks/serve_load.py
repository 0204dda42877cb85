"""Benchmark: the serving graph under HTTP load, beside the same graph with no-op stages and a one-process baseline.

Systems, each served by its own child process on loopback while this process generates the load:

- ``serve``: the real graph (``serve.app.build_app``) on a local Ray, over a Milvus standalone server (HNSW);
- ``noop``: the same hops as serve/ingress.py with canned answers: Ingress (business rules cached 1 s) ->
  Retriever -> Reranker -> BusinessFilter, each response handed to the next stage unawaited; the payload is a real
  Retrieval of the serve graph (candidates with fields and reasons, no vectors; sampled by ``sample_payload`` from
  the Retriever class run in-process before the systems start): what Ray Serve itself costs per request;
- ``fastapi``: one FastAPI + uvicorn process with numpy brute-force cosine over the same vectors (what the source
  projects did);
- ``serve-tput`` / ``noop-tput``: the same with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` set before Ray starts.

Per endpoint: closed-loop clients (``--clients`` in flight, each sends its next request when the last one answered)
for ``--seconds`` or ``--max-requests``; then the target run: ``GET /users/{id}/recommendations`` paced at
``--rate`` requests/s for ``--target-seconds``, latency measured from each request's scheduled start (no coordinated
omission). CPU seconds of every process of the system (grouped by Ray deployment) and of the Milvus server are
sampled per segment: they name what limits throughput. No assertions: the README records what it measured.
The data set is synthetic (see ``benchmarks/serve_load_data.py``) and cached under ``--work``.

    flock /tmp/vitrine-ray.lock flock /tmp/vitrine-standalone.lock python -m benchmarks.serve_load --items 5000 \\
        --users 500 --seconds 10 --target-seconds 15 --out var/bench/serve_load_small.json
    flock /tmp/vitrine-ray.lock flock /tmp/vitrine-standalone.lock python -m benchmarks.serve_load --items 100000 \\
        --users 2000 --seconds 10 --warmup 2 --target-seconds 60 --out var/bench/serve_load.json

The Milvus server is waited on until idle (index builds) before the systems start, before each system and before
each paced run (POST /events writes session rows just before it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common.milvus_standalone import TIME_TICK_MS

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.serve_load")

SYSTEMS = ("fastapi", "noop", "noop-tput", "serve", "serve-tput")
ENDPOINTS = ("recommendations", "similar", "bought_together", "search", "events")
BASELINE_ENDPOINTS = ("recommendations", "similar", "search", "events")  # no rules in the one-process baseline
QUERIES = ("red summer dress", "black leather boot", "white cotton t-shirt", "warm wool coat", "navy denim jeans",
           "vintage silk scarf", "sporty sneaker", "elegant bag", "beige linen trouser", "knit winter sweater",
           "oversized pullover", "brown suede belt", "classic watch", "green cropped jacket", "pink sandal")
Request = tuple[str, str, Any]  # method, path, JSON body
ERROR_SAMPLES: dict[str, str] = {}  # first answer body of each error kind (of the current system)


# ------------------------------------------------------------------------------------------------ load generation


def _summary(latencies_ms: list[float], errors: dict[str, int], seconds: float) -> dict[str, Any]:
    lat = np.sort(np.asarray(latencies_ms, dtype=np.float64))
    ok = len(lat)
    out: dict[str, Any] = {"requests": ok + sum(errors.values()), "ok": ok, "errors": sum(errors.values()),
                           "error_kinds": errors, "seconds": round(seconds, 2), "qps": round(ok / seconds, 1)}
    if ok:
        out.update({f"p{q}_ms": round(float(np.percentile(lat, q)), 2) for q in (50, 95, 99)})
        out["max_ms"] = round(float(lat[-1]), 2)
    return out


async def _send(session: Any, base: str, req: Request, timeout: float) -> str | None:
    """One request; None on a 2xx answer, else a short error kind."""
    import aiohttp

    method, path, body = req
    try:
        async with session.request(method, base + path, json=body,
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            body = await resp.read()
            if resp.status < 300:
                return None
            kind = f"http_{resp.status}"
            ERROR_SAMPLES.setdefault(kind, body[:300].decode(errors="replace"))
            return kind
    except asyncio.TimeoutError:
        return "timeout"
    except aiohttp.ClientError as e:
        return type(e).__name__


async def closed_loop(base: str, make: Callable[[random.Random], Request], clients: int, seconds: float,
                      max_requests: int, timeout: float, seed: int = 0) -> dict[str, Any]:
    """``clients`` workers, each sending its next request when the previous one answered."""
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    deadline = time.perf_counter() + seconds

    async def worker(i: int, session: Any) -> None:
        nonlocal sent
        rng = random.Random(seed * 1000 + i)
        while time.perf_counter() < deadline and sent < max_requests:
            sent += 1
            t = time.perf_counter()
            err = await _send(session, base, make(rng), timeout)
            if err is None:
                latencies.append((time.perf_counter() - t) * 1e3)
            else:
                errors[err] = errors.get(err, 0) + 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i, session) for i in range(clients)))
        elapsed = time.perf_counter() - t0
    return {"mode": "closed", "clients": clients, **_summary(latencies, errors, elapsed)}


async def paced(base: str, make: Callable[[random.Random], Request], rate: float, seconds: float,
                max_in_flight: int, timeout: float, seed: int = 0) -> dict[str, Any]:
    """Open loop: request i starts at t0 + i/rate; its latency counts from that scheduled time."""
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    rng = random.Random(seed)
    in_flight = 0

    async def one(scheduled: float, req: Request, session: Any) -> None:
        nonlocal in_flight
        in_flight += 1
        try:
            err = await _send(session, base, req, timeout)
        finally:
            in_flight -= 1
        if err is None:
            latencies.append((time.perf_counter() - scheduled) * 1e3)
        else:
            errors[err] = errors.get(err, 0) + 1

    n = int(rate * seconds)
    tasks = []
    connector = aiohttp.TCPConnector(limit=max_in_flight)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        for i in range(n):
            scheduled = t0 + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if in_flight >= max_in_flight:  # the system fell behind: count it, never queue without bound
                errors["client_backlog"] = errors.get("client_backlog", 0) + 1
                continue
            tasks.append(asyncio.create_task(one(scheduled, make(rng), session)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    out = {"mode": "paced", "rate": rate, **_summary(latencies, errors, elapsed)}
    out["late_by_ms_p99"] = out.get("p99_ms")  # scheduled-time latency: queueing behind a slow system included
    return out


def request_makers(ids: dict[str, list[str]]) -> dict[str, Callable[[random.Random], Request]]:
    """Endpoint name -> a function drawing one request (ids from the data set, so answers are not 404s)."""
    items, users, sold = ids["items"], ids["users"], ids["sold"]
    return {
        "recommendations": lambda r: ("GET", f"/users/{r.choice(users)}/recommendations?k=10", None),
        "similar": lambda r: ("GET", f"/items/{r.choice(items)}/similar?k=10", None),
        "bought_together": lambda r: ("GET", f"/items/{r.choice(sold)}/bought-together?k=10", None),
        "search": lambda r: ("GET", f"/search?q={r.choice(QUERIES).replace(' ', '+')}&k=10", None),
        "events": lambda r: ("POST", "/events", {"events": [{"user_id": r.choice(users), "item_id": r.choice(items),
                                                             "event": "view"}]}),
    }


# ------------------------------------------------------------------------------------ CPU use of the system


def _group(proc: Any) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - processes come and go
        return "gone"
    if cmd.startswith("ray::"):
        name = cmd.split()[0][5:]
        return name.split(":")[-1] if name.startswith("ServeReplica") else name
    for key in ("gcs_server", "raylet", "milvus", "uvicorn", "dashboard", "log_monitor", "runtime_env"):
        if key in cmd:
            return key
    return "serve_load_child" if "benchmarks.serve_load" in cmd else proc.name()


class CpuSampler:
    """CPU seconds per process group (Ray deployment, raylet, milvus, ...) between ``start`` and ``stop``."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        import psutil

        out: dict[int, tuple[str, float]] = {}
        for pid in self.roots:
            try:
                parent = psutil.Process(pid)
                procs = [parent, *parent.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                try:
                    t = p.cpu_times()
                    out[p.pid] = (_group(p), t.user + t.system)
                except psutil.Error:
                    pass
        return out

    def start(self) -> None:
        import psutil

        self.t0, self.before, self.machine0 = time.perf_counter(), self._snapshot(), psutil.cpu_times()

    def stop(self) -> dict[str, Any]:
        import psutil

        after, machine = self._snapshot(), psutil.cpu_times()
        wall = time.perf_counter() - self.t0
        groups: dict[str, float] = {}
        for pid, (name, cpu) in after.items():
            groups[name] = groups.get(name, 0.0) + cpu - self.before.get(pid, (name, 0.0))[1]
        busy = sum(getattr(machine, f) - getattr(self.machine0, f) for f in ("user", "system", "nice", "irq",
                                                                            "softirq"))
        top = sorted(((k, round(v / wall, 3)) for k, v in groups.items() if v / wall >= 0.005), key=lambda kv: -kv[1])
        return {"cores_used_by_group": dict(top), "system_cores_used": round(sum(groups.values()) / wall, 2),
                "machine_cores_busy": round(busy / wall, 2), "machine_cores": psutil.cpu_count()}


# ----------------------------------------------------------------------------------- the no-op serving graph


NOOP_SAMPLE = "noop_retrieval.pkl"  # a real Retrieval of the serve graph (see ``sample_payload``), the no-op's answer


def canned_retrieval(data_root: Path, dim: int = 384, candidates: int = 100) -> Any:
    """The no-op retriever's answer: the real Retrieval sampled by ``sample_payload`` when there is one, else one of
    the same shape (candidates with fields and reasons, no vectors; the user's seen items and profile vector)."""
    import pickle

    from common.ranking import Candidate, UserContext
    from serve.messages import Retrieval

    sample = Path(data_root) / NOOP_SAMPLE
    if sample.exists():
        return pickle.loads(sample.read_bytes())
    rng = np.random.default_rng(0)
    cands = []
    for i in range(candidates):
        c = Candidate(f"it{i:06d}", fields={"title": "Brand001 black cotton classic dress", "category": "Dress",
                                           "brand": "Brand001", "color": "black", "price": 10.0, "in_stock": True})
        c.add("profile", 0.5, {"source": "profile", "score": 0.5})
        cands.append(c)
    profile = rng.standard_normal(dim).astype(np.float32)
    return Retrieval("personal", cands, seen=[f"it{i:06d}" for i in range(70)],
                     context=UserContext({"Dress": 0.5}, {"Brand001": 0.5}, 40.0, profile / np.linalg.norm(profile)),
                     segment="25-34|north")


def noop_ranking(found: Any) -> Any:
    """What the reranker makes of ``found`` (every candidate, in order, plus the model's reason), without a model."""
    from common.business_rules import Ranked
    from serve.messages import Ranking

    return Ranking(found.strategy, [Ranked(c.item_id, 1.0 - i * 1e-3, dict(c.fields),
                                           [*c.reasons, {"source": "ranker", "model": "noop", "score": 0.5}])
                                    for i, c in enumerate(found.candidates)],
                   seen=found.seen, segment=found.segment, pinned_fields=found.pinned_fields)


def noop_app(data_root: Path) -> Any:
    """The hops of serve/ingress.py with canned answers of the real payload: Ingress (business rules cached 1 s)
    -> Retriever -> Reranker -> BusinessFilter chained, each stage's response passed to the next unawaited, only
    the filter's answer awaited by the ingress."""
    import dataclasses

    from fastapi import FastAPI
    from ray import serve

    from common.business_rules import BusinessRules

    api = FastAPI()
    found = canned_retrieval(data_root)

    @serve.deployment(ray_actor_options={"num_cpus": 0.25})
    class NoopRetriever:
        def for_user(self, user_id: str, n: int, *args: Any) -> Any:
            return found

        def similar(self, item_id: str, n: int, *args: Any) -> Any:
            return found

    @serve.deployment(ray_actor_options={"num_cpus": 0.2})
    class NoopReranker:
        def __init__(self) -> None:
            self.ranking = noop_ranking(found)

        async def rank(self, retrieval: Any) -> Any:
            return self.ranking

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class NoopFilter:
        def current(self) -> BusinessRules:
            return BusinessRules()

        def apply(self, ranking: Any, k: int, *args: Any) -> Any:
            return dataclasses.replace(ranking, items=ranking.items[:k], seen=[], pinned_fields={})

    @serve.deployment(ray_actor_options={"num_cpus": 0.2})
    @serve.ingress(api)
    class NoopIngress:
        def __init__(self, retriever: Any, reranker: Any, business_filter: Any) -> None:
            self.retriever, self.reranker, self.filter = retriever, reranker, business_filter
            self._rules: BusinessRules | None = None
            self._rules_at = 0.0

        async def _effective(self) -> BusinessRules:
            if self._rules is None or time.monotonic() - self._rules_at > 1.0:  # serve.ingress.RULES_TTL_S
                self._rules, self._rules_at = await self.filter.current.remote(), time.monotonic()
            return self._rules

        async def _answer(self, retrieval: Any, k: int) -> dict:
            ranking = await self.filter.apply.remote(self.reranker.rank.remote(retrieval), k, {}, True)
            return {"strategy": ranking.strategy, "items": [{"item_id": r.item_id, "score": r.score, **r.fields,
                                                             "reasons": r.reasons} for r in ranking.items]}

        @api.get("/readyz")
        async def readyz(self) -> dict:
            return {"status": "ready"}

        @api.get("/users/{user_id}/recommendations")
        async def recommendations(self, user_id: str, k: int = 10) -> dict:
            rules = await self._effective()
            return await self._answer(self.retriever.for_user.remote(user_id, 50, rules.milvus_filter()), k)

        @api.get("/items/{item_id}/similar")
        async def similar(self, item_id: str, k: int = 10) -> dict:
            rules = await self._effective()
            return await self._answer(self.retriever.similar.remote(item_id, 50, rules.milvus_filter()), k)

    return NoopIngress.bind(NoopRetriever.bind(), NoopReranker.bind(), NoopFilter.bind())


def serve_config(paths: Any, store_uri: str, collection: str, port: int, fresh_sessions: bool = True,
                 event_shards: int = 1) -> Any:
    from serve.config import ServeConfig

    return ServeConfig(collection=collection, store_uri=store_uri, artifacts_uri=str(paths.artifacts),
                       events=str(paths.events), users=str(paths.users),
                       event_log=str(paths.root / f"event_log_{os.getpid()}"), port=port,
                       fresh_sessions=fresh_sessions, event_shards=event_shards)


def sample_payload(data_root: Path, store_uri: str, collection: str, users: list[str], n: int = 40) -> dict[str, Any]:
    """Run the real Retriever (its class, in this process, no Ray) for ``n`` users: candidates per request and the
    pickled sizes of what travels retriever -> reranker -> filter; the median-size Retrieval becomes the no-op
    graph's canned answer (``NOOP_SAMPLE``)."""
    import pickle

    from benchmarks.serve_load_data import DataPaths
    from common.business_rules import BusinessRules
    from serve.retriever import Retriever

    paths = DataPaths(Path(data_root))
    cfg = serve_config(paths, store_uri, collection, 8000)
    t0 = time.perf_counter()
    retriever = Retriever.func_or_class(cfg)
    init_s = time.perf_counter() - t0
    rules = BusinessRules()
    pool = max(cfg.candidates, 30)
    samples, times = [], []
    try:
        for user in users[:n]:
            t = time.perf_counter()
            r = retriever.for_user(user, pool, rules.milvus_filter(), None, rules.exclude_seen, rules.pinned)
            times.append((time.perf_counter() - t) * 1e3)
            samples.append((len(pickle.dumps(r)), len(r.candidates), r))
    finally:
        retriever._pool.shutdown(wait=True)  # noqa: SLF001
        retriever.store.close()
    samples.sort(key=lambda s: s[0])
    median = samples[len(samples) // 2][2]
    (paths.root / NOOP_SAMPLE).write_bytes(pickle.dumps(median))
    sizes, counts = [s[0] for s in samples], [s[1] for s in samples]
    ranking = noop_ranking(median)
    return {"users": len(samples), "retriever_init_s": round(init_s, 1),
            "candidates_mean": round(float(np.mean(counts)), 1), "candidates_min": min(counts),
            "candidates_max": max(counts), "retrieval_bytes_median": sizes[len(sizes) // 2],
            "retrieval_bytes_max": sizes[-1], "ranking_bytes_of_median": len(pickle.dumps(ranking)),
            "for_user_ms_in_process_p50": round(float(np.percentile(times, 50)), 2),
            "for_user_ms_in_process_p95": round(float(np.percentile(times, 95)), 2),
            "strategies": sorted({s[2].strategy for s in samples}),
            "candidate_has_vector": any(c.vector is not None for s in samples for c in s[2].candidates)}


# ----------------------------------------------------------------------------------- child: one system served


def serve_child(system: str, port: int, store_uri: str, data_root: str, collection: str,
                fresh_sessions: bool = True, event_shards: int = 1) -> int:
    """Serve one system on ``port`` until stdin closes; print one JSON line of facts before exiting."""
    from benchmarks.serve_load_data import DataPaths, baseline_app

    paths = DataPaths(Path(data_root))
    if system == "fastapi":
        import uvicorn

        app = baseline_app(paths, collection)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", workers=1)
        server = uvicorn.Server(config)
        import threading

        threading.Thread(target=lambda: (sys.stdin.read(), setattr(server, "should_exit", True)), daemon=True).start()
        server.run()
        print(json.dumps({"system": system}), flush=True)
        return 0
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    if system.startswith("noop"):
        app = noop_app(paths.root)
    else:
        from serve.app import build_app

        app = build_app(serve_config(paths, store_uri, collection, port, fresh_sessions, event_shards))
    serve.run(app, name="bench", route_prefix="/", blocking=False)
    sys.stdin.read()  # the parent closes stdin when its load is done
    facts: dict[str, Any] = {"system": system}
    try:
        status = serve.status().applications["bench"].deployments
        facts["replicas"] = {name: {"status": str(d.status), "running": d.replica_states.get("RUNNING", 0)}
                             for name, d in status.items()}
    except Exception as e:  # noqa: BLE001 - facts are best effort
        facts["replicas_error"] = repr(e)
    serve.shutdown()
    ray.shutdown()
    print(json.dumps(facts, default=str), flush=True)
    return 0


# ------------------------------------------------------------------------------------------- parent: the run


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> float:
    import urllib.error
    import urllib.request

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the system exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=5) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{base}/readyz not ready after {timeout:.0f} s")


def machine_info() -> dict[str, Any]:
    import psutil

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import ray

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "serve", "common"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return {"git_commit": commit, "serve_common_modified": bool(dirty), "cpu": model, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "ray": ray.__version__, "platform": platform.platform()}


def request_ids(data_root: Path, collection: str, seed: int) -> dict[str, list[str]]:
    """Item ids, users with a profile, and purchased items (they have bought-together rules) to draw from."""
    import pandas as pd
    import pyarrow.parquet as pq

    from benchmarks.serve_load_data import DataPaths
    from common.artifacts import ArtifactStore

    paths = DataPaths(data_root)
    rng = np.random.default_rng(seed)
    items = pd.read_parquet(paths.items, columns=["item_id"])["item_id"].to_numpy(dtype=object)
    events = pd.read_parquet(paths.events, columns=["item_id", "event"])
    sold = events.loc[events["event"] == "purchase", "item_id"].unique()
    artifacts = ArtifactStore(str(paths.artifacts))
    name = f"{collection}_users_fused"
    users = pq.read_table(artifacts.path("profiles", name, artifacts.latest("profiles", name), "profiles.parquet"),
                          columns=["user_id"]).column("user_id").to_pylist()
    pick = lambda a, n: [str(x) for x in rng.choice(np.asarray(a, dtype=object), min(n, len(a)), replace=False)]  # noqa: E731
    return {"items": pick(items, 5000), "users": pick(users, 2000), "sold": pick(sold, 2000)}


def run_system(system: str, args: argparse.Namespace, store_uri: str, milvus_pid: int | None,
               ids: dict[str, list[str]]) -> dict[str, Any]:
    """Start one system in a child process, drive every endpoint, stop it; the system's results."""
    port = _free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE",
                                                                                                  "disabled")}
    env.pop("RAY_SERVE_THROUGHPUT_OPTIMIZED", None)
    if system.endswith("-tput"):
        env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    cmd = [sys.executable, "-m", "benchmarks.serve_load", "--child", system, "--port", str(port), "--store-uri",
           store_uri, "--data-root", str(args.data_root), "--collection", args.collection,
           *(["--stale-sessions"] if args.stale_sessions else []), "--event-shards", str(args.event_shards)]
    t0 = time.perf_counter()
    stderr_path = Path(args.data_root) / f"{system}.stderr.log"  # the child's logs; its tail explains a failure
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                text=True)
    base = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"system": system, "throughput_optimized": system.endswith("-tput"), "endpoints": {}}
    try:
        ready_s = _wait_ready(base, proc, args.start_timeout)
        result["start_s"] = round(time.perf_counter() - t0, 1)
        log.info("%s ready after %.1f s (readyz answered after %.1f s of polling)", system, result["start_s"], ready_s)
        makers = request_makers(ids)
        endpoints = [e for e in args.endpoints if
                     (system != "fastapi" or e in BASELINE_ENDPOINTS) and
                     (not system.startswith("noop") or e in ("recommendations", "similar"))]
        sampler = CpuSampler([proc.pid, *([milvus_pid] if milvus_pid else [])])
        for endpoint in endpoints:
            if args.warmup:
                asyncio.run(closed_loop(base, makers[endpoint], args.clients, args.warmup, 10**9, args.timeout, 99))
            sampler.start()
            r = asyncio.run(closed_loop(base, makers[endpoint], args.clients, args.seconds, args.max_requests,
                                        args.timeout))
            result["endpoints"][endpoint] = {**r, "cpu": sampler.stop()}
            if ERROR_SAMPLES:
                result["endpoints"][endpoint]["error_samples"] = dict(ERROR_SAMPLES)
                ERROR_SAMPLES.clear()
            log.info("%s %s: %s", system, endpoint, {k: r.get(k) for k in ("qps", "p50_ms", "p95_ms", "p99_ms",
                                                                             "errors")})
        if args.target_seconds and "recommendations" in endpoints:
            if system != "fastapi":  # POST /events just wrote sessions: let Milvus finish flushing/indexing them
                result["settle_before_target"] = settle_store(milvus_pid, args.settle_timeout)
            sampler.start()
            r = asyncio.run(paced(base, makers["recommendations"], args.rate, args.target_seconds,
                                  args.max_in_flight, args.timeout))
            result["target"] = {"endpoint": "recommendations", **r, "cpu": sampler.stop(),
                                "meets_target": bool(r["errors"] == 0 and r.get("p99_ms", 1e9) <= args.target_p99_ms)}
            log.info("%s target run: %s", system, {k: r.get(k) for k in ("qps", "p50_ms", "p99_ms", "errors")})
    except (RuntimeError, TimeoutError) as e:
        tail = [ln for ln in stderr_path.read_text(errors="replace").splitlines() if ln.strip()][-3:]
        raise RuntimeError(f"{e}; its log {stderr_path} ends: {' | '.join(tail)}") from e
    finally:
        _stop_child(proc, system, result)
    return result


def _stop_child(proc: subprocess.Popen, system: str, result: dict[str, Any]) -> None:
    """Close the child's stdin (it shuts its system down); past 120 s kill it and the processes it started."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    try:
        out, _ = proc.communicate(input="", timeout=120)
        lines = [ln for ln in (out or "").splitlines() if ln.startswith("{")]
        if lines:
            result["facts"] = json.loads(lines[-1])
    except subprocess.TimeoutExpired:
        log.warning("system %s (pid %d) did not stop in 120 s: killing it and its %d children", system, proc.pid,
                    len(tree))
        proc.kill()
        proc.communicate()
    for child in tree:  # Ray's gcs_server/raylet/workers of this child only, by pid
        try:
            if child.is_running():
                child.kill()
        except psutil.Error:
            pass


def _table(report: dict[str, Any]) -> str:
    rows = [f"{'system':<12} {'endpoint':<16} {'clients':>7} {'qps':>7} {'p50':>8} {'p95':>8} {'p99':>8} {'err':>5}"]
    for sysres in report["systems"]:
        for name, r in sysres["endpoints"].items():
            rows.append(f"{sysres['system']:<12} {name:<16} {r['clients']:>7} {r['qps']:>7} {r.get('p50_ms', '-'):>8} "
                        f"{r.get('p95_ms', '-'):>8} {r.get('p99_ms', '-'):>8} {r['errors']:>5}")
        t = sysres.get("target")
        if t:
            rows.append(f"{sysres['system']:<12} {'recs @' + str(t['rate']) + '/s':<16} {'paced':>7} {t['qps']:>7} "
                        f"{t.get('p50_ms', '-'):>8} {t.get('p95_ms', '-'):>8} {t.get('p99_ms', '-'):>8} "
                        f"{t['errors']:>5}  meets target: {t['meets_target']}")
    return "\n".join(rows)


def settle_store(milvus_pid: int | None, timeout: float) -> dict[str, Any]:
    """Wait until the Milvus server is idle (index builds and compactions after the writes use both cores for
    minutes at 100k items and would be measured as the systems' latency)."""
    import psutil

    if milvus_pid is None or timeout <= 0:
        return {"waited_s": 0.0}
    t0 = time.perf_counter()
    proc = psutil.Process(milvus_pid)
    cores = None
    while time.perf_counter() - t0 < timeout:
        before = sum(proc.cpu_times()[:2])
        time.sleep(5.0)
        cores = (sum(proc.cpu_times()[:2]) - before) / 5.0
        if cores < 0.2:
            break
        log.info("waiting for the Milvus server to go idle (%.2f cores busy)", cores)
    return {"waited_s": round(time.perf_counter() - t0, 1), "milvus_cores_at_end": round(cores or 0.0, 3)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.serve_load_data import prepare
    from common import milvus_standalone

    work = Path(args.work).resolve()
    args.data_root = work / f"data_{args.items}_{args.users}_{args.seed}_{args.index.lower()}"
    report: dict[str, Any] = {"machine": machine_info(), "settings": {
        k: v for k, v in vars(args).items() if k not in ("child", "port", "store_uri", "data_root", "out")}}
    report["settings"]["data_root"] = str(args.data_root)
    server = None
    store_uri = args.store_uri
    try:
        if store_uri is None:
            t = time.perf_counter()
            server = milvus_standalone.start_standalone(work / "milvus", time_tick_ms=args.time_tick_ms)
            report["milvus_start_s"] = round(time.perf_counter() - t, 1)
            store_uri = server.uri
        from common.vector_store import open_store

        with open_store(store_uri) as store:
            report["store"] = {"uri": store_uri, "server_version": store.server_version, "index": args.index}
        report["data"] = prepare(args.data_root, store_uri, args.items, args.users, args.seed, args.index,
                                 args.collection)
        report["settle"] = settle_store(server.pid if server else None, args.settle_timeout)
        ids = request_ids(args.data_root, args.collection, args.seed)
        if any(s.startswith("noop") for s in args.systems):
            report["payload"] = sample_payload(args.data_root, store_uri, args.collection, ids["users"])
            log.info("payload of the real graph (the no-op's canned answer): %s", report["payload"])
        report["systems"] = []
        for system in args.systems:
            try:
                settled = settle_store(server.pid if server else None, args.settle_timeout)
                report["systems"].append(run_system(system, args, store_uri, server.pid if server else None, ids))
                report["systems"][-1]["settle_before"] = settled
            except (RuntimeError, TimeoutError, OSError) as e:
                log.error("system %s failed: %s", system, e)
                report["systems"].append({"system": system, "failed": str(e), "endpoints": {}})
            if args.out:  # partial results survive a later failure
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    finally:
        if server is not None:
            server.stop()
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=100_000, help="catalogue size")
    p.add_argument("--users", type=int, default=2000, help="simulated shoppers (events, profiles, ranker)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index", default="HNSW", help="vector index of the item collections")
    p.add_argument("--collection", default="bench", help="catalogue name in the store")
    p.add_argument("--work", default=str(ROOT / "var" / "bench" / "serve_load"),
                   help="cache folder: data sets and the Milvus server's data (reruns skip the setup)")
    p.add_argument("--store-uri", help="an already running Milvus (default: start a standalone server)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--endpoints", nargs="+", choices=ENDPOINTS, default=list(ENDPOINTS))
    p.add_argument("--clients", type=int, default=4, help="closed-loop clients per endpoint")
    p.add_argument("--seconds", type=float, default=20.0, help="closed-loop duration per endpoint")
    p.add_argument("--max-requests", type=int, default=100_000, help="closed-loop bound on requests per endpoint")
    p.add_argument("--warmup", type=float, default=3.0, help="unrecorded closed-loop seconds before each endpoint")
    p.add_argument("--rate", type=float, default=50.0, help="paced target run: requests/s")
    p.add_argument("--target-seconds", type=float, default=60.0, help="paced target run length (0: skip it)")
    p.add_argument("--target-p99-ms", type=float, default=50.0)
    p.add_argument("--max-in-flight", type=int, default=64, help="paced run: more in flight counts as an error")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds a system may take to become ready")
    p.add_argument("--settle-timeout", type=float, default=900.0,
                   help="seconds to wait for the Milvus server to go idle (index builds) before measuring")
    p.add_argument("--out", default=str(ROOT / "var" / "bench" / "serve_load.json"))
    p.add_argument("--event-shards", type=int, default=1, help="event sinks, each owning a share of the users "
                                                                   "(ServeConfig.event_shards)")
    p.add_argument("--stale-sessions", action="store_true",
                   help="read live sessions without waiting for the server's tick (ServeConfig.fresh_sessions=False)")
    p.add_argument("--time-tick-ms", type=int, default=TIME_TICK_MS,
                   help="the standalone server's time tick (Milvus' default: 200)")
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data-root", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.child:
        return serve_child(args.child, args.port, args.store_uri, args.data_root, args.collection,
                           not args.stale_sessions, args.event_shards)
    report = run(args)
    print(_table(report))
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(f"results: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
