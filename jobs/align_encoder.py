"""Batch job: align the frozen image and text towers (LiT-style heads) on catalogue pairs with Ray Train.

Pairs are Fashion-MNIST *train* photos with the catalogue texts the shipped sample generates for their class
(:func:`common.sample_catalog.sample_table`, read as the embed job reads them, :func:`jobs.embed_stages.item_text`).
The frozen towers' outputs are computed once and cached by encoder identity and content; a ``TorchTrainer``
trains the heads of :mod:`common.alignment` on them (each worker a shard, DDP over gloo on CPUs), checkpointing
every epoch and resuming from the last checkpoint when a worker fails. The result is a new open_clip
``local-dir:`` model folder, ``<artifacts>/models/<name>/<version>/``, with a ``manifest.json`` beside it, that
``ItemEncoder(EncoderConfig(model="local-dir:<folder>"))`` loads like any other (in object storage, e.g.
``local-dir:s3://bucket/artifacts/models/<name>/<version>``, it is fetched once into the cache). Zero-shot accuracy
and same-class precision@10 on the Fashion-MNIST *test* split are measured before and after. The epoch kept is the
one with the best score on a validation set of *train*-split photos outside the training pairs (``val_per_class``
per class): the test split never chooses anything.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import fashion_mnist
from common.alignment import (
    HEADS_FILE,
    MANIFEST_FILE,
    AlignmentHeads,
    TrainSettings,
    cached_features,
    embed,
    encode_features,
    precision_at_k,
    write_aligned_model,
    zero_shot_accuracy,
)
from common.artifacts import ArtifactStore, upload_folder
from common.config import default_artifacts_uri, from_mapping, resolve_uri, values_from_args
from common.encoder import EncoderConfig, ItemEncoder
from common.errors import ConfigError
from common.model_assets import ALIGNED_MODEL_NAME, BASE_MODEL_NAME, PRESETS, ensure_model
from common.sample_catalog import sample_table, select_indices
from jobs.embed_stages import item_text
from jobs.ray_runtime import cluster_gpus, ensure_ray

log = logging.getLogger(__name__)

KIND = "models"  # artifact kind
PROMPT = "a photo of a {}."  # the zero-shot prompt of benchmarks/image_quality.py
_PROMPT_NAMES = {"T-shirt/top": "t-shirt"}  # the rest are lower-cased as they are
STATE_FILE = "state.pt"  # inside each Ray Train checkpoint


@dataclass(frozen=True)
class AlignConfig:
    name: str = ALIGNED_MODEL_NAME  # artifact name: <artifacts>/models/<name>/<version>/ is the model folder
    base_model: str = BASE_MODEL_NAME  # the preset whose frozen towers are aligned
    catalog: str | None = None  # align on this catalogue's own pairs (jobs/align_data.py) instead of Fashion-MNIST
    per_class: int = 2000  # Fashion-MNIST train images per class used as pairs (at most 6000)
    eval_per_class: int = 200  # first test images per class for the before/after metrics
    seed: int = 0  # train subset, generated texts, head initialisation and shuffling
    epochs: int = 12  # passes over the pairs; the best epoch on the validation photos is kept
    val_per_class: int = 200  # train-split photos per class outside the pairs that choose the epoch (0 = last)
    train: TrainSettings = field(default_factory=TrainSettings)  # batch size, learning rate, regularisation
    workers: int = 2  # Ray Train workers (each trains on its shard; gradients averaged by DDP)
    use_gpu: bool | None = None  # None = when the cluster has GPUs
    precision: str = "auto"  # frozen-tower precision for the one-off feature extraction
    artifacts_uri: str = field(default_factory=default_artifacts_uri)  # a folder or URI (s3://, gs://)
    features_dir: str | None = None  # frozen-feature cache; None = <VITRINE_CACHE>/features/alignment
    export_heads: str | None = None  # also write heads.safetensors + manifest.json here (the shipped preset)
    max_failures: int = 1  # worker failures Ray Train recovers from (from the last checkpoint)
    fail_after_epoch: int = 0  # testing hook: the first attempt raises after this epoch (0 = never)
    verify: bool = True  # reload the written folder with ItemEncoder and check it reproduces the heads
    ray_address: str | None = None  # None = $RAY_ADDRESS or a local Ray

    def __post_init__(self) -> None:
        if self.base_model not in PRESETS:
            raise ConfigError(f"base_model must be one of {PRESETS}. Got {self.base_model!r}")
        if not 0 <= self.val_per_class <= 6000 - self.per_class:
            raise ConfigError(f"val_per_class must be in [0, {6000 - self.per_class}] (train photos left after "
                              f"per_class={self.per_class}). Got {self.val_per_class}")
        if not 1 <= self.per_class <= 6000 or not 1 <= self.eval_per_class <= 1000:
            raise ConfigError(f"per_class must be in [1, 6000] and eval_per_class in [1, 1000]. "
                              f"Got {self.per_class}, {self.eval_per_class}")
        for name in ("epochs", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1. Got {getattr(self, name)}")
        if self.max_failures < 0 or not 0 <= self.fail_after_epoch <= self.epochs:
            raise ConfigError(f"max_failures must be >= 0 and fail_after_epoch in [0, epochs]. "
                              f"Got {self.max_failures}, {self.fail_after_epoch}")
        EncoderConfig(model=self.base_model, precision=self.precision)  # validates precision


@dataclass(frozen=True)
class AlignData:
    """What training and evaluation read: frozen-tower features, never pixels."""
    visual: np.ndarray  # [N, Dv] unit visual vectors of the training images
    text: np.ndarray  # [N, D] frozen text vectors of their catalogue texts
    eval_visual: np.ndarray  # [M, Dv] unit visual vectors of the test images
    eval_image_before: np.ndarray  # [M, D] the base model's joint-space image vectors of the test images
    eval_labels: np.ndarray  # [M] class labels of the test images
    val_visual: np.ndarray  # [V, Dv] unit visual vectors of the validation photos (train split, not in the pairs)
    val_labels: np.ndarray  # [V] their class labels
    prompts: np.ndarray  # [C, D] frozen text vectors of the zero-shot prompts, in label order
    encoder_identity: str  # the frozen towers' identity (the feature cache key)
    prompt_texts: tuple[str, ...] = ()  # the zero-shot prompts behind ``prompts`` (default: the Fashion-MNIST ones)


@dataclass(frozen=True)
class AlignResult:
    name: str
    version: str
    model_dir: str  # the open_clip local-dir folder or its URI (load with model="local-dir:<model_dir>")
    pairs: int  # training pairs
    epochs: int  # epochs trained in total
    resumed_from_epoch: int  # the first epoch of the last attempt (1 = never resumed)
    best_epoch: int  # the epoch whose heads were kept (best validation score; the last one without validation)
    final_loss: float
    temperature: float  # learned softmax temperature (1 / logit scale)
    before: dict[str, float]  # zero-shot accuracy and P@10 of the base model's image vectors on the test split
    after: dict[str, float]  # the same for the aligned heads
    seconds: float  # whole job
    train_seconds: float  # Ray Train fit only

    def summary(self) -> str:
        return (f"align {self.name} {self.version}: pairs={self.pairs} epochs={self.epochs} "
                f"zero-shot {self.before['zero_shot_accuracy']:.3f} -> {self.after['zero_shot_accuracy']:.3f}, "
                f"P@10 {self.before['precision_at_10']:.3f} -> {self.after['precision_at_10']:.3f}, "
                f"best epoch {self.best_epoch}/{self.epochs}, seconds={self.seconds:.1f} -> {self.model_dir}")


def class_prompts() -> list[str]:
    """One zero-shot prompt per Fashion-MNIST class, in label order."""
    return [PROMPT.format(_PROMPT_NAMES.get(c, c.lower())) for c in fashion_mnist.CLASS_NAMES]


def eval_split(per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` Fashion-MNIST *test* images of each class (deterministic), grouped by class."""
    images, labels = fashion_mnist.load("test")
    idx = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(fashion_mnist.CLASS_NAMES))])
    return images[idx], labels[idx]


