"""Batch job: train GraphSAGE on the user-item graph with Ray Train, then publish its checkpoint and vectors.

Reads an events file and the item content vectors of the latest ``vitrine embed`` snapshot; trains a
``TorchTrainer`` (one process per worker, DDP over gloo on CPU or NCCL on GPUs, positive edges sharded per worker,
a checkpoint every epoch, restarts from the last one after a worker failure); then, on the driver, embeds every
user and item with full neighbourhoods and writes ``<collection>_graphsage_items`` / ``_users`` to the vector store
and the checkpoint to ``<artifacts>/graphsage/<collection>/<version>/``, moving ``LATEST`` only when all is done.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from fsspec.core import url_to_fs

from common.artifacts import ArtifactStore, upload_folder
from common.config import default_artifacts_uri, default_catalog, default_store_uri, from_mapping, values_from_args
from common.errors import ConfigError, NotFoundError, TrainingFailedError
from common.events import EventWeights, load_events
from common.graph_sampler import BipartiteGraph, make_sampler
from common.graphsage import (
    GraphSAGE,
    GraphSAGEConfig,
    GraphTensors,
    describe,
    embed_graph,
    export_item_vectors,
    export_user_vectors,
    shard,
    train_epoch,
)
from common.interactions import build_interactions
from common.item_index import VECTOR_KINDS, check_base_name
from common.vector_store import open_store, replace_vectors
from jobs.ray_runtime import cluster_gpus, ensure_ray

log = logging.getLogger(__name__)

KIND = "graphsage"  # artifact kind
STATE_FILE = "state.pt"  # inside each checkpoint: model and optimizer state, epochs done, model config
EpochHook = Callable[[int, int], None]  # (epochs done, world rank), called on every worker after each epoch


def default_events() -> str:
    """The shipped sample shoppers' events, beside the sample catalogue."""
    return str(Path(default_catalog()).parent / "events.parquet")


@dataclass(frozen=True)
class TrainGraphSAGEConfig:
    events: str = field(default_factory=default_events)  # events file (Parquet, CSV, JSON Lines); path or URI
    collection: str = "items"  # catalogue name: reads embeddings/<collection>, writes <collection>_graphsage_*
    vector_kind: str = "fused"  # which snapshot vector is the items' content feature (visual, image, text, fused)
    item_vectors: str | None = None  # a Parquet with item_id and <vector_kind>_vector; None = latest embed snapshot
    store_uri: str = field(default_factory=default_store_uri)  # a folder (embedded Milvus Lite) or http://host:19530
    artifacts_uri: str = field(default_factory=default_artifacts_uri)
    model: GraphSAGEConfig = field(default_factory=GraphSAGEConfig)  # the model and its training settings
    num_workers: int = 2  # Ray Train workers (data-parallel processes)
    use_gpu: bool | None = None  # None = when the cluster has GPUs
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the job fails
    storage_path: str | None = None  # Ray Train run storage; None = <artifacts>/graphsage/<collection>/ray
    index: str = "AUTOINDEX"  # Milvus index type for new collections
    ray_address: str | None = None  # None = $RAY_ADDRESS or a local Ray

    def __post_init__(self) -> None:
        check_base_name(self.collection)
        if self.vector_kind not in VECTOR_KINDS:
            raise ConfigError(f"vector_kind must be one of {', '.join(VECTOR_KINDS)}. Got {self.vector_kind!r}")
        if self.num_workers < 1:
            raise ConfigError(f"num_workers must be >= 1. Got {self.num_workers}")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures must be >= 0 (or -1 = unlimited). Got {self.max_failures}")


@dataclass(frozen=True)
class TrainGraphSAGEResult:
    collection: str
    version: str  # artifact version written (graphsage/<collection>/<version>)
    model: str  # the identity recorded in the vector collections
    epochs: int  # epochs completed
    final_loss: float  # mean training loss of the last epoch, over all workers
    resumed_at_epoch: int | None  # 1-based epoch the last attempt started at when it resumed from a checkpoint
    workers: int
    users: int  # user vectors written (users with at least one positive event)
    items: int  # item vectors written (every item with content vectors, cold ones inductively)
    cold_items: int  # items without any positive event: embedded from content alone
    edges: int  # positive user-item edges trained on
    quarantined: int  # event rows that could not be used
    item_collection: str
    user_collection: str
    checkpoint_uri: str
    seconds: float

    def summary(self) -> str:
        resumed = f" resumed_at_epoch={self.resumed_at_epoch}" if self.resumed_at_epoch else ""
        return (f"graphsage {self.collection}: version={self.version} epochs={self.epochs} loss={self.final_loss:.4f}"
                f"{resumed} workers={self.workers} users={self.users} items={self.items} cold_items={self.cold_items} "
                f"edges={self.edges} quarantined={self.quarantined} seconds={self.seconds:.1f}")


