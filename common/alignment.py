"""LiT-style alignment of two frozen towers: learned heads on their features, the CLIP loss, epoch steps, metrics.

The default encoder's towers (an ImageNet EfficientNet trunk and a MiniLM sentence encoder) were never trained
together. Alignment keeps both frozen and learns only two small heads on their precomputed outputs:

* ``image_head``: ``normalize(W_i @ v + b_i)`` with ``v`` the unit 1280-d ``visual`` vector -> the 384-d joint space;
* ``text_proj``: ``normalize(W_t @ t)`` with ``t`` the unit MiniLM embedding, initialised to the identity and pulled
  towards it by ``text_identity_weight * ||W_t - I||^2`` (so free-text search keeps what the images cannot teach).

Both are exactly what the encoder computes at inference: the image head reads the unit ``visual`` vector, and a
bias-free linear map commutes with the text tower's normalisation. The loss is the symmetric InfoNCE of CLIP with a
learnable temperature. Features are computed once per (encoder identity, images, texts) and cached as ``.npz``.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError

log = logging.getLogger(__name__)

INIT_TEMPERATURE = 0.07  # CLIP's initial softmax temperature
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on 1 / temperature
HEAD_KEYS = ("image_head.weight", "image_head.bias", "text_proj.weight", "logit_scale")


# --- the model ---------------------------------------------------------------------------------------------


class AlignmentHeads(nn.Module):
    """The trainable part: an image head (affine) and a text projection (bias-free, identity-initialised)."""

    def __init__(self, visual_dim: int, text_dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.image_head = nn.Linear(visual_dim, text_dim)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(visual_dim)
            self.image_head.weight.copy_(torch.empty(text_dim, visual_dim).uniform_(-bound, bound, generator=g))
            self.image_head.bias.zero_()
        self.text_proj = nn.Linear(text_dim, text_dim, bias=False)
        with torch.no_grad():
            self.text_proj.weight.copy_(torch.eye(text_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / INIT_TEMPERATURE)))

    def embed_images(self, visual: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(F.normalize(visual.float(), dim=-1)), dim=-1)

    def embed_texts(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text.float()), dim=-1)

    def forward(self, visual: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.embed_images(visual), self.embed_texts(text), self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def text_identity_penalty(self) -> torch.Tensor:
        w = self.text_proj.weight
        return ((w - torch.eye(w.shape[0], device=w.device, dtype=w.dtype)) ** 2).sum()

    def export(self) -> dict[str, torch.Tensor]:
        """The heads as plain fp32 CPU tensors named by :data:`HEAD_KEYS` (what ``heads.safetensors`` holds)."""
        return {"image_head.weight": self.image_head.weight.detach().float().cpu().contiguous(),
                "image_head.bias": self.image_head.bias.detach().float().cpu().contiguous(),
                "text_proj.weight": self.text_proj.weight.detach().float().cpu().contiguous(),
                "logit_scale": self.logit_scale.detach().float().cpu().reshape(())}


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: pair i's image must pick text i among the batch's texts, and text i image i."""
    logits = logit_scale * image @ text.T
    target = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# --- training steps ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    batch_size: int = 128  # pairs per step per Ray Train worker: the in-batch negatives
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay on the image head
    text_identity_weight: float = 1.0  # pull of the text projection towards the identity (0 = free)

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2 (InfoNCE needs negatives). Got {self.batch_size}")
        for name in ("lr", "weight_decay", "text_identity_weight"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0 or (name == "lr" and v == 0):
                raise ConfigError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}. Got {v!r}")


