"""Batch job: train the two-tower model with Ray Train, publish the model and write its vectors to the store.

read events + item content vectors -> ``TorchTrainer`` (DDP: gloo on CPU, NCCL on GPU; each worker trains on
its shard of the positive pairs; rank 0 checkpoints every epoch; a failed worker group restarts from the last
checkpoint, up to ``max_failures`` times) -> export L2-normalised item and user vectors -> artifact version
``two_tower/<collection>/<version>`` (model.pt, vectors) + collections ``<collection>_two_tower_items`` and
``<collection>_two_tower_users`` -> ``LATEST`` moves only when all of that succeeded.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from fsspec.core import url_to_fs

from common.artifacts import ArtifactStore
from common.config import default_artifacts_uri, default_catalog, default_store_uri, from_mapping, values_from_args
from common.datasets import DATASETS, item_table_ids, load_dataset
from common.embedding_cache import vector_column
from common.errors import ConfigError, NotFoundError, TrainingFailedError
from common.events import EventWeights, load_events, user_segments
from common.interactions import TrainData, build_interactions
from common.item_index import VECTOR_KINDS, check_base_name
from common.two_tower import (
    TowerInputs,
    TwoTowerConfig,
    TwoTowerModel,
    build_inputs,
    export_item_vectors,
    export_user_vectors,
    make_optimizer,
    run_epoch,
)
from common.vector_store import open_store, replace_vectors
from jobs.ray_runtime import cluster_cpus, cluster_gpus, ensure_ray

log = logging.getLogger(__name__)

KIND = "two_tower"  # artifact kind
CONTENT_SOURCES = ("embeddings", "text", "none")
_STATE = "state.pt"  # the file inside each Ray Train checkpoint


def default_events() -> str:
    return str(Path(default_catalog()).parent / "events.parquet")


class InjectedFailure(RuntimeError):
    """Raised by the ``fail_after_epoch`` test hook to exercise recovery from a checkpoint."""


@dataclass(frozen=True)
class TrainTwoTowerConfig:
    events: str = field(default_factory=default_events)  # events file (Parquet, CSV, JSON Lines): path or URI
    dataset: str | None = None  # a named data set (common.datasets) instead of ``events``
    users: str | None = None  # user features file (user_id, age, region) for segments; default: the sample's
    collection: str = "items"  # catalogue name: content vectors from its embed snapshot; names the output collections
    content: str = "embeddings"  # item content: "embeddings" (the embed job's snapshot), "text" (encode the data
    #                              set's item text), "none" (id embeddings only: no cold start)
    content_kind: str = "fused"  # which embed vector kind is the content vector
    model: TwoTowerConfig = field(default_factory=TwoTowerConfig)  # towers, loss and optimisation
    workers: int = 2  # Ray Train workers (one DDP process each)
    use_gpu: bool | None = None  # None = when the cluster has at least one GPU per worker
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the job fails
    fail_after_epoch: int | None = None  # test hook: the workers raise once after this (1-based) epoch
    store_uri: str = field(default_factory=default_store_uri)  # vector store: a folder (Milvus Lite) or http://...
    artifacts_uri: str = field(default_factory=default_artifacts_uri)  # model versions and Ray checkpoints go here
    index: str = "AUTOINDEX"  # Milvus index type of the output collections
    ray_address: str | None = None  # None = $RAY_ADDRESS or a local Ray

    def __post_init__(self) -> None:
        check_base_name(self.collection)
        if self.dataset is not None and self.dataset not in DATASETS:
            raise ConfigError(f"dataset must be one of {', '.join(DATASETS)}. Got {self.dataset!r}")
        if self.content not in CONTENT_SOURCES:
            raise ConfigError(f"content must be one of {', '.join(CONTENT_SOURCES)}. Got {self.content!r}")
        if self.content == "text" and self.dataset is None:
            raise ConfigError("content='text' encodes a named data set's item text: set dataset too")
        if self.content_kind not in VECTOR_KINDS:
            raise ConfigError(f"content_kind must be one of {', '.join(VECTOR_KINDS)}. Got {self.content_kind!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers must be an integer >= 1. Got {self.workers!r}")
        if isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise ConfigError(f"max_failures must be an integer >= -1 (-1 = unlimited). Got {self.max_failures!r}")
        if self.fail_after_epoch is not None and not 1 <= self.fail_after_epoch < self.model.epochs:
            raise ConfigError(f"fail_after_epoch must be within [1, {self.model.epochs - 1}]. Got {self.fail_after_epoch}")


@dataclass(frozen=True)
class TrainTwoTowerResult:
    version: str  # artifact version (two_tower/<collection>/<version>)
    model_identity: str  # recorded in both collections: "two_tower:<collection>/<version>"
    epochs: int  # epochs completed
    resumed_at_epoch: int | None  # first epoch of the attempt that finished, when it resumed from a checkpoint
    final_loss: float  # mean training loss of the last epoch (rank 0's shard)
    users: int  # user vectors written
    items: int  # item vectors written
    cold_items: int  # items without training events, served from content alone
    workers: int
    used_gpu: bool
    checkpoint_uri: str  # the last Ray Train checkpoint
    model_uri: str  # model.pt of this version
    items_collection: str
    users_collection: str
    seconds: float

    def summary(self) -> str:
        resumed = f" resumed_at_epoch={self.resumed_at_epoch}" if self.resumed_at_epoch else ""
        return (f"two-tower {self.version}: epochs={self.epochs}{resumed} loss={self.final_loss:.4f} "
                f"users={self.users} items={self.items} cold_items={self.cold_items} workers={self.workers} "
                f"gpu={self.used_gpu} collections={self.items_collection},{self.users_collection} "
                f"seconds={self.seconds:.1f}")


# --------------------------------------------------------------------------------------------- inputs


def _embed_snapshot(cfg: TrainTwoTowerConfig) -> tuple[pd.DataFrame, str]:
    """(item_id, vector) from the embed job's latest snapshot of ``cfg.collection``, and its identity."""
    artifacts = ArtifactStore(cfg.artifacts_uri)
    try:
        manifest = artifacts.manifest("embeddings", cfg.collection)
    except NotFoundError as e:
        raise NotFoundError(f"no item embeddings for catalogue {cfg.collection!r} under {cfg.artifacts_uri}: run "
                            f"`vitrine embed --collection {cfg.collection}` first (or use content='none')") from e
    uri = manifest["result"]["embeddings_uri"]
    fs, path = url_to_fs(uri)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=["item_id", f"{cfg.content_kind}_vector"])
    vectors = np.asarray(table.column(1).to_pylist(), dtype=np.float32)
    frame = pd.DataFrame({"item_id": table.column(0).to_pylist(), "vector": list(vectors)})
    return frame, f"{manifest.get('encoder_identity', '?')}:{cfg.content_kind}@{uri}"


