"""Batch job: embed a product catalogue with Ray Data (validate -> decode -> encoder actors -> writers) into Milvus.

Re-running is idempotent: vectors are cached by content hash, so only new or changed items are encoded; items
whose price or stock changed are re-upserted from the cache; items that left the catalogue are removed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from common.artifacts import ArtifactStore
from common.catalog import CATALOG_FIELDS, catalog_base_dir, read_catalog, validate_catalog
from common.config import default_artifacts_uri, default_catalog, default_store_uri, from_mapping, values_from_args
from common.embedding_cache import EmbeddingCache
from common.encoder import EncoderConfig, ItemEncoder
from common.errors import ConfigError
from common.item_index import VECTOR_COLUMNS, VECTOR_KINDS, check_base_name, collection_name, collection_specs, scalar_row, store_rows
from common.vector_store import VectorStore, open_store
from jobs.embed_stages import EncodeBatch, decode_images, inspect_images, write_batch
from jobs.ray_runtime import cluster_cpus, cluster_gpus, ensure_ray

log = logging.getLogger(__name__)

KIND = "embeddings"  # artifact kind
PIPELINE_COLUMNS = ("item_id", "title", "description", "category", "brand", "color", "image")


@dataclass(frozen=True)
class EmbedConfig:
    catalog: str = field(default_factory=default_catalog)  # catalogue file: Parquet, CSV or JSON Lines; path or URI
    collection: str = "items"  # catalogue name in the store (one collection per vector kind: items_visual, ...)
    store_uri: str = field(default_factory=default_store_uri)  # a folder (embedded Milvus Lite) or http://host:19530
    artifacts_uri: str = field(default_factory=default_artifacts_uri)  # embeddings, cache and quarantine go here
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # the open_clip model (see common.encoder)
    batch_size: int = 32  # images per encoder call
    encoders: int = 0  # encoder actors; 0 = one per GPU, or one per 2 CPUs without GPUs
    gpus_per_encoder: float | None = None  # None = 1 when the cluster has GPUs, else 0
    blocks: int = 0  # input blocks for Ray Data; 0 = 4 per encoder actor
    index: str = "AUTOINDEX"  # Milvus index type for new collections
    prune: bool = True  # remove items that left the catalogue (or were quarantined) from the store
    recreate: bool = False  # drop the catalogue's collections first (needed to change the model)
    ray_address: str | None = None  # None = $RAY_ADDRESS or a local Ray

    def __post_init__(self) -> None:
        check_base_name(self.collection)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1. Got {self.batch_size}")
        if self.encoders < 0 or self.blocks < 0:
            raise ConfigError(f"encoders and blocks must be >= 0. Got {self.encoders}, {self.blocks}")
        if self.gpus_per_encoder is not None and self.gpus_per_encoder < 0:
            raise ConfigError(f"gpus_per_encoder must be >= 0. Got {self.gpus_per_encoder}")


@dataclass(frozen=True)
class EmbedResult:
    collection: str
    version: str  # artifact version written (embeddings/<collection>/<version>)
    items: int  # valid items now in the store
    encoded: int  # items encoded in this run
    reused: int  # items whose vectors came from the cache
    upserted: int  # items written to the store in this run
    removed: int  # items removed from the store (left the catalogue or quarantined)
    quarantined: int
    seconds: float
    steady_items_per_s: float  # pipeline rate after its first output batch (actor start-up, conversion excluded)
    embeddings_uri: str
    quarantine_uri: str | None

    def summary(self) -> str:
        rate = self.encoded / self.seconds if self.seconds > 0 else 0.0
        return (f"embed {self.collection}: items={self.items} encoded={self.encoded} reused={self.reused} "
                f"upserted={self.upserted} removed={self.removed} quarantined={self.quarantined} "
                f"seconds={self.seconds:.1f} items/s={rate:.1f}")


def _attributes_column(table: pa.Table) -> pa.Table:
    """Pack free-form catalogue columns into one JSON string column ``attributes``."""
    known = {f.name for f in CATALOG_FIELDS}
    extra = [c for c in table.column_names if c not in known and c != "attributes"]
    rows = table.select(extra).to_pylist() if extra else [{}] * table.num_rows
    attrs = pa.array([json.dumps(r, default=str, sort_keys=True) for r in rows], pa.string())
    return table.drop_columns(extra).append_column("attributes", attrs)


def _plan_actors(cfg: EmbedConfig) -> tuple[int, float]:
    gpus = cluster_gpus()
    per = cfg.gpus_per_encoder if cfg.gpus_per_encoder is not None else (1.0 if gpus >= 1 else 0.0)
    if per > 0 and gpus < per:
        raise ConfigError(f"gpus_per_encoder={per} but the cluster has {gpus:g} GPUs")
    n = cfg.encoders or (int(gpus // per) if per > 0 else max(1, int(cluster_cpus() // 2)))
    if per == 0 and gpus >= 1:
        log.warning("the cluster has %g GPUs but encoders run on CPU (gpus_per_encoder=0)", gpus)
    return n, per


def _inspect(valid: pa.Table, identity: str, known: set[str], blocks: int) -> pa.Table:
    """Ray Data pass 1: one row per item with its content_hash, action and error."""
    import ray

    ds = ray.data.from_arrow(valid.select(list(PIPELINE_COLUMNS))).repartition(blocks)
    refs = ds.map_batches(inspect_images, batch_format="numpy", batch_size=64,
                          fn_kwargs={"identity": identity, "known": frozenset(known)}).to_arrow_refs()
    return pa.concat_tables(ray.get(refs))


def _plan_work(valid: pa.Table, inspected: pa.Table) -> tuple[pa.Table, pa.Table, list[tuple[str, str]], int]:
    """From pass 1: (valid with its content_hash column, rows to encode, [(item_id, error)], items cached)."""
    by_id = {r["item_id"]: r for r in inspected.to_pylist()}
    ids = valid.column("item_id").to_pylist()
    valid = valid.append_column("content_hash", pa.array([by_id[i]["content_hash"] for i in ids], pa.string()))
    todo = valid.filter(pa.array([by_id[i]["action"] == "encode" for i in ids]))
    errors = [(i, r["error"]) for i, r in by_id.items() if r["action"] == "error"]
    reused = sum(1 for r in by_id.values() if r["action"] == "cached")
    return valid, todo, errors, reused


def _split_rejected(valid: pa.Table, reasons: dict[str, str]) -> tuple[pa.Table, pa.Table]:
    """(rows that made it, rows that failed in the pipeline with their ``reason``, for the quarantine)."""
    failed = pc.is_in(valid.column("item_id"), pa.array(sorted(reasons), pa.string()))
    rejected = valid.filter(failed).drop_columns(["content_hash"])
    rejected = rejected.append_column(
        "reason", pa.array([reasons[i] for i in rejected.column("item_id").to_pylist()], pa.string()))
    return valid.filter(pc.invert(failed)), rejected


def _encode_and_write(cfg: EmbedConfig, todo: pa.Table, encoder: ItemEncoder, cache_uri: str, run_id: str,
                      n_actors: int, gpus: float) -> tuple[int, list[tuple[str, str]], float]:
    """Run the encoding pipeline; returns (items written, [(item_id, error), ...], steady items/s)."""
    import ray
    from ray.data import ActorPoolStrategy

    blocks = cfg.blocks or max(1, 4 * n_actors)
    ds = (ray.data.from_arrow(todo).repartition(blocks)
          .map_batches(decode_images, batch_format="numpy", batch_size=cfg.batch_size,
                       fn_kwargs={"image_size": encoder.image_size})
          .map_batches(EncodeBatch, batch_format="numpy", batch_size=cfg.batch_size,
                       fn_constructor_kwargs={"encoder_cfg": cfg.encoder,
                                              "threads": 0 if gpus else max(1, int(cluster_cpus() // n_actors))},
                       compute=ActorPoolStrategy(min_size=1, max_size=n_actors),
                       num_gpus=gpus, num_cpus=0 if gpus else 1)
          .map_batches(write_batch, batch_format="numpy", batch_size=256,
                       fn_kwargs={"store_uri": cfg.store_uri, "base": cfg.collection,
                                  "cache_uri": cache_uri, "run_id": run_id},
                       num_cpus=0.25))
    written, errors, first = 0, [], None
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if first is None:
            first = (time.perf_counter(), batch.num_rows)
        for item_id, err in zip(batch.column("item_id").to_pylist(), batch.column("error").to_pylist()):
            if err:
                errors.append((item_id, err))
            else:
                written += 1
        log.info("encoded %d/%d items", written + len(errors), todo.num_rows)
    steady = 0.0
    if first is not None and time.perf_counter() > first[0] and written + len(errors) > first[1]:
        steady = (written + len(errors) - first[1]) / (time.perf_counter() - first[0])
    return written, errors, steady


def _refresh(store: VectorStore, base: str, rows: pa.Table, vectors: pa.Table) -> int:
    """Upsert items whose stored fields differ from the catalogue; ``vectors`` is aligned with ``rows``."""
    stored = {}
    for page in store.scan(collection_name(base, "fused"), ["fingerprint"]):
        stored.update({r["item_id"]: r["fingerprint"] for r in page})
    items = rows.to_pylist()
    changed = [i for i, r in enumerate(items) if stored.get(r["item_id"]) != scalar_row(r)["fingerprint"]]
    for start in range(0, len(changed), 512):
        chunk = changed[start:start + 512]
        take = pa.array(chunk, pa.int64())
        arrays = {k: np.asarray(vectors.column(c).take(take).to_pylist(), dtype=np.float32)
                  for k, c in VECTOR_COLUMNS.items()}
        for kind, kind_rows in store_rows([items[i] for i in chunk], arrays).items():
            store.upsert(collection_name(base, kind), kind_rows)
    return len(changed)


def _prune(store: VectorStore, base: str, keep: set[str]) -> int:
    """Delete items not in ``keep`` from every kind (a run that died mid-batch may have written some kinds
    and not ``fused``); returns how many left the catalogue, as ``fused`` counts them."""
    removed = 0
    for kind in VECTOR_KINDS:
        name = collection_name(base, kind)
        stale = [r["item_id"] for page in store.scan(name, []) for r in page if r["item_id"] not in keep]
        if stale:
            store.delete(name, stale)
        if kind == "fused":
            removed = len(stale)
    return removed


def _write_parquet(table: pa.Table, uri: str) -> None:
    fs, path = url_to_fs(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def run(cfg: EmbedConfig) -> EmbedResult:
    """Embed ``cfg.catalog`` into the store and publish a new embeddings version."""
    t0 = time.perf_counter()
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    base = cfg.collection
    table = read_catalog(cfg.catalog)
    checked = validate_catalog(table, catalog_base_dir(cfg.catalog))
    valid = _attributes_column(checked.valid)
    quarantine = [checked.quarantine] if checked.quarantine.num_rows else []
    log.info("catalogue %s: %d rows, %d valid, %d quarantined by validation",
             cfg.catalog, table.num_rows, valid.num_rows, checked.quarantine.num_rows)

    encoder = ItemEncoder(cfg.encoder)
    store = open_store(cfg.store_uri)
    if cfg.recreate:
        for kind in VECTOR_KINDS:
            if store.has_collection(collection_name(base, kind)):
                store.drop_collection(collection_name(base, kind))
    for spec in collection_specs(base, encoder.identity, encoder.dims, cfg.index):
        store.ensure_collection(spec)

    artifacts = ArtifactStore(cfg.artifacts_uri)
    cache = EmbeddingCache(artifacts.path(KIND, base, "cache"))
    ensure_ray(cfg.ray_address)
    n_actors, gpus = _plan_actors(cfg)
    inspected = _inspect(valid, encoder.identity, cache.known_hashes(), cfg.blocks or max(1, 4 * n_actors))
    valid, todo, errors, reused = _plan_work(valid, inspected)
    encoded, steady = 0, 0.0
    if todo.num_rows:
        log.info("encoding %d items with %d encoder actor(s), %g GPU each", todo.num_rows, n_actors, gpus)
        encoded, late_errors, steady = _encode_and_write(cfg, todo, encoder, cache.uri, run_id, n_actors, gpus)
        errors += late_errors
    good, rejected = _split_rejected(valid, dict(errors))
    if rejected.num_rows:
        quarantine.append(rejected)

    vectors = cache.aligned(good.column("content_hash").to_pylist())  # one read of the cache for both uses
    refreshed = _refresh(store, base, good, vectors)
    removed = _prune(store, base, set(good.column("item_id").to_pylist())) if cfg.prune else 0
    for kind in VECTOR_KINDS:
        store.flush(collection_name(base, kind))

    version = artifacts.new_version(KIND, base)
    embeddings_uri = artifacts.path(KIND, base, version, "embeddings.parquet")
    _write_parquet(_snapshot(good, vectors), embeddings_uri)
    quarantine_uri = None
    if quarantine:
        quarantine_uri = artifacts.path(KIND, base, version, "quarantine", "rows.parquet")
        _write_parquet(pa.concat_tables(quarantine, promote_options="permissive"), quarantine_uri)
    cache.compact(set(good.column("content_hash").to_pylist()), run_id)
    n_quarantined = sum(t.num_rows for t in quarantine)
    result = EmbedResult(collection=base, version=version, items=good.num_rows, encoded=encoded,
                         reused=reused, upserted=refreshed + encoded, removed=removed, quarantined=n_quarantined,
                         seconds=time.perf_counter() - t0, steady_items_per_s=round(steady, 2),
                         embeddings_uri=embeddings_uri,
                         quarantine_uri=quarantine_uri)
    artifacts.publish(KIND, base, version, {
        "result": dataclasses.asdict(result),
        "encoder": dataclasses.asdict(cfg.encoder),
        "encoder_identity": encoder.identity,
        "dims": encoder.dims,
        "catalog": cfg.catalog,
        "store_uri": cfg.store_uri,
        "collections": {k: collection_name(base, k) for k in VECTOR_KINDS},
    })
    store.close()
    return result


def _snapshot(good: pa.Table, vectors: pa.Table) -> pa.Table:
    """Every valid item with its metadata and vectors (aligned with ``good``): what downstream jobs read."""
    image = good.column("image")
    if pa.types.is_binary(image.type) or pa.types.is_large_binary(image.type):
        image = pa.array(["<bytes>"] * good.num_rows, pa.string())
    meta = good.drop_columns(["image"]).append_column("image", image)
    for column in VECTOR_COLUMNS.values():
        meta = meta.append_column(column, vectors.column(column))
    return meta


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="vitrine embed", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file with EmbedConfig settings (flags override it)")
    p.add_argument("--catalog", help="catalogue file (Parquet, CSV, JSON Lines); default: the shipped sample")
    p.add_argument("--collection", help="catalogue name in the store (default: items)")
    p.add_argument("--store", dest="store_uri", help="vector store: a folder (embedded Milvus Lite) or http://host:19530")
    p.add_argument("--artifacts", dest="artifacts_uri", help="artifact store folder or URI")
    p.add_argument("--model", help="open_clip architecture or preset (default: vitrine-effnet-minilm-aligned)")
    p.add_argument("--pretrained", help="pretrained tag, weights file or local-dir:PATH")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--runtime", choices=["auto", "torch", "openvino"],
                   help="the towers' runtime (default auto: OpenVINO on the CPU where installed, torch on CUDA)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--encoders", type=int, help="encoder actors (default: one per GPU, or per 2 CPUs)")
    p.add_argument("--gpus-per-encoder", type=float)
    p.add_argument("--index", help="Milvus index type for new collections (default AUTOINDEX)")
    p.add_argument("--no-prune", dest="prune", action="store_false", default=None)
    p.add_argument("--recreate", action="store_true", default=None, help="drop the collections first")
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    return p


def config_from_args(args: argparse.Namespace) -> EmbedConfig:
    values = values_from_args(args, ("catalog", "collection", "store_uri", "artifacts_uri", "batch_size", "encoders",
                                     "gpus_per_encoder", "index", "prune", "recreate", "ray_address"),
                              {"encoder": ("model", "pretrained", "precision", "runtime")},
                              uris=("store_uri", "artifacts_uri", "catalog"))
    return from_mapping(EmbedConfig, values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(config_from_args(args))
    print(result.summary())
    return 0