def collection_names(base: str) -> tuple[str, str]:
    """(item collection, user collection) for catalogue ``base``."""
    return f"{check_base_name(base)}_graphsage_items", f"{base}_graphsage_users"


def load_item_vectors(cfg: TrainGraphSAGEConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """(item ids, [I, D] float32 vectors, where they came from) from ``cfg.item_vectors`` or the embed snapshot."""
    column = f"{cfg.vector_kind}_vector"
    uri, source = cfg.item_vectors, cfg.item_vectors
    if uri is None:
        try:
            manifest = ArtifactStore(cfg.artifacts_uri).manifest("embeddings", cfg.collection)
        except NotFoundError as e:
            raise NotFoundError(f"no item vectors for catalogue {cfg.collection!r} under {cfg.artifacts_uri}: run "
                                f"`vitrine embed --collection {cfg.collection}` first (or pass item_vectors)") from e
        uri = manifest["result"]["embeddings_uri"]
        source = f"{uri} ({manifest.get('encoder_identity', 'unknown encoder')})"
    fs, path = url_to_fs(uri)
    if not fs.exists(path):
        raise NotFoundError(f"item vectors file {uri} does not exist: run `vitrine embed --collection "
                            f"{cfg.collection}` first")
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    if "item_id" not in table.column_names or column not in table.column_names:
        raise ConfigError(f"{uri} needs columns item_id and {column}; it has {table.column_names}")
    vectors = np.asarray(table.column(column).to_pylist(), dtype=np.float32)
    return np.asarray(table.column("item_id").to_pylist(), dtype=object), vectors, source


def _save_state(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, epochs_done: int,
                cfg: GraphSAGEConfig, in_dim: int, n_nodes: int) -> None:
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epochs_done": epochs_done,
                "config": cfg.to_dict(), "in_dim": in_dim, "n_nodes": n_nodes}, Path(folder) / STATE_FILE)


def load_model(folder: str) -> tuple[GraphSAGE, dict]:
    """The trained model from a checkpoint folder (and the raw state, for its config and epoch count)."""
    state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
    cfg = GraphSAGEConfig(**state["config"])
    model = GraphSAGE(state["in_dim"], cfg, state["n_nodes"])
    model.load_state_dict(state["model"])
    return model, state


def _mean_over_workers(value: float) -> float:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t.item()) / torch.distributed.get_world_size()


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: resume from the last checkpoint, train its shard each epoch, report every epoch."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg: GraphSAGEConfig = config["model"]
    hook: EpochHook | None = config.get("on_epoch_end")
    graph: BipartiteGraph = ray.get(config["graph"])
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    model = GraphSAGE(graph.dim, cfg, graph.n_nodes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["epochs_done"])
        log.info("worker %d resumes after epoch %d", rank, start)
    model = ray.train.torch.prepare_model(model)
    raw = model.module if hasattr(model, "module") else model
    g, sampler, edges = GraphTensors.of(graph, device), make_sampler(cfg.sampler), graph.user_item_edges()
    for epoch in range(start, cfg.epochs):
        mine = shard(edges, rank, world, np.random.default_rng([cfg.seed, epoch]))
        loss = train_epoch(model, optimizer, g, mine, cfg, sampler, np.random.default_rng([cfg.seed, epoch, rank]))
        metrics = {"epoch": epoch + 1, "loss": _mean_over_workers(loss), "start_epoch": start, "world": world}
        if rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                _save_state(folder, raw, optimizer, epoch + 1, cfg, graph.dim, graph.n_nodes)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)
        if hook is not None:
            hook(epoch + 1, rank)


def _fit(cfg: TrainGraphSAGEConfig, graph: BipartiteGraph, run_name: str, on_epoch_end: EpochHook | None):
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = cluster_gpus() >= cfg.num_workers if cfg.use_gpu is None else cfg.use_gpu
    storage = cfg.storage_path or ArtifactStore(cfg.artifacts_uri).path(KIND, cfg.collection, "ray")
    if "://" not in storage:
        Path(storage).mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"graph": ray.put(graph), "model": cfg.model, "on_epoch_end": on_epoch_end},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),  # the last one is what counts
    )
    log.info("training GraphSAGE on %d edges with %d worker(s), gpu=%s", len(graph.user_item_edges()),
             cfg.num_workers, use_gpu)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:  # the workers' error, after max_failures restarts
        raise TrainingFailedError(f"GraphSAGE training failed after {cfg.max_failures} restart(s): {e}") from e
    if result.error is not None or result.checkpoint is None:
        raise TrainingFailedError(f"GraphSAGE training ended without a checkpoint: {result.error}")
    return result