def load_train_data(cfg: TrainTwoTowerConfig) -> tuple[TrainData, str]:
    """Events, the catalogue (every item with content, seen or not), content vectors and segments."""
    items_table, users_table = None, None
    if cfg.dataset is not None:
        ds = load_dataset(cfg.dataset)
        events, items_table, users_table = ds.events, ds.items, ds.users
    content, identity = None, "none"
    if cfg.content == "embeddings":
        content, identity = _embed_snapshot(cfg)
    if cfg.dataset is None:
        checked = load_events(cfg.events, known_items=set(content["item_id"]) if content is not None else None)
        if len(checked.quarantine):
            log.warning("events %s: %s", cfg.events, checked.summary())
        events = checked.valid
        users_path = cfg.users or (str(Path(default_catalog()).parent / "users.parquet")
                                   if cfg.events == default_events() else None)
        users_table = pd.read_parquet(users_path) if users_path else None
    if content is not None:
        items = np.asarray(sorted(set(content["item_id"]) | set(events["item_id"])), dtype=object)
        by_id = content.set_index("item_id")["vector"]
        missing = sorted(set(items) - set(by_id.index))
        if missing:
            raise ConfigError(f"{len(missing)} event items have no content vector (e.g. {missing[0]!r}): re-run "
                              f"`vitrine embed` on the catalogue the events refer to")
        vectors = np.stack(by_id.reindex(items).to_numpy()).astype(np.float32)
    else:
        items = item_table_ids(items_table, events)
        vectors = None
    if cfg.content == "text":
        from common.encoder import EncoderConfig, ItemEncoder

        encoder = ItemEncoder(EncoderConfig())
        text = items_table.set_index("item_id")["text"].reindex(items).fillna("").tolist()
        vectors, identity = encoder.encode_texts(text), f"{encoder.identity}:text"
    users = np.asarray(sorted(events["user_id"].unique()), dtype=object)
    inter = build_interactions(events, EventWeights(), users, items)
    segments = user_segments(users_table) if users_table is not None else None
    return TrainData(inter, events, item_vectors=vectors, segments=segments), identity


