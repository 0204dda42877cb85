"""Data for the serving load benchmark (``benchmarks/serve_load.py``): a synthetic catalogue at scale in the vector
store, the artifacts the service reads (embeddings manifest, rules, profiles, ranker), and the single-process
FastAPI + numpy brute-force baseline served over the same vectors.

Vectors are SYNTHETIC except the text part: titles' descriptive words (colour, material, style, category) go through
the real default text encoder (deduplicated, so 100k items cost a few thousand forward passes); image-space vectors
are per-category clusters near the encoder's embedding of "a photo of a <category>", ``fused`` is the encoder's own
fuse of the two, and ``visual`` (image-only similarity) is clustered unit vectors. No image is encoded: 100k images
on 2 CPUs would take about an hour.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

CATEGORIES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
              "Skirt", "Jacket", "Jeans", "Scarf", "Hat", "Belt", "Watch", "Sock", "Boot", "Sweater")
COLORS = ("black", "white", "red", "navy", "green", "beige", "grey", "pink", "brown", "yellow", "blue", "olive")
MATERIALS = ("cotton", "linen", "wool", "leather", "denim", "silk", "suede", "knit")
STYLES = ("classic", "slim", "oversized", "vintage", "sporty", "casual", "elegant", "summer", "winter", "cropped")
N_BRANDS = 200
SETUP_FILE = "setup.json"  # written last: its presence means the data folder is complete


@dataclasses.dataclass(frozen=True)
class DataPaths:
    """Where one prepared data set lives (all under ``root``)."""

    root: Path

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def events(self) -> Path:
        return self.root / "events.parquet"

    @property
    def users(self) -> Path:
        return self.root / "users.parquet"

    @property
    def items(self) -> Path:
        return self.root / "items.parquet"

    def vectors(self, kind: str) -> Path:
        return self.root / f"{kind}.npy"


def catalogue(n: int, seed: int) -> tuple[pd.DataFrame, list[str]]:
    """``n`` items with category, brand, colour, price, stock; and each item's text (what the text tower reads)."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(len(CATEGORIES), size=n)
    color, material, style = (rng.integers(len(v), size=n) for v in (COLORS, MATERIALS, STYLES))
    brand = rng.zipf(1.6, size=n) % N_BRANDS
    base_price = rng.uniform(15, 150, len(CATEGORIES))
    texts = [f"{COLORS[c]} {MATERIALS[m]} {STYLES[s]} {CATEGORIES[k]}".lower()
             for c, m, s, k in zip(color, material, style, cat)]
    df = pd.DataFrame({
        "item_id": [f"it{i:06d}" for i in range(n)],
        "title": [f"Brand{b:03d} {t}" for b, t in zip(brand, texts)],
        "category": [CATEGORIES[k] for k in cat],
        "brand": [f"Brand{b:03d}" for b in brand],
        "color": [COLORS[c] for c in color],
        "price": np.round(base_price[cat] * rng.lognormal(0, 0.35, n), 2),
        "in_stock": rng.random(n) < 0.9,
    })
    df["content_hash"] = [f"synthetic-{seed}-{i}" for i in range(n)]
    df["attributes"] = [{} for _ in range(n)]
    return df, texts


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def item_vectors(df: pd.DataFrame, texts: list[str], encoder: Any, seed: int) -> dict[str, np.ndarray]:
    """All four kinds: real text vectors (unique texts encoded once), synthetic clustered image/visual vectors."""
    rng = np.random.default_rng(seed + 1)
    unique, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    t0 = time.perf_counter()
    encoded = np.concatenate([encoder.encode_texts(list(unique[i:i + 256])) for i in range(0, len(unique), 256)])
    log.info("encoded %d unique item texts in %.1f s", len(unique), time.perf_counter() - t0)
    text = encoded[inverse]
    cat = pd.Index(CATEGORIES).get_indexer(df["category"])
    centres = encoder.encode_texts([f"a photo of a {c.lower()}" for c in CATEGORIES])
    dim = text.shape[1]
    image = _unit(centres[cat] + rng.standard_normal((len(df), dim), dtype=np.float32) * (0.6 / np.sqrt(dim)))
    vdim = int(encoder.dims["visual"])
    sub = rng.integers(8, size=len(df))  # 8 visual sub-styles per category
    vis_centres = rng.standard_normal((len(CATEGORIES), vdim), dtype=np.float32)
    vis_sub = rng.standard_normal((len(CATEGORIES), 8, vdim), dtype=np.float32) * 0.6
    visual = _unit(vis_centres[cat] + vis_sub[cat, sub] + rng.standard_normal((len(df), vdim), dtype=np.float32) * 0.5)
    return {"visual": visual, "image": image, "text": text, "fused": encoder.fuse(image, text)}


