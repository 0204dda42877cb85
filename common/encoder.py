"""The item encoder: any open_clip model (or the offline default preset) turning images and text into vectors.

Four float32, L2-normalised vectors per item:

* ``visual``: the pure image-similarity vector (the image tower's output);
* ``image``: the image in the joint image-text space;
* ``text``: the text tower's embedding of a string;
* ``fused``: ``normalize(image_weight * image + text_weight * text)``.

For a CLIP model ``visual`` and ``image`` are the same image embedding. The default preset
``vitrine-effnet-minilm`` (built offline by :mod:`common.model_assets`) is an open_clip ``local-dir:`` model made
of an EfficientNet-Lite0 timm trunk (``visual`` = its 1280-d pooled features) and the all-MiniLM-L6-v2 HF text
tower (384-d). Its two towers were never trained together, so ``image`` comes from a head on the visual
features kept in ``bridge_head.safetensors`` beside the open_clip weights, loaded whenever a local-dir holds one:

* the base preset's training-free bridge (:class:`BridgeHead`): ImageNet class probabilities (the EfficientNet
  classifier, which open_clip's TimmModel drops, softmax at temperature 2) times the MiniLM embeddings of the
  1,000 class names centred on their mean, L2-normalised;
* or a trained affine head (:class:`LinearHead`) on the unit ``visual`` vector, as the preset
  ``vitrine-effnet-minilm-aligned`` holds (trained by ``jobs/align_encoder.py``, see :mod:`common.alignment`;
  its text projection is open_clip's own ``hf_proj_type: linear`` in the open_clip weights).

Weights are never silently random: an open_clip architecture without ``pretrained`` or a local-dir without a
weights file raises ModelUnavailableError unless ``allow_random_weights=True``. Hugging Face is offline unless
the caller set ``HF_HUB_OFFLINE`` explicitly (``HF_HUB_OFFLINE=0`` lets open_clip download pretrained tags).

Speed on CPU: ``runtime="auto"`` runs both towers with OpenVINO where the ``openvino`` package is installed (a
dependency): the image tower in fp32, which here is both exact and faster than torch's best bf16 plan, and the
text tower in bf16 where the CPU has it natively (:mod:`common.openvino_runtime`); each is converted lazily (about
a second for the text tower, four for the image tower) and checked once against torch fp32, falling back,
loudly, to the torch plan. The image tower converts at its first call; the text tower at its first call of at
least ``COMPILE_MIN_TEXTS`` strings or at ``warm_up()`` (a one-off query, as the CLI's, runs eager torch).
With ``runtime="torch"``, ``precision="auto"`` picks, where the CPU has native bf16 (AVX512-bf16/AMX), bf16
autocast with channels_last, compiled by torch.compile (inductor, freezing) for fixed chunks of
``COMPILE_BATCH`` images; it compiles lazily at the first call with at least ``COMPILE_MIN_IMAGES`` images
(smaller calls run eagerly) and falls back to eager bf16 if compilation fails (:mod:`common.image_forward`). The
text tower is compiled the same way (dynamic shapes: batch and token count vary) for calls of at least
``COMPILE_MIN_TEXTS`` strings. Each low-precision path is checked once against fp32 on the first items it encodes
and falls back, loudly, below cosine ``MIN_COSINE``. On CUDA the towers run in torch (fp16). See
``benchmarks/encoder_forward.py`` for the measurements behind these choices.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.errors import ConfigError, first_line
from common.image_forward import (MIN_COSINE, BridgeHead, ImageRunner, choose_plan, cpu_has_native_bf16,
                                  resolve_device)
from common.model_assets import (DEFAULT_MODEL_NAME, ModelSource, load_open_clip, resolve_source,
                                 state_fingerprint, trim_padding, verify_trunk)
from common.openvino_runtime import OpenVINOModel

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RUNTIMES = ("auto", "torch", "openvino")
COMPILE_MIN_TEXTS = 16  # text calls with fewer strings (a one-off search query) run eager torch until warm_up()
TEXT_BATCH = 256
_RESIZE_MODES = ("shortest", "longest", "squash")


@dataclass(frozen=True)
class EncoderConfig:
    model: str = DEFAULT_MODEL_NAME  # preset name, any open_clip architecture name, or 'local-dir:/path'
    pretrained: str | None = None  # tag, weights file, or 'local-dir:/path'; None = the preset's default
    device: str = "auto"  # auto|cpu|cuda (auto: CUDA when available)
    precision: str = "auto"  # auto|fp32|bf16|fp16 (auto: fp16 on CUDA, fastest validated on CPU)
    runtime: str = "auto"  # auto|torch|openvino (auto: OpenVINO on the CPU where installed, torch on CUDA)
    image_weight: float = 0.5  # weight of the image vector in `fused`
    text_weight: float = 0.5  # weight of the text vector in `fused`
    allow_random_weights: bool = False  # explicitly accept an open_clip model without pretrained weights

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"model must be a preset or open_clip model name. Got {self.model!r}")
        if self.pretrained is not None and (not isinstance(self.pretrained, str) or not self.pretrained.strip()):
            raise ConfigError(f"pretrained must be None, a tag, a file or 'local-dir:/path'. Got {self.pretrained!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}. Got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}. Got {self.precision!r}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {RUNTIMES}. Got {self.runtime!r}")
        for name in ("image_weight", "text_weight"):
            w = getattr(self, name)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ConfigError(f"{name} must be a finite number >= 0. Got {w!r}")
        if self.image_weight + self.text_weight <= 0:
            raise ConfigError(f"image_weight + text_weight must be > 0. Got {self.image_weight} + {self.text_weight}")
        if not isinstance(self.allow_random_weights, bool):
            raise ConfigError(f"allow_random_weights must be True or False. Got {self.allow_random_weights!r}")


def prepare_image(img: Image.Image, size: int, resize_mode: str = "shortest",
                  interpolation: str = "bicubic") -> np.ndarray:
    """Any PIL image -> uint8 ``[size, size, 3]`` RGB, resized like open_clip's inference transform.

    ``shortest``: resize the short side to ``size``, then centre-crop; ``squash``: resize both sides;
    ``longest``: resize the long side to ``size`` and centre it on black. Grey, palette and RGBA images are
    converted to RGB (transparency becomes black, as PIL's convert does).
    """
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    if resize_mode not in _RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}. Got {resize_mode!r}")
    mode = InterpolationMode(interpolation)
    img = img.convert("RGB")
    if resize_mode == "squash":
        img = TF.resize(img, [size, size], interpolation=mode)
    elif resize_mode == "shortest":
        img = TF.center_crop(TF.resize(img, size, interpolation=mode), [size, size])
    else:
        scale = size / max(img.size)
        img = TF.resize(img, [max(1, round(img.height * scale)), max(1, round(img.width * scale))],
                        interpolation=mode)
        img = TF.center_crop(img, [size, size])  # pads with zeros when smaller
    return np.asarray(img, dtype=np.uint8).copy()


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# --- the encoder -------------------------------------------------------------------------------------------


class ItemEncoder:
    """Loads an open_clip model once; encodes uint8 images and strings into L2-normalised float32 vectors."""

    def __init__(self, cfg: EncoderConfig = EncoderConfig()):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        plan = choose_plan(cfg.precision, self.device, cfg.runtime)
        torch_plan = choose_plan(cfg.precision, self.device, "torch")  # where an OpenVINO plan cannot run
        source = resolve_source(cfg.model, cfg.pretrained, cfg.allow_random_weights)
        self.model, self.tokenizer = load_open_clip(source, self.device)
        self.bridge = BridgeHead.load(source.local_dir, self.device) if source.local_dir else None
        if source.local_dir is not None:
            verify_trunk(self.model, source.local_dir)
        pp = dict(self.model.visual.preprocess_cfg)
        self.image_size = _square_size(pp["size"])
        self.resize_mode, self.interpolation = pp.get("resize_mode", "shortest"), pp.get("interpolation", "bicubic")
        mean = torch.tensor(pp["mean"], dtype=torch.float32, device=self.device)
        std = torch.tensor(pp["std"], dtype=torch.float32, device=self.device)
        self.images = ImageRunner(self.model.visual, self.bridge, mean, std, self.device, plan, self.image_size,
                                  fallback=torch_plan)
        self._text_torch_plan = torch_plan
        self.text_plan = self._text_plan(plan)
        self._text_compiled: Any = None
        self._text_openvino: OpenVINOModel | None = None
        self.dims = self._dims(source)
        self.identity = f"{source.label}@{self._fingerprint(pp)}"
        log.info("encoder %s on %s, plan %s, dims %s", self.identity, self.device, plan, self.dims)

    def _text_plan(self, plan: str) -> str:
        """The text tower's plan: as the image's, but OpenVINO runs text in bf16 where the CPU has it natively
        (cosine >= 0.9999 to fp32 on MiniLM, 3x torch for one query) unless fp32 was asked for."""
        if not plan.startswith("openvino"):
            return plan
        bf16 = self.cfg.precision == "bf16" or (self.cfg.precision == "auto" and cpu_has_native_bf16())
        return "openvino-bf16" if bf16 else "openvino-fp32"

    @property
    def text_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the torch text forward (None: fp32); OpenVINO plans' small calls run torch's."""
        plan = self._text_torch_plan if self.text_plan.startswith("openvino") else self.text_plan
        return {"fp16": torch.float16, "fp32": None}.get(plan.split("-")[0], torch.bfloat16)

    def warm_up(self) -> None:
        """Prepare the text tower's plan now (OpenVINO: convert it, and from then on run every call on it; torch
        compiled: compile it): for a long-lived holder, the service's text encoder, whose single queries would
        otherwise run eager torch."""
        self.encode_texts(["warm up"] * COMPILE_MIN_TEXTS)

    @property
    def plan(self) -> str:
        """The image forward's current execution plan (it may fall back after a failed check)."""
        return self.images.plan

    def _dims(self, source: ModelSource) -> dict[str, int]:
        import open_clip

        embed = int(open_clip.get_model_config(source.name)["embed_dim"])
        if self.bridge is not None:
            return {"visual": self.bridge.in_dim, "image": self.bridge.out_dim, "text": embed, "fused": embed}
        return {"visual": embed, "image": embed, "text": embed, "fused": embed}

    def _fingerprint(self, preprocess: dict[str, Any]) -> str:
        tensors = dict(self.model.state_dict())
        tensors.update(self.bridge.tensors() if self.bridge is not None else {})
        h = hashlib.sha256(state_fingerprint(tensors).encode())
        h.update(json.dumps({"preprocess": preprocess, "image_weight": self.cfg.image_weight,
                             "text_weight": self.cfg.text_weight}, sort_keys=True, default=str).encode())
        return h.hexdigest()[:12]

    def prepare_image(self, img: Image.Image) -> np.ndarray:
        """Pure CPU step: any PIL image -> uint8 ``[image_size, image_size, 3]``."""
        return prepare_image(img, self.image_size, self.resize_mode, self.interpolation)

    def encode_images(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 ``[N, S, S, 3]`` (S = image_size) -> {'visual': [N, Dv], 'image': [N, D]}."""
        pixels = np.asarray(pixels)
        s = self.image_size
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise ValueError(f"pixels must be uint8 [N, {s}, {s}, 3] (see prepare_image). "
                             f"Got {pixels.dtype} {list(pixels.shape)}")
        if len(pixels) == 0:
            return {"visual": np.zeros((0, self.dims["visual"]), np.float32),
                    "image": np.zeros((0, self.dims["image"]), np.float32)}
        visual, image = self.images(pixels)
        return {"visual": visual, "image": image}

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Strings -> ``[N, D]`` text vectors (truncated to the tower's context length)."""
        texts = list(texts)
        bad = [t for t in texts if not isinstance(t, str)]
        if bad:
            raise ValueError(f"texts must be strings. Got {type(bad[0]).__name__} {bad[0]!r}")
        if not texts:
            return np.zeros((0, self.dims["text"]), np.float32)
        return np.concatenate([self._encode_text_batch(texts[i:i + TEXT_BATCH])
                               for i in range(0, len(texts), TEXT_BATCH)])

    def _encode_text_batch(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts)
        pad = getattr(getattr(getattr(self.model, "text", None), "config", None), "pad_token_id", None)
        if pad is not None:  # an HF tower: it masks padding, so trimming all-pad columns is exact
            tokens = trim_padding(tokens, pad)
        tokens = tokens.to(self.device)
        if self.text_plan.startswith("openvino") and (self._text_openvino is not None
                                                     or len(texts) >= COMPILE_MIN_TEXTS):
            return self._encode_text_openvino(tokens)
        if self.text_plan == "bf16-compiled" and len(texts) >= COMPILE_MIN_TEXTS:
            return self._encode_text_compiled(tokens)
        return self._text_forward(self.model.encode_text, tokens)

    def _encode_text_openvino(self, tokens: torch.Tensor) -> np.ndarray:
        """The text tower run by OpenVINO; checked once against torch fp32, else the torch plan for good."""
        first = self._text_openvino is None
        if first:
            precision = "bf16" if self.text_plan == "openvino-bf16" else "f32"
            log.info("converting the text forward for OpenVINO (%s)", precision)
            try:
                self._text_openvino = OpenVINOModel(_TextForward(self.model), tokens, precision,
                                                    torch.get_num_threads())
            except Exception as e:  # the frontend raises many types (an unsupported op, a tracing error)
                return self._text_fallback(f"OpenVINO could not run the text forward ({first_line(e)})", tokens)
        out = self._text_openvino(tokens)[0].astype(np.float32)
        if first:
            with torch.inference_mode():
                ref = F.normalize(self.model.encode_text(tokens[:4]).float(), dim=-1).cpu().numpy()
            worst = float((out[:len(ref)] * ref).sum(-1).min())
            if worst < MIN_COSINE:
                return self._text_fallback(f"OpenVINO text vectors reach only cosine {worst:.4f} to fp32", tokens)
            log.info("%s text vectors: min cosine %.5f to fp32", self.text_plan, worst)
        return out

    def _text_fallback(self, why: str, tokens: torch.Tensor) -> np.ndarray:
        log.warning("%s: %s instead", why, self._text_torch_plan)
        self.text_plan, self._text_openvino = self._text_torch_plan, None
        return self._text_forward(self.model.encode_text, tokens)

    def _text_forward(self, fn: Any, tokens: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), torch.autocast(self.device, dtype=self.text_dtype or torch.float32,
                                                    enabled=self.text_dtype is not None):
            out = fn(tokens)
        return F.normalize(out.float(), dim=-1).cpu().numpy()

    def _encode_text_compiled(self, tokens: torch.Tensor) -> np.ndarray:
        """Compiled bf16 text forward (1.7x eager bf16 here); checked once against eager, else eager for good."""
        first = self._text_compiled is None
        if first:
            log.info("compiling the text forward (bf16, inductor, dynamic shapes)")
            self._text_compiled = torch.compile(self.model.encode_text, dynamic=True)
        try:
            out = self._text_forward(self._text_compiled, tokens)
        except Exception as e:  # inductor raises many types (no compiler, codegen errors): fall back, loudly
            log.warning("torch.compile failed for the text tower (%s): eager bf16 instead", first_line(e))
            self.text_plan, self._text_compiled = "bf16", None
            return self._text_forward(self.model.encode_text, tokens)
        if first:
            ref = self._text_forward(self.model.encode_text, tokens[:4])
            worst = float((out[:len(ref)] * ref).sum(-1).min())
            if worst < MIN_COSINE:
                log.warning("compiled text vectors reach only cosine %.4f to eager (< %.2f): eager instead", worst,
                            MIN_COSINE)
                self.text_plan, self._text_compiled = "bf16", None
                return self._text_forward(self.model.encode_text, tokens)
        return out

    def fuse(self, image: np.ndarray, text: np.ndarray) -> np.ndarray:
        """``normalize(image_weight * image + text_weight * text)`` row by row."""
        image, text = np.asarray(image, np.float32), np.asarray(text, np.float32)
        if image.shape != text.shape or image.ndim != 2:
            raise ValueError(f"image and text must both be [N, D]. Got {list(image.shape)} and {list(text.shape)}")
        return l2_normalize(self.cfg.image_weight * image + self.cfg.text_weight * text)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (identity, dims, device, plan, config) for logs and collection metadata."""
        return {"identity": self.identity, "dims": self.dims, "device": self.device, "plan": self.plan,
                "image_size": self.image_size, "config": asdict(self.cfg)}


class _TextForward(torch.nn.Module):
    """tokens -> unit text vectors: the graph OpenVINO converts."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def _square_size(size: Any) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConfigError(f"only square image sizes are supported. Got {size}")
        size = size[0]
    return int(size)
