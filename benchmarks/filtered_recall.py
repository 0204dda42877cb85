"""Filtered retrieval at scale: recall@k against exact filtered search, the store's strategy vs plain HNSW.

    python -m benchmarks.filtered_recall --items 100000 --out var/bench/filtered_recall.json

Fills one HNSW collection on the Milvus standalone server (PyPI `milvus`; or ``--uri``) with clustered unit
vectors and an integer ``bucket`` field (``i % 100``), so ``bucket < p`` keeps p% of the items. For each
selectivity it searches the same queries (a) through ``MilvusStore.search`` (counts matches, exact search for
small sets, ef widened by the inverse selectivity, exact fallback when short; what the service uses) and (b) as
plain HNSW filtered search, each at the base beams ``--ef``, and scores both against numpy brute force over the
matching rows (``100`` is the unfiltered search). The vectors are synthetic: 64 clusters with isotropic noise
(``--spread``), harder for a graph index than real embeddings, so the figures are a floor; or, with
``--data fashion-mnist``, real ones: the default encoder's ``visual`` vectors (what ``/items/{id}/similar``
searches) of the 60,000 Fashion-MNIST *train* photos, queried with *test* photos (encoded once, then cached).
"""
from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import write_report
from common import milvus_standalone
from common.vector_store import CollectionSpec, MilvusStore, open_store

logger = logging.getLogger(__name__)


def clustered(n: int, dim: int, clusters: int, seed: int, spread: float = 0.6) -> np.ndarray:
    """Unit vectors around ``clusters`` centres (closer to real embeddings than isotropic noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    v = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def wait_indexed(store: MilvusStore, name: str, rows: int, timeout: float = 900.0) -> float:
    """Wait until the server has built the index over every row: until then Milvus searches sealed segments
    with an interim IVF index whose recall ignores ``ef`` (0.92 at 1% selectivity was measured that way)."""
    t = time.perf_counter()
    client = store._client  # the index build state has no place in the VectorStore protocol
    while time.perf_counter() - t < timeout:
        states = [client.describe_index(name, index) for index in client.list_indexes(name)]
        if states and all(int(s.get("indexed_rows", 0)) >= rows for s in states):
            return round(time.perf_counter() - t, 1)
        time.sleep(2.0)
    raise TimeoutError(f"index of {name} not built in {timeout:.0f} s: {states}")


def _recall(found: list[list[str]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & {f"i{j}" for j in t}) / len(t) for f, t in zip(found, truth)]))


def _timed(fn) -> tuple[Any, list[float]]:
    out, times = [], []
    for q in fn.queries:
        t = time.perf_counter()
        out.append(fn(q))
        times.append((time.perf_counter() - t) * 1000)
    return out, times


def fashion_mnist_vectors(cache: Path, queries: int, batch: int = 64) -> tuple[np.ndarray, np.ndarray, str]:
    """The default encoder's ``visual`` vectors of Fashion-MNIST's train photos and of the first ``queries`` test
    photos, and the encoder's identity; cached under ``cache`` (the train set takes minutes to encode)."""
    from PIL import Image

    from common import fashion_mnist
    from common.encoder import EncoderConfig, ItemEncoder

    encoder = None
    out = []
    for split, n in (("train", None), ("test", queries)):
        path = cache / f"fashion_mnist_{split}_visual.npy"
        if not path.exists() or (n is not None and len(np.load(path, mmap_mode="r")) < n):
            images, _ = fashion_mnist.load(split)
            images = images[:n] if n is not None else images
            if encoder is None:
                encoder = ItemEncoder(EncoderConfig())
            t = time.perf_counter()
            parts = [encoder.encode_images(np.stack([encoder.prepare_image(Image.fromarray(im))
                                                     for im in images[i:i + batch]]))["visual"]
                     for i in range(0, len(images), batch)]
            logger.info("encoded %d %s photos in %.0f s", len(images), split, time.perf_counter() - t)
            cache.mkdir(parents=True, exist_ok=True)
            np.save(path, np.concatenate(parts).astype(np.float32))
        vectors = np.load(path)
        out.append(vectors[:n] if n is not None else vectors)
    identity = encoder.identity if encoder is not None else (cache / "encoder.txt").read_text().strip()
    (cache / "encoder.txt").write_text(identity)
    return out[0], out[1], identity