def _write_store(store_uri: str, base: str, df: pd.DataFrame, vectors: dict[str, np.ndarray], identity: str,
                 index: str, kinds: tuple[str, ...]) -> dict[str, Any]:
    from common.item_index import collection_specs, store_rows
    from common.vector_store import open_store

    dims = {k: v.shape[1] for k, v in vectors.items()}
    items = df.to_dict("records")
    t0 = time.perf_counter()
    with open_store(store_uri) as store:
        names = []
        for spec in collection_specs(base, identity, dims, index):
            if spec.name[len(base) + 1:] in kinds:
                if store.has_collection(spec.name):
                    store.drop_collection(spec.name)
                store.ensure_collection(spec)
                names.append(spec.name)
        for start in range(0, len(items), 2000):
            rows = store_rows(items[start:start + 2000], {k: v[start:start + 2000] for k, v in vectors.items()})
            for name in names:
                store.upsert(name, rows[name[len(base) + 1:]])
        upserted = time.perf_counter() - t0
        for name in names:
            store.flush(name)
    seconds = {"kinds": list(kinds), "upsert_s": round(upserted, 1), "with_flush_s": round(time.perf_counter() - t0, 1),
               "rows_per_s": round(len(items) * len(names) / upserted)}
    log.info("wrote %d rows to each of %s: %s", len(items), names, seconds)
    return seconds