def make_optimizer(heads: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW; weight decay on the image head's weight only (the text projection has its own pull to I)."""
    inner = heads.module if hasattr(heads, "module") else heads  # DDP wraps the heads
    decay = [inner.image_head.weight]
    rest = [p for p in inner.parameters() if all(p is not d for d in decay)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=settings.lr)


def train_epoch(heads: nn.Module, optimizer: torch.optim.Optimizer, visual: torch.Tensor, text: torch.Tensor,
                settings: TrainSettings, generator: torch.Generator) -> float:
    """One pass over the pairs in a random order (from ``generator``); returns the mean loss per step.

    ``heads`` may be wrapped by DDP; the last incomplete batch is dropped so every worker takes the same number
    of steps (DDP needs that) and no batch is too small to hold negatives.
    """
    inner = heads.module if hasattr(heads, "module") else heads
    heads.train()
    order = torch.randperm(len(visual), generator=generator)
    steps = len(visual) // settings.batch_size
    if steps == 0:
        raise ConfigError(f"batch_size {settings.batch_size} exceeds the {len(visual)} pairs of this worker")
    total = 0.0
    for s in range(steps):
        idx = order[s * settings.batch_size:(s + 1) * settings.batch_size]
        img, txt, scale = heads(visual[idx], text[idx])
        loss = clip_loss(img, txt, scale)
        if settings.text_identity_weight > 0:
            loss = loss + settings.text_identity_weight * inner.text_identity_penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
    return total / steps


def embed(heads: nn.Module, visual: np.ndarray | None = None, text: np.ndarray | None = None,
          batch: int = 4096) -> np.ndarray:
    """Joint-space vectors of visual features (or, with ``text``, of text features) as float32 numpy."""
    inner = heads.module if hasattr(heads, "module") else heads
    x, fn = (visual, inner.embed_images) if visual is not None else (text, inner.embed_texts)
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(fn(torch.as_tensor(np.asarray(x[i:i + batch], np.float32))).numpy())
    return np.concatenate(out) if out else np.zeros((0, inner.text_proj.weight.shape[0]), np.float32)


# --- metrics (the Fashion-MNIST protocol of benchmarks/image_quality.py) -----------------------------------


def precision_at_k(vectors: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Mean share of same-class items among each item's ``k`` nearest others by cosine (self excluded).

    With ``k`` or fewer items (a tiny validation split) every other item counts; with one item it is 0.
    """
    v = np.asarray(vectors, np.float32)
    k = min(k, len(v) - 1)
    if k < 1:
        return 0.0
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    sim = v @ v.T
    np.fill_diagonal(sim, -np.inf)
    top = np.argpartition(-sim, k, axis=1)[:, :k]
    return float((labels[top] == labels[:, None]).mean())


def zero_shot_accuracy(image_vectors: np.ndarray, prompt_vectors: np.ndarray, labels: np.ndarray) -> float:
    """Share of images whose nearest prompt (one per class, in label order) is their own class's."""
    return float(((np.asarray(image_vectors) @ np.asarray(prompt_vectors).T).argmax(1) == labels).mean())


# --- frozen features, computed once ----------------------------------------------------------------------


def features_key(identity: str, images: np.ndarray, texts: Sequence[str] | None) -> str:
    """A cache key from the encoder's identity and the exact image bytes and texts."""
    h = hashlib.sha256(identity.encode())
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    for t in texts or ():
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def cached_features(folder: Path, identity: str, images: np.ndarray, texts: Sequence[str] | None,
                    compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``compute()`` once per key; later calls read ``folder/<key>.npz`` (written atomically)."""
    path = Path(folder) / f"{features_key(identity, images, texts)}.npz"
    if path.is_file():
        with np.load(path) as z:
            log.info("reusing cached features %s", path)
            return {k: z[k] for k in z.files}
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(path)
    return out


def encode_features(encoder: Any, images: np.ndarray, texts: Sequence[str] | None, chunk: int = 256,
                    kinds: tuple[str, ...] = ("visual",)) -> dict[str, np.ndarray]:
    """Frozen-tower outputs for grey or RGB uint8 images: the image ``kinds`` ('visual', 'image') [N, D] each,
    and ``text`` [N, D] when ``texts`` are given."""
    from PIL import Image

    parts: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
    for i in range(0, len(images), chunk):
        pixels = np.stack([encoder.prepare_image(Image.fromarray(im)) for im in images[i:i + chunk]])
        out = encoder.encode_images(pixels)
        for k in kinds:
            parts[k].append(out[k])
        log.info("encoded %d / %d images", min(i + chunk, len(images)), len(images))
    result = {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}
    if texts is not None:
        result["text"] = encoder.encode_texts(list(texts)).astype(np.float32)
    return result


# --- the aligned model folder ------------------------------------------------------------------------------


HEADS_FILE = "heads.safetensors"  # the trained heads (HEAD_KEYS), as committed under data/models/<preset>/
MANIFEST_FILE = "manifest.json"  # how the heads were trained, on what, and what they measured


def committed_heads_dir() -> Path:
    """Where the shipped heads of the aligned preset live: ``data/models/vitrine-effnet-minilm-aligned``."""
    from common.model_assets import ALIGNED_MODEL_NAME

    return Path(__file__).resolve().parent.parent / "data" / "models" / ALIGNED_MODEL_NAME


def write_aligned_model(base: Path, heads: dict[str, torch.Tensor], folder: Path, meta: dict[str, Any]) -> None:
    """Write an open_clip local-dir into ``folder``: ``base``'s files with the trained heads in place.

    The text projection becomes open_clip's own ``hf_proj_type: linear`` (``text.proj.weight`` in the open_clip
    weights); the image head replaces the bridge in ``bridge_head.safetensors`` as ``linear.weight/bias``.
    ``meta`` is merged into the config's ``vitrine`` section.
    """
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from common import model_assets as ma

    missing = [k for k in HEAD_KEYS if k not in heads]
    if missing:
        raise ConfigError(f"heads lack {missing}; expected {HEAD_KEYS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for f in Path(base).iterdir():
        if f.is_file() and f.name not in (ma.WEIGHTS_FILE, ma.BRIDGE_FILE, ma.CONFIG_FILE):
            shutil.copy(f, folder / f.name)
    weights = load_file(str(Path(base) / ma.WEIGHTS_FILE))
    weights["text.proj.weight"] = heads["text_proj.weight"].float().contiguous()
    save_file(weights, str(folder / ma.WEIGHTS_FILE))
    save_file({"linear.weight": heads["image_head.weight"].float().contiguous(),
               "linear.bias": heads["image_head.bias"].float().contiguous()}, str(folder / ma.BRIDGE_FILE))
    with open(Path(base) / ma.CONFIG_FILE, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["model_cfg"]["text_cfg"]["hf_proj_type"] = "linear"
    cfg["vitrine"] = {**cfg.get("vitrine", {}), **meta,
                      "bridge": "normalize(linear(normalize(visual))): trained LiT head (common.alignment)",
                      "sha256": {f: ma.sha256_file(folder / f) for f in (ma.WEIGHTS_FILE, ma.BRIDGE_FILE)}}
    with open(folder / ma.CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)


def ensure_aligned_model(target: Path | None = None, heads_dir: Path | None = None) -> Path:
    """The aligned preset's local-dir: the base preset plus the committed heads, assembled once per heads file."""
    import json
    import tempfile

    from safetensors.torch import load_file

    from common import model_assets as ma
    from common.errors import ModelUnavailableError

    heads_dir = Path(heads_dir) if heads_dir is not None else committed_heads_dir()
    heads_file = heads_dir / HEADS_FILE
    if not heads_file.is_file():
        raise ModelUnavailableError(f"{heads_file} is missing: the {ma.ALIGNED_MODEL_NAME} preset needs the trained "
                                    "heads (python -m jobs.align_encoder --export-heads <that folder>) or use "
                                    f"model={ma.BASE_MODEL_NAME!r}")
    sha = ma.sha256_file(heads_file)

    def current(folder: Path) -> bool:
        return ma.is_assembled(folder) and ma.read_manifest(folder).get("heads_sha256") == sha

    final = Path(target) if target is not None else ma.model_dir(ma.ALIGNED_MODEL_NAME)
    if current(final):
        return final
    ma.efficientnet_checkpoint(), ma.minilm_dir()  # fail fast, before any work, with the pip hint
    base = ma.ensure_base_model()
    training: dict[str, Any] = {}
    if (heads_dir / MANIFEST_FILE).is_file():
        with open(heads_dir / MANIFEST_FILE, encoding="utf-8") as f:
            training = json.load(f)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        log.info("assembling the encoder %s into %s", ma.ALIGNED_MODEL_NAME, final)
        write_aligned_model(base, load_file(str(heads_file)), tmp,
                            {"preset": ma.ALIGNED_MODEL_NAME, "heads_sha256": sha, "training": training})
        ma.publish_folder(tmp, final, current)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return final