def training_pairs(per_class: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Fashion-MNIST *train* images with the catalogue text the sample catalogue generates for each."""
    images, labels = fashion_mnist.load("train")
    indices = select_indices(labels, per_class, seed)
    texts = [item_text(row) for row in sample_table(indices, labels, seed).to_pylist()]
    return images[indices], texts


def validation_split(per_class: int, seed: int, val_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``val_per_class`` train-split photos of each class that are not among the training pairs."""
    images, labels = fashion_mnist.load("train")
    used = np.zeros(len(labels), bool)
    used[select_indices(labels, per_class, seed)] = True
    idx = np.concatenate([np.flatnonzero((labels == c) & ~used)[:val_per_class]
                          for c in range(len(fashion_mnist.CLASS_NAMES))]).astype(np.int64)
    return images[idx], labels[idx]


def build_data(cfg: AlignConfig) -> AlignData:
    """Frozen-tower features of the pairs and the test split, each computed once per content and cached."""
    from common.config import cache_dir

    encoder = ItemEncoder(EncoderConfig(model=cfg.base_model, precision=cfg.precision))
    folder = Path(cfg.features_dir) if cfg.features_dir else cache_dir() / "features" / "alignment"
    if cfg.catalog:
        from jobs.align_data import catalog_data

        return catalog_data(cfg.catalog, encoder, folder, PROMPT)
    images, texts = training_pairs(cfg.per_class, cfg.seed)
    train = cached_features(folder, encoder.identity, images, texts,
                            lambda: encode_features(encoder, images, texts))
    test_images, test_labels = eval_split(cfg.eval_per_class)
    test = cached_features(folder, encoder.identity + "|image", test_images, None,
                           lambda: encode_features(encoder, test_images, None, kinds=("visual", "image")))
    val_images, val_labels = validation_split(cfg.per_class, cfg.seed, cfg.val_per_class)
    val = (cached_features(folder, encoder.identity + "|val", val_images, None,
                           lambda: encode_features(encoder, val_images, None)) if len(val_images)
           else {"visual": np.zeros((0, train["visual"].shape[1]), np.float32)})
    return AlignData(visual=train["visual"], text=train["text"], eval_visual=test["visual"],
                     eval_image_before=test["image"], eval_labels=test_labels, val_visual=val["visual"],
                     val_labels=val_labels,
                     prompts=encoder.encode_texts(class_prompts()), encoder_identity=encoder.identity)


# --- the Ray Train loop ------------------------------------------------------------------------------------


def train_loop(config: dict[str, Any]) -> None:
    """Per worker: its shard of the pairs, the heads under DDP, a checkpoint and a report every epoch."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from common.alignment import make_optimizer, train_epoch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    data = ray.get(config["data"])
    visual = torch.from_numpy(np.ascontiguousarray(data["visual"][rank::world]))
    text = torch.from_numpy(np.ascontiguousarray(data["text"][rank::world]))
    settings = TrainSettings(**config["train"])
    heads = AlignmentHeads(visual.shape[1], text.shape[1], seed=config["seed"])
    optimizer = make_optimizer(heads, settings)
    start, best = 1, {"score": -1.0, "epoch": 0, "heads": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, weights_only=True)
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["epoch"]) + 1
        best = state["best"]
        log.info("worker %d resumes at epoch %d", rank, start)
    model = ray.train.torch.prepare_model(heads)
    for epoch in range(start, config["epochs"] + 1):
        # one generator per (epoch, rank): a resumed run shuffles exactly as an uninterrupted one
        generator = torch.Generator().manual_seed(config["seed"] * 1_000_003 + epoch * 1_009 + rank)
        loss = train_epoch(model, optimizer, visual, text, settings, generator)
        score = validation_score(heads, data["val_visual"], data["val_labels"], data["prompts"])
        if score is None or score > best["score"]:  # without validation the last epoch is kept
            best = {"score": -1.0 if score is None else score, "epoch": epoch,
                    "heads": {k: v.detach().clone() for k, v in heads.state_dict().items()}}
        metrics = {"epoch": epoch, "loss": loss, "start_epoch": start, "best_epoch": best["epoch"],
                   "best_score": best["score"], "logit_scale": float(heads.logit_scale.detach().exp())}
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save({"heads": heads.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                            "best": best}, Path(d) / STATE_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
        if epoch == config["fail_after_epoch"] and checkpoint is None:
            raise RuntimeError(f"injected failure after epoch {epoch} (fail_after_epoch)")


def validation_score(heads: AlignmentHeads, visual: np.ndarray, labels: np.ndarray,
                     prompts: np.ndarray) -> float | None:
    """Mean of zero-shot accuracy and same-class P@10 on the validation photos (None without any)."""
    if len(labels) == 0:
        return None
    images = embed(heads, visual=visual)
    return 0.5 * (zero_shot_accuracy(images, embed(heads, text=prompts), labels) + precision_at_k(images, labels))


def fit(cfg: AlignConfig, data: AlignData, storage: str, run_name: str) -> tuple[AlignmentHeads, dict[str, Any]]:
    """Train the heads with a TorchTrainer (checkpoints under ``storage``/``run_name``, a folder or URI); returns
    them (from the last checkpoint) and the last metrics."""
    import ray
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    per_worker = len(data.visual) // cfg.workers
    if per_worker < cfg.train.batch_size:
        raise ConfigError(f"{len(data.visual)} pairs over {cfg.workers} workers leave {per_worker} per worker, "
                          f"fewer than batch_size={cfg.train.batch_size}")
    use_gpu = cluster_gpus() >= cfg.workers if cfg.use_gpu is None else cfg.use_gpu
    ref = ray.put({"visual": data.visual, "text": data.text, "val_visual": data.val_visual,
                   "val_labels": data.val_labels, "prompts": data.prompts})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"data": ref, "train": dataclasses.asdict(cfg.train), "epochs": cfg.epochs,
                           "seed": cfg.seed, "fail_after_epoch": cfg.fail_after_epoch},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, weights_only=True)
    heads = AlignmentHeads(data.visual.shape[1], data.text.shape[1])
    heads.load_state_dict(state["best"]["heads"])
    return heads.eval(), dict(result.metrics)


# --- evaluation and output ---------------------------------------------------------------------------------


def evaluate(image: np.ndarray, prompts: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Zero-shot text->image accuracy and same-class P@10 of joint-space image vectors."""
    return {"zero_shot_accuracy": round(zero_shot_accuracy(image, prompts, labels), 4),
            "precision_at_10": round(precision_at_k(image, labels), 4)}


def verify_folder(folder: Path, heads: AlignmentHeads, data: AlignData) -> float:
    """Load ``folder`` with ItemEncoder; the min cosine of its prompt vectors to the heads' (must be ~1)."""
    encoder = ItemEncoder(EncoderConfig(model=f"local-dir:{folder}", precision="fp32", device="cpu"))
    expected = embed(heads, text=data.prompts)
    worst = float((encoder.encode_texts(list(data.prompt_texts or class_prompts())) * expected).sum(-1).min())
    if worst < 0.99:
        raise ConfigError(f"the written model {folder} does not reproduce the trained heads (cosine {worst:.4f})")
    return worst


def run(cfg: AlignConfig = AlignConfig(), data: AlignData | None = None) -> AlignResult:
    """Features (cached) -> Ray Train -> a new model folder with its manifest; ``data`` skips feature extraction."""
    t0 = time.perf_counter()
    ensure_ray(cfg.ray_address)
    data = data if data is not None else build_data(cfg)
    store = ArtifactStore(resolve_uri(cfg.artifacts_uri))
    version = store.new_version(KIND, cfg.name)
    target = store.path(KIND, cfg.name, version)
    remote = "://" in target and not target.startswith("file://")
    t1 = time.perf_counter()
    heads, metrics = fit(cfg, data, store.path("train_runs").removeprefix("file://"), f"{cfg.name}-{version}")
    train_seconds = time.perf_counter() - t1
    before = evaluate(data.eval_image_before, data.prompts, data.eval_labels)
    after = evaluate(embed(heads, visual=data.eval_visual), embed(heads, text=data.prompts), data.eval_labels)
    scale = float(heads.logit_scale.detach().exp())
    manifest = {
        "name": cfg.name, "version": version, "base_model": cfg.base_model,
        "frozen_towers": data.encoder_identity, "config": dataclasses.asdict(cfg),
        "trained_on": {"data": (f"catalogue {cfg.catalog}: items hashed into the train split" if cfg.catalog
                                else "Fashion-MNIST train split (real photos)"), "pairs": len(data.visual),
                       "texts": ("jobs.embed_stages.item_text" if cfg.catalog else "generated catalogue texts "
                                 "(common.sample_catalog, read as jobs.embed_stages.item_text)")},
        "evaluated_on": {"data": (f"catalogue {cfg.catalog}: test-split items, category labels" if cfg.catalog
                                  else "Fashion-MNIST test split"), "images": len(data.eval_labels), "prompt": PROMPT},
        "before": before, "after": after, "epochs": int(metrics["epoch"]),
        "resumed_from_epoch": int(metrics["start_epoch"]), "final_loss": float(metrics["loss"]),
        "best_epoch": int(metrics["best_epoch"]), "validation_score": round(float(metrics["best_score"]), 4),
        "validated_on": {"data": "validation-split items of the catalogue" if cfg.catalog else
                         "Fashion-MNIST train split, photos outside the pairs", "images": len(data.val_labels),
                         "score": "mean of zero-shot accuracy and same-class P@10; picks the epoch kept"},
        "temperature": 1.0 / scale, "train_seconds": round(train_seconds, 1),
    }
    from safetensors.torch import save_file

    # open_clip writes and reads a local folder: for object storage the model is written locally, then uploaded
    folder = Path(tempfile.mkdtemp(prefix="vitrine-align-")) if remote else Path(target.removeprefix("file://"))
    try:
        write_aligned_model(ensure_model(cfg.base_model), heads.export(), folder,
                            {"preset": cfg.name, "training": manifest})
        save_file(heads.export(), str(folder / HEADS_FILE))
        if cfg.verify:
            manifest["verify_min_cosine"] = round(verify_folder(folder, heads, data), 6)
        if cfg.export_heads:
            export_heads(folder, Path(cfg.export_heads))
        if remote:
            upload_folder(folder, target)
            log.info("uploaded the model folder to %s", target)
    finally:
        if remote:
            shutil.rmtree(folder, ignore_errors=True)
    seconds = time.perf_counter() - t0
    manifest["seconds"] = round(seconds, 1)
    store.publish(KIND, cfg.name, version, manifest)
    result = AlignResult(name=cfg.name, version=version, model_dir=target if remote else str(folder),
                         pairs=len(data.visual),
                         epochs=int(metrics["epoch"]), resumed_from_epoch=int(metrics["start_epoch"]),
                         best_epoch=int(metrics["best_epoch"]),
                         final_loss=float(metrics["loss"]), temperature=1.0 / scale, before=before, after=after,
                         seconds=seconds, train_seconds=train_seconds)
    log.info("%s", result.summary())
    return result


def export_heads(model_folder: Path, target: Path) -> None:
    """Copy the heads and the manifest into ``target`` (e.g. data/models/<preset>) for the shipped preset."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_folder / HEADS_FILE, target / HEADS_FILE)
    with open(model_folder / MANIFEST_FILE, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["config"].pop("artifacts_uri", None)  # a local path: meaningless in the repository
    manifest["config"].pop("features_dir", None)
    with open(target / MANIFEST_FILE, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    log.info("exported the heads to %s", target)


# --- command line ------------------------------------------------------------------------------------------


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="vitrine align", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file with AlignConfig settings (flags override it)")
    p.add_argument("--name", help=f"model name (default: {ALIGNED_MODEL_NAME})")
    p.add_argument("--base-model", help=f"preset whose towers are aligned (default: {BASE_MODEL_NAME})")
    p.add_argument("--catalog", help="align on this catalogue's own (image, text) pairs instead of Fashion-MNIST")
    p.add_argument("--per-class", type=int, help="Fashion-MNIST train images per class (default 2000)")
    p.add_argument("--epochs", type=int, help="epochs (default 12; the best on validation is kept)")
    p.add_argument("--val-per-class", type=int, help="validation photos per class choosing the epoch (default 200)")
    p.add_argument("--batch-size", type=int, help="pairs per step per worker (default 128)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    p.add_argument("--text-identity-weight", type=float, help="pull of the text projection to identity")
    p.add_argument("--workers", type=int, help="Ray Train workers (default 2)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="feature extraction precision")
    p.add_argument("--artifacts", dest="artifacts_uri", help="artifact store folder")
    p.add_argument("--export-heads", help="also write heads.safetensors + manifest.json to this folder")
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    return p


def config_from_args(args: argparse.Namespace) -> AlignConfig:
    values = values_from_args(args, ("catalog", "name", "base_model", "per_class", "epochs", "val_per_class", "workers",
                                     "precision", "artifacts_uri", "export_heads", "ray_address"),
                              {"train": ("batch_size", "lr", "text_identity_weight")}, uris=("catalog",))
    train = values.pop("train")
    cfg = from_mapping(AlignConfig, values)
    return dataclasses.replace(cfg, train=from_mapping(TrainSettings, train)) if train else cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(config_from_args(args))
    print(json.dumps(dataclasses.asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    raise SystemExit(main())
