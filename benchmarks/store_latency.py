"""Benchmark of the vector store: server start-up, upsert rate, flush cost and search latency by collection size.

    python -m benchmarks.store_latency --sizes 2000 20000 --dim 1280 --out store_latency.json
    python -m benchmarks.store_latency --standalone ...      # the Milvus standalone server (PyPI `milvus`)

Each size gets a fresh collection. A second store, which wrote nothing (like another process), searches right after
the writes (unflushed data) and, on Milvus Lite, until the server's own flush makes searches fast; then the
latencies are measured on flushed data.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import write_report
from common import milvus_local, milvus_standalone
from common.vector_store import CollectionSpec, MilvusStore, open_store

logger = logging.getLogger(__name__)
_CATEGORIES = ("Bag", "Shoe", "Dress", "Shirt", "Coat", "Hat", "Sock", "Belt", "Scarf", "Watch")


def _latencies_ms(fn: Callable[[int], Any], n: int) -> dict[str, float]:
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"p50_ms": round(statistics.median(times), 2), "p95_ms": round(times[int(0.95 * (n - 1))], 2),
            "n": n}


def _rows(rng: np.random.Generator, start: int, n: int, dim: int) -> list[dict[str, Any]]:
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    return [{"item_id": f"item{start + i}", "vector": vectors[i], "category": _CATEGORIES[(start + i) % 10],
             "price": float((start + i) % 200), "in_stock": (start + i) % 3 != 0} for i in range(n)]


def bench_size(store: MilvusStore, size: int, dim: int, index: str, queries: int, k: int,
               seed: int, settle_s: float = 0.0) -> dict[str, Any]:
    """Fill a fresh collection with ``size`` random rows and time writes, flush and searches."""
    rng = np.random.default_rng(seed)
    name = f"bench_{size}_{dim}"
    spec = CollectionSpec(name, dim, "random", {"category": "str", "price": "float", "in_stock": "bool"}, index)
    store.drop_collection(name)
    store.ensure_collection(spec)
    batch = 1000
    t = time.perf_counter()
    for start in range(0, size, batch):
        store.upsert(name, _rows(rng, start, min(batch, size - start), dim))
    upsert_s = time.perf_counter() - t
    q = rng.standard_normal((queries, dim), dtype=np.float32)
    flt = 'category == "Bag" and price < 100'
    result: dict[str, Any] = {"size": size, "dim": dim, "index": index, "k": k,
                              "upsert_rows_per_s": round(size / upsert_s, 1)}
    written = time.perf_counter()
    reader = open_store(store.uri)  # wrote nothing, so it does not flush: it reads as another process would
    try:
        t = time.perf_counter()
        reader.search(name, q[0], k)
        unflushed_ms = (time.perf_counter() - t) * 1000
        result["search_right_after_writes_ms"] = round(unflushed_ms, 2)
        if reader.is_lite:  # the server flushes by itself once writes pause: how long until searches are fast?
            while time.perf_counter() - written < 60:
                time.sleep(0.25)
                t = time.perf_counter()
                reader.search(name, q[1], k)
                if (time.perf_counter() - t) * 1000 < max(0.3 * unflushed_ms, 20):
                    break
            result["fast_search_after_writes_s"] = round(time.perf_counter() - written, 2)
    finally:
        reader.close()
    t = time.perf_counter()
    store.flush(name)
    result["explicit_flush_s"] = round(time.perf_counter() - t, 3)
    if settle_s:
        time.sleep(settle_s)  # Milvus Lite builds the HNSW of a flushed segment in the background
        result["settled_s"] = settle_s
    store.search(name, q[0], k)  # warm-up (index load on first use)
    result["search"] = _latencies_ms(lambda i: store.search(name, q[i], k), queries)
    result["search_filtered"] = _latencies_ms(lambda i: store.search(name, q[i], k, filter=flt), queries)
    client = store._client  # noqa: SLF001 - the consistency comparison needs the raw client
    params = {"metric_type": "IP"}
    for level in ("Strong", "Session", "Bounded"):
        result[f"raw_search_{level.lower()}"] = _latencies_ms(
            lambda i, lv=level: client.search(name, [q[i]], limit=k, search_params=params, consistency_level=lv),
            queries)
    result["count_ms"] = _latencies_ms(lambda i: store.count(name), 5)["p50_ms"]
    store.drop_collection(name)
    return result


def run(uri: str | None, sizes: list[int], dim: int, index: str, queries: int, k: int, standalone: bool,
        seed: int = 0, settle_s: float = 0.0) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-ready report."""
    report: dict[str, Any] = {"sizes": []}
    with tempfile.TemporaryDirectory(prefix="vitrine-bench-") as tmp:
        server = None
        if standalone:
            t = time.perf_counter()
            server = milvus_standalone.start_standalone(Path(tmp) / "standalone")
            report["standalone_start_s"] = round(time.perf_counter() - t, 2)
            uri = server.uri
        elif uri is None:
            uri = str(Path(tmp) / "milvus")
            t = time.perf_counter()
            milvus_local.ensure_server(uri)
            report["lite_server_start_s"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            milvus_local.ensure_server(uri)
            report["lite_server_reuse_ms"] = round((time.perf_counter() - t) * 1000, 2)
        t = time.perf_counter()
        store = open_store(uri)
        report["open_store_ms"] = round((time.perf_counter() - t) * 1000, 2)
        report["server_version"] = store.server_version
        try:
            for size in sizes:
                report["sizes"].append(bench_size(store, size, dim, index, queries, k, seed, settle_s))
                logger.info("size %d done: %s", size, report["sizes"][-1])
        finally:
            store.close()
            if server is not None:
                server.stop()
            elif report.get("lite_server_start_s") is not None:
                milvus_local.stop(uri)
    report["uri"] = uri
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", help="store URI (default: a fresh local Milvus Lite server in a temp dir)")
    parser.add_argument("--standalone", action="store_true", help="start the Milvus standalone server instead")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--index", default="AUTOINDEX")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds to wait after the flush before timing searches (background index builds)")
    parser.add_argument("--out", help="write the JSON report here (default: stdout)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run(args.uri, args.sizes, args.dim, args.index, args.queries, args.k, args.standalone,
                 settle_s=args.settle)
    text = write_report(report, args.out)
    if not args.out:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