def _publish_embeddings(paths: DataPaths, base: str, df: pd.DataFrame, vectors: dict[str, np.ndarray],
                        encoder: Any, store_uri: str) -> str:
    """The embeddings snapshot + manifest that the profiles/ranker jobs and the TextEncoder read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from common.artifacts import ArtifactStore
    from common.item_index import VECTOR_COLUMNS, collection_name

    artifacts = ArtifactStore(str(paths.artifacts))
    version = artifacts.new_version("embeddings", base)
    table = pa.Table.from_pandas(df.drop(columns=["attributes"]).assign(attributes="{}"), preserve_index=False)
    for kind in ("image", "text", "fused"):  # visual (1280-d) is left out of the snapshot: no job reads it
        table = table.append_column(VECTOR_COLUMNS[kind], pa.array(list(vectors[kind]), pa.list_(pa.float32())))
    uri = artifacts.path("embeddings", base, version, "embeddings.parquet")
    pq.write_table(table, uri)
    artifacts.publish("embeddings", base, version, {
        "result": {"collection": base, "version": version, "items": len(df), "synthetic_vectors": True},
        "encoder": dataclasses.asdict(encoder.cfg), "encoder_identity": encoder.identity, "dims": encoder.dims,
        "store_uri": store_uri, "collections": {k: collection_name(base, k) for k in VECTOR_COLUMNS},
        "note": "benchmarks/serve_load_data.py: synthetic image/visual vectors, real text vectors of item texts",
    })
    return version


def _snapshot_ok(paths: DataPaths, base: str) -> bool:
    """Whether the published embeddings snapshot has what serving reads from it (``common.item_table``: item_id,
    the ranking fields and the fused vectors); an older cached data set without them is rebuilt."""
    import pyarrow.parquet as pq

    from common.artifacts import ArtifactStore
    from common.item_index import VECTOR_COLUMNS
    from common.item_table import RANKING_FIELDS

    artifacts = ArtifactStore(str(paths.artifacts))
    version = artifacts.latest("embeddings", base)
    if version is None:
        return False
    names = set(pq.read_schema(artifacts.path("embeddings", base, version, "embeddings.parquet")).names)
    missing = {"item_id", *RANKING_FIELDS, VECTOR_COLUMNS["fused"]} - names
    if missing:
        log.info("the cached embeddings snapshot lacks %s: rebuilding the data set", sorted(missing))
    return not missing


def prepare(root: Path, store_uri: str, n: int, users: int, seed: int, index: str, base: str = "bench",
            kinds: tuple[str, ...] = ("visual", "fused")) -> dict[str, Any]:
    """Build (or reuse) the data set under ``root`` and make sure the store holds it; returns the setup record."""
    from common.vector_store import open_store

    paths = DataPaths(root)
    record_file = root / SETUP_FILE
    want = {"items": n, "users": users, "seed": seed, "index": index, "collection": base, "kinds": list(kinds)}
    if record_file.exists():
        record = json.loads(record_file.read_text())
        if {k: record.get(k) for k in want} == want and _snapshot_ok(paths, base):
            with open_store(store_uri) as store:
                names = set(store.list_collections())
                ok = all(f"{base}_{k}" in names for k in kinds) and f"{base}_users_fused" in names
                for name in names:  # a restarted server holds the collections but has not loaded them
                    store._client.load_collection(name)  # noqa: SLF001 - no load in the VectorStore protocol
                ok = ok and all(store.count(f"{base}_{k}") == n for k in kinds)
            if ok:
                log.info("reusing the data set under %s", root)
                return {**record, "reused": True}
            log.info("the store lacks the cached data set: rewriting it")
    root.mkdir(parents=True, exist_ok=True)
    from common.encoder import EncoderConfig, ItemEncoder
    from common.synthetic_events import generate_events, write_events, write_users
    from jobs.build_profiles import ProfilesConfig
    from jobs.build_profiles import run as build_profiles
    from jobs.mine_rules import MineRulesConfig
    from jobs.mine_rules import run as mine_rules
    from jobs.train_ranker import TrainRankerConfig
    from jobs.train_ranker import run as train_ranker
    from common.rules import RulesConfig

    timings: dict[str, Any] = {}
    t0 = time.perf_counter()
    df, texts = catalogue(n, seed)
    encoder = ItemEncoder(EncoderConfig())
    vectors = item_vectors(df, texts, encoder, seed)
    timings["vectors_s"] = round(time.perf_counter() - t0, 1)
    df.drop(columns=["attributes"]).to_parquet(paths.items, index=False)
    for kind in ("visual", "fused"):
        np.save(paths.vectors(kind), vectors[kind])
    timings["store_write_s"] = _write_store(store_uri, base, df, vectors, encoder.identity, index, kinds)
    emb_version = _publish_embeddings(paths, base, df, vectors, encoder, store_uri)
    del encoder
    t0 = time.perf_counter()
    events, user_frame = generate_events(df, n_users=users, days=30, seed=seed)
    write_events(events, str(paths.events))
    write_users(user_frame, str(paths.users))
    timings["events_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    rules = mine_rules(MineRulesConfig(events=str(paths.events), artifacts_uri=str(paths.artifacts), name=base,
                                       rules=RulesConfig(on_oversize="prune")))
    timings["mine_rules_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    profiles = build_profiles(ProfilesConfig(events=str(paths.events), collection=base, store_uri=store_uri,
                                             artifacts_uri=str(paths.artifacts)))
    timings["build_profiles_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    ranker = train_ranker(TrainRankerConfig(events=str(paths.events), collection=base,
                                            artifacts_uri=str(paths.artifacts)))
    timings["train_ranker_s"] = round(time.perf_counter() - t0, 1)
    record = {**want, "events": len(events), "event_users": int(events["user_id"].nunique()),
              "embeddings_version": emb_version, "rules": rules.rules, "baskets": rules.baskets,
              "profiles": profiles.users, "ranker": ranker.identity, "timings": timings,
              "vectors": "synthetic image/visual clusters; real text-encoder vectors of item texts; fused = fuse()"}
    record_file.write_text(json.dumps(record, indent=2, default=str))
    return {**record, "reused": False}


# ------------------------------------------------------------------------------ the single-process baseline


class BruteForceIndex:
    """Every item vector in memory; top-k by a matrix-vector product (cosine on unit vectors), filters as masks."""

    def __init__(self, paths: DataPaths, base: str) -> None:
        import pyarrow.parquet as pq

        from common.artifacts import ArtifactStore

        self.items = pd.read_parquet(paths.items)
        self.ids = self.items["item_id"].to_numpy(dtype=object)
        self.row = {item: i for i, item in enumerate(self.ids)}
        self.in_stock = self.items["in_stock"].to_numpy(bool)
        self.fused = np.load(paths.vectors("fused"))
        self.visual = np.load(paths.vectors("visual"))
        artifacts = ArtifactStore(str(paths.artifacts))
        name = f"{base}_users_fused"
        version = artifacts.latest("profiles", name)
        table = pq.read_table(artifacts.path("profiles", name, version, "profiles.parquet"))
        self.profiles = {u: np.asarray(v, np.float32) for u, v in zip(table.column("user_id").to_pylist(),
                                                                      table.column("vector").to_pylist())}
        events = pd.read_parquet(paths.events, columns=["user_id", "item_id"])
        self.seen = {u: set(g) for u, g in events.groupby("user_id")["item_id"]}
        self.shown = self.items[["item_id", "title", "category", "brand", "price"]].to_dict("records")

    def top(self, matrix: np.ndarray, query: np.ndarray, k: int, exclude: set[str]) -> list[dict[str, Any]]:
        scores = matrix @ query
        scores[~self.in_stock] = -np.inf
        for item in exclude:
            i = self.row.get(item)
            if i is not None:
                scores[i] = -np.inf
        best = np.argpartition(-scores, k)[:k]
        best = best[np.argsort(-scores[best])]
        return [{**self.shown[i], "score": round(float(scores[i]), 5)} for i in best]


def baseline_app(paths: DataPaths, base: str, with_text: bool = True) -> Any:
    """FastAPI app: similar, recommendations, search and events, all in one process (what the sources did)."""
    from fastapi import FastAPI, HTTPException

    index = BruteForceIndex(paths, base)
    encoder = None
    if with_text:
        from common.encoder import EncoderConfig, ItemEncoder

        encoder = ItemEncoder(EncoderConfig())
        encoder.encode_texts(["warm-up query"])
    app = FastAPI(title="brute-force baseline")
    sessions: dict[str, list[str]] = {}

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/items/{item_id}/similar")
    def similar(item_id: str, k: int = 10) -> dict[str, Any]:
        i = index.row.get(item_id)
        if i is None:
            raise HTTPException(404, f"unknown item_id {item_id!r}")
        return {"items": index.top(index.visual, index.visual[i], k, {item_id})}

    @app.get("/users/{user_id}/recommendations")
    def recommendations(user_id: str, k: int = 10) -> dict[str, Any]:
        profile = index.profiles.get(user_id)
        if profile is None:
            raise HTTPException(404, f"unknown user_id {user_id!r}")
        return {"items": index.top(index.fused, profile, k, index.seen.get(user_id, set()))}

    @app.get("/search")
    def search(q: str, k: int = 10) -> dict[str, Any]:
        if encoder is None:
            raise HTTPException(404, "text search disabled")
        return {"items": index.top(index.fused, encoder.encode_texts([q])[0], k, set())}

    @app.post("/events")
    def events(body: dict[str, Any]) -> dict[str, Any]:
        for e in body.get("events", []):
            sessions.setdefault(e["user_id"], []).append(e["item_id"])
        return {"accepted": len(body.get("events", []))}

    return app