# ------------------------------------------------------------------------------------------ training


def train_loop(config: dict) -> None:
    """Per worker: load the inputs, resume from the last checkpoint if any, train, checkpoint on rank 0."""
    import ray
    import ray.train
    import ray.train.torch

    inputs: TowerInputs = ray.get(config["inputs"])
    mcfg: TwoTowerConfig = config["model"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    model = TwoTowerModel.for_inputs(inputs, mcfg)
    optimizer = make_optimizer(model, mcfg)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, _STATE), map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"]
        log.info("rank %d resumes after epoch %d", rank, start)
    device = ray.train.torch.get_device()
    ddp = ray.train.torch.prepare_model(model)
    for epoch in range(start, mcfg.epochs):
        loss = run_epoch(ddp, optimizer, inputs, mcfg, epoch, rank, world, device=device)
        metrics = {"epoch": epoch + 1, "loss": loss, "start_epoch": start + 1, "resumed": checkpoint is not None}
        if rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                torch.save({"model": {k: v.cpu() for k, v in model.state_dict().items()},
                            "optimizer": optimizer.state_dict(), "epoch": epoch + 1}, os.path.join(folder, _STATE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)
        if config["fail_after_epoch"] == epoch + 1 and checkpoint is None:
            # every rank fails at the same point: a lone failure would leave the others blocked in an all-reduce
            # until Ray tears the group down, which only makes the test slow
            raise InjectedFailure(f"injected failure of rank {rank} after epoch {epoch + 1} (fail_after_epoch)")


def _fit(cfg: TrainTwoTowerConfig, inputs: TowerInputs, version: str, use_gpu: bool):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    threads = max(1, int(cluster_cpus() // cfg.workers))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"inputs": ray.put(inputs), "model": cfg.model, "threads": threads,
                           "fail_after_epoch": cfg.fail_after_epoch},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=version, storage_path=ArtifactStore(cfg.artifacts_uri).path(KIND, cfg.collection,
                                                                                                "ray"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:  # worker and controller errors, after max_failures restarts
        raise TrainingFailedError(f"two-tower training failed after {cfg.max_failures} restart(s): {e}") from e


def _use_gpu(cfg: TrainTwoTowerConfig) -> bool:
    gpus = cluster_gpus()
    if cfg.use_gpu and gpus < cfg.workers:
        raise ConfigError(f"use_gpu=True needs a GPU per worker: {cfg.workers} workers, the cluster has {gpus:g}")
    if cfg.use_gpu is None and 0 < gpus < cfg.workers:
        log.warning("the cluster has %g GPU(s) for %d workers: training on CPU", gpus, cfg.workers)
    return bool(cfg.use_gpu) if cfg.use_gpu is not None else gpus >= cfg.workers


# -------------------------------------------------------------------------------------------- outputs


def _write_vectors(uri: str, ids: np.ndarray, vectors: np.ndarray, id_column: str) -> None:
    fs, path = url_to_fs(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(pa.table({id_column: pa.array(ids.astype(str), pa.string()), "vector": vector_column(vectors)}),
                       f)


def run(cfg: TrainTwoTowerConfig) -> TrainTwoTowerResult:
    """Train on ``cfg``'s events and publish a new two-tower version."""
    t0 = time.perf_counter()
    data, content_identity = load_train_data(cfg)
    inputs = build_inputs(data)
    inter = data.interactions
    log.info("two-tower: %d users, %d items (%d without events), %d positive pairs, content %s",
             inter.n_users, inter.n_items, int((~inputs.known).sum()), len(inputs.pairs), content_identity)
    artifacts = ArtifactStore(cfg.artifacts_uri)
    version = artifacts.new_version(KIND, cfg.collection)
    ensure_ray(cfg.ray_address)
    use_gpu = _use_gpu(cfg)
    result = _fit(cfg, inputs, version, use_gpu)
    with result.checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, _STATE), map_location="cpu", weights_only=False)
    model = TwoTowerModel.for_inputs(inputs, cfg.model)
    model.load_state_dict(state["model"])
    item_vectors, user_vectors = export_item_vectors(model, inputs), export_user_vectors(model, inputs)

    identity = f"{KIND}:{cfg.collection}/{version}"
    model_uri = artifacts.path(KIND, cfg.collection, version, "model.pt")
    fs, path = url_to_fs(model_uri)
    with fs.open(path, "wb") as f:
        torch.save({"model": state["model"], "config": cfg.model.to_dict(), "items": inter.items.tolist(),
                    "users": inter.users.tolist(), "content": content_identity}, f)
    _write_vectors(artifacts.path(KIND, cfg.collection, version, "item_vectors.parquet"), inter.items, item_vectors,
                   "item_id")
    _write_vectors(artifacts.path(KIND, cfg.collection, version, "user_vectors.parquet"), inter.users, user_vectors,
                   "user_id")
    items_collection, users_collection = f"{cfg.collection}_two_tower_items", f"{cfg.collection}_two_tower_users"
    with open_store(cfg.store_uri) as store:  # a new collection each, then the name moves to it at once
        replace_vectors(store, items_collection, version, identity, inter.items, item_vectors, cfg.index)
        replace_vectors(store, users_collection, version, identity, inter.users, user_vectors, cfg.index)
    metrics = result.metrics or {}
    out = TrainTwoTowerResult(
        version=version, model_identity=identity, epochs=int(state["epoch"]),
        resumed_at_epoch=int(metrics["start_epoch"]) if metrics.get("resumed") else None,
        final_loss=float(metrics.get("loss", float("nan"))), users=inter.n_users, items=inter.n_items,
        cold_items=int((~inputs.known).sum()), workers=cfg.workers, used_gpu=use_gpu,
        checkpoint_uri=result.checkpoint.path, model_uri=model_uri, items_collection=items_collection,
        users_collection=users_collection, seconds=time.perf_counter() - t0)
    artifacts.publish(KIND, cfg.collection, version, {
        "result": dataclasses.asdict(out), "model": cfg.model.to_dict(), "content": content_identity,
        "events": cfg.dataset or cfg.events, "store_uri": cfg.store_uri, "dim": cfg.model.dim,
        "collections": {"items": items_collection, "users": users_collection},
    })
    return out


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="vitrine train two-tower", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file with TrainTwoTowerConfig settings (flags override it)")
    p.add_argument("--events", help="events file (default: the shipped sample's events)")
    p.add_argument("--dataset", choices=DATASETS, help="a named data set instead of --events")
    p.add_argument("--users", help="user features file (user_id, age, region) for segments")
    p.add_argument("--collection", help="catalogue name (default: items)")
    p.add_argument("--content", choices=CONTENT_SOURCES, help="item content vectors (default: embeddings)")
    p.add_argument("--content-kind", choices=VECTOR_KINDS, help="embed vector kind used as content (default: fused)")
    p.add_argument("--workers", type=int, help="Ray Train workers (default 2)")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--max-failures", type=int, help="restarts from the last checkpoint (default 2)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--loss", choices=("softmax", "bce"))
    p.add_argument("--dim", type=int)
    p.add_argument("--store", dest="store_uri", help="vector store: a folder (embedded Milvus Lite) or http://host:19530")
    p.add_argument("--artifacts", dest="artifacts_uri", help="artifact store folder or URI")
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainTwoTowerConfig:
    values = values_from_args(args, ("events", "dataset", "users", "collection", "content", "content_kind", "workers",
                                     "use_gpu", "max_failures", "store_uri", "artifacts_uri", "ray_address"),
                              {"model": ("epochs", "loss", "dim")}, uris=("events", "users", "store_uri", "artifacts_uri"))
    values["model"] = from_mapping(TwoTowerConfig, values["model"])
    return from_mapping(TrainTwoTowerConfig, values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(config_from_args(args))
    print(result.summary())
    return 0