def run(cfg: TrainGraphSAGEConfig, on_epoch_end: EpochHook | None = None) -> TrainGraphSAGEResult:
    """Train, embed, write vectors and checkpoint, publish. ``on_epoch_end`` runs on every worker after each
    epoch's checkpoint (fault drills raise from it)."""
    t0 = time.perf_counter()
    item_ids, item_vectors, source = load_item_vectors(cfg)
    checked = load_events(cfg.events, known_items=set(item_ids))
    interactions = build_interactions(checked.valid, EventWeights(), items=item_ids)
    graph = BipartiteGraph.from_interactions(interactions, item_vectors)
    n_edges = len(graph.user_item_edges())
    if n_edges == 0:
        raise ConfigError(f"{cfg.events} holds no positive events on items of catalogue {cfg.collection!r}")

    ensure_ray(cfg.ray_address)
    artifacts = ArtifactStore(cfg.artifacts_uri)
    version = artifacts.new_version(KIND, cfg.collection)
    result = _fit(cfg, graph, f"graphsage-{cfg.collection}-{version}-{uuid.uuid4().hex[:6]}", on_epoch_end)
    checkpoint_uri = artifacts.path(KIND, cfg.collection, version, "checkpoint")
    with result.checkpoint.as_directory() as folder:
        model, state = load_model(folder)
        upload_folder(folder, checkpoint_uri)
    user_emb, item_emb = embed_graph(model, graph)
    active = graph.degree[:graph.n_users] > 0
    model_id = f"{describe(cfg.model)}@{version}"
    item_collection, user_collection = collection_names(cfg.collection)
    store = open_store(cfg.store_uri)
    try:
        # a new collection per training, the name moved to it when complete: searches never see a gap or a mix
        n_items = replace_vectors(store, item_collection, version, model_id, item_ids,
                                  export_item_vectors(item_emb), cfg.index)
        n_users = replace_vectors(store, user_collection, version, model_id, interactions.users[active],
                                  export_user_vectors(user_emb[active]), cfg.index)
    finally:
        store.close()
    start = int(result.metrics.get("start_epoch", 0))
    out = TrainGraphSAGEResult(
        collection=cfg.collection, version=version, model=model_id, epochs=int(state["epochs_done"]),
        final_loss=float(result.metrics["loss"]), resumed_at_epoch=start + 1 if start else None,
        workers=cfg.num_workers, users=n_users, items=n_items,
        cold_items=int((graph.degree[graph.n_users:] == 0).sum()), edges=n_edges,
        quarantined=len(checked.quarantine), item_collection=item_collection, user_collection=user_collection,
        checkpoint_uri=checkpoint_uri, seconds=time.perf_counter() - t0)
    artifacts.publish(KIND, cfg.collection, version, {
        "result": dataclasses.asdict(out), "config": dataclasses.asdict(cfg), "item_features": source,
        "ray_run": str(result.path), "collections": {"items": item_collection, "users": user_collection}})
    return out


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="vitrine train graphsage", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file with TrainGraphSAGEConfig settings (flags override it)")
    p.add_argument("--events", help="events file (default: the shipped sample's events)")
    p.add_argument("--collection", help="catalogue name (default: items)")
    p.add_argument("--vector-kind", choices=VECTOR_KINDS, help="item content vector to use (default: fused)")
    p.add_argument("--item-vectors", help="Parquet with item_id and <kind>_vector (default: latest embed snapshot)")
    p.add_argument("--store", dest="store_uri", help="vector store: a folder (Milvus Lite) or http://host:19530")
    p.add_argument("--artifacts", dest="artifacts_uri", help="artifact store folder or URI")
    p.add_argument("--workers", dest="num_workers", type=int, help="Ray Train workers (default 2)")
    p.add_argument("--use-gpu", dest="use_gpu", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--max-failures", type=int, help="restarts from the last checkpoint (default 2)")
    p.add_argument("--storage-path", help="Ray Train run storage (default: under the artifact store)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainGraphSAGEConfig:
    values = values_from_args(args, ("events", "collection", "vector_kind", "item_vectors", "store_uri",
                                     "artifacts_uri", "num_workers", "use_gpu", "max_failures", "storage_path",
                                     "ray_address"),
                              {"model": ("epochs", "batch_size")},
                              uris=("store_uri", "artifacts_uri", "events", "item_vectors", "storage_path"))
    values["model"] = {**dataclasses.asdict(TrainGraphSAGEConfig().model), **values["model"]}
    return from_mapping(TrainGraphSAGEConfig, values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(config_from_args(args))
    print(result.summary())
    return 0