def run(store: MilvusStore, items: int, dim: int, queries: int, k: int, percents: list[int], seed: int,
        index: str, efs: list[int] = (64,), spread: float = 0.6, settle_s: float = 20.0,
        data: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """``data``: (item vectors, query vectors) to use instead of synthetic ones (unit-normalised here)."""
    if data is not None:
        vectors, qs = (np.asarray(x, np.float32) / np.linalg.norm(x, axis=1, keepdims=True) for x in data)
        items, dim = vectors.shape
    else:
        vectors = clustered(items, dim, 64, seed, spread)
        qs = clustered(queries, dim, 64, seed + 1, spread)
    name = f"filtered_recall_{items}_{dim}"
    store.drop_collection(name)
    store.ensure_collection(CollectionSpec(name, dim, "synthetic", {"bucket": "int"}, index))
    t = time.perf_counter()
    for lo in range(0, items, 2000):
        store.upsert(name, [{"item_id": f"i{i}", "vector": vectors[i], "bucket": i % 100}
                            for i in range(lo, min(items, lo + 2000))])
    store.flush(name)
    insert_s = time.perf_counter() - t
    index_s = wait_indexed(store, name, items)
    store._client.release_collection(name)  # serve the built index (until reloaded, some searches did not)
    store._client.load_collection(name)
    time.sleep(settle_s)
    buckets = np.arange(items) % 100
    spec = store.describe(name)
    results = []
    for pct in percents:
        expr = f"bucket < {pct}" if pct < 100 else ""
        truth = np.argsort(-np.where(buckets[None, :] < pct, qs @ vectors.T, -np.inf), axis=1)[:, :k]
        row: dict[str, Any] = {"selectivity_pct": pct, "matching_items": int((buckets < pct).sum())}
        def strategy(q, ef):
            store.search_ef = ef
            return [h.item_id for h in store.search(name, q[None, :], k, filter=expr or None)[0]]

        searches = [(f"store_ef{ef}", lambda q, ef=ef: strategy(q, ef)) for ef in efs]
        searches += [(f"plain_hnsw_ef{ef}", lambda q, ef=ef: [h.item_id for h in store._ann(
            name, spec, q[None, :], k, expr, expr or None, ef=ef)[0]]) for ef in efs]
        for label, search in searches:
            search.queries = qs
            search(qs[0])  # warm
            found, times = _timed(search)
            times.sort()
            row[label] = {"recall_at_k": round(_recall(found, truth), 4),
                          "short_results": int(sum(len(f) < k for f in found)),
                          "p50_ms": round(float(np.median(times)), 2),
                          "p95_ms": round(times[int(0.95 * (len(times) - 1))], 2)}
        logger.info("%s", row)
        results.append(row)
    store.drop_collection(name)
    return {"items": items, "dim": dim, "index": index, "queries": queries, "k": k, "insert_s": round(insert_s, 1), "index_build_wait_s": index_s,
            "server_version": store.server_version, "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", help="store URI (default: start the Milvus standalone server in a temp dir)")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--percents", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--index", default="HNSW")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ef", type=int, nargs="+", default=[64], help="plain HNSW beams to compare")
    parser.add_argument("--spread", type=float, default=0.6, help="noise around the cluster centres")
    parser.add_argument("--data", choices=["synthetic", "fashion-mnist"], default="synthetic",
                        help="fashion-mnist: the encoder's visual vectors of its 60,000 train photos (not --items)")
    parser.add_argument("--cache", default="var/bench/filtered_recall", help="where encoded vectors are kept")
    parser.add_argument("--out", help="write the JSON report here (default: stdout)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="vitrine-recall-") as tmp:
        server = None if args.uri else milvus_standalone.start_standalone(Path(tmp) / "standalone")
        store = open_store(args.uri or server.uri)
        try:
            data, model = None, "synthetic"
            if args.data == "fashion-mnist":
                *data, model = fashion_mnist_vectors(Path(args.cache), args.queries)
            report = run(store, args.items, args.dim, args.queries, args.k, args.percents, args.seed, args.index, args.ef,
                         args.spread, data=data)
            report["data"] = {"kind": args.data, "model": model}
        finally:
            store.close()
            if server is not None:
                server.stop()
    report["machine"] = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    print(write_report(report, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
