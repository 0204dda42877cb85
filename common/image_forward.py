"""The image side of the encoder: heads on the visual features, the image forward, and how it runs fast.

``BridgeHead`` (the training-free bridge) and ``LinearHead`` (trained by the alignment job) map the visual
features into the joint space. ``ImageRunner`` runs the forward under an execution plan chosen once per device
(``choose_plan``): on the CPU OpenVINO in fp32 where it is installed; else fp32, fp16 on CUDA, or on a CPU with
native bf16 a ``torch.compile``d bf16 forward with BatchNorm folded in fp32 and the precision-sensitive first
convolution kept in fp32. Every plan but torch fp32 is checked once against torch fp32 (``MIN_COSINE``) with a
loud fallback. Used by :class:`common.encoder.ItemEncoder`.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common import openvino_runtime
from common.errors import ConfigError, ModelUnavailableError, first_line
from common.model_assets import BRIDGE_FILE

log = logging.getLogger(__name__)

COMPILE_BATCH = 32  # the compiled forward's fixed batch; shorter chunks are zero-padded
COMPILE_MIN_IMAGES = 8  # calls with fewer images run eagerly (no compile, no padding)
MIN_COSINE = 0.99  # a low-precision path must stay this close to fp32, or fp32 is used


# --- the head on the visual features and the image forward ------------------------------------------------


class BridgeHead:
    """Image features -> ImageNet class probabilities -> probability-weighted class-name text embedding."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, class_embeddings: torch.Tensor,
                 temperature: float = 1.0):
        self.weight, self.bias, self.class_embeddings = weight, bias, class_embeddings
        self.temperature = float(temperature)

    @classmethod
    def load(cls, folder: Path, device: str) -> BridgeHead | LinearHead | None:
        """The head in ``folder/bridge_head.safetensors`` (a bridge or a linear head, told by its keys), or None."""
        if not (folder / BRIDGE_FILE).is_file():
            return None
        from safetensors.torch import load_file

        t = load_file(str(folder / BRIDGE_FILE), device=device)
        if "linear.weight" in t:
            return LinearHead(t["linear.weight"].float(), t["linear.bias"].float())
        if "classifier.weight" not in t:
            raise ModelUnavailableError(f"{folder / BRIDGE_FILE} holds neither a bridge (classifier.*) nor a linear "
                                        f"head (linear.*): keys {sorted(t)}")
        temperature = float(t["temperature"]) if "temperature" in t else 1.0
        return cls(t["classifier.weight"].float(), t["classifier.bias"].float(), t["class_embeddings"].float(),
                   temperature)

    @property
    def in_dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.class_embeddings.shape[1])

    def tensors(self) -> dict[str, Any]:
        return {"bridge.weight": self.weight, "bridge.bias": self.bias,
                "bridge.class_embeddings": self.class_embeddings, "bridge.temperature": torch.tensor(self.temperature)}

    def __call__(self, features: Any) -> Any:
        probs = (F.linear(features.float(), self.weight, self.bias) / self.temperature).softmax(dim=-1)
        return F.normalize(probs @ self.class_embeddings, dim=-1)


class LinearHead:
    """A trained head: ``normalize(weight @ normalize(features) + bias)``; it reads the unit ``visual`` vector."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        self.weight, self.bias = weight, bias

    @property
    def in_dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.weight.shape[0])

    def tensors(self) -> dict[str, Any]:
        return {"head.weight": self.weight, "head.bias": self.bias}

    def __call__(self, features: Any) -> Any:
        return F.normalize(F.linear(F.normalize(features.float(), dim=-1), self.weight, self.bias), dim=-1)


VisualHead = BridgeHead | LinearHead


class ImageForward(torch.nn.Module):
    """uint8 NHWC pixels -> (visual, image) unit vectors; ``lowp`` is the autocast dtype (None = fp32)."""

    def __init__(self, visual: torch.nn.Module, bridge: VisualHead | None, mean: torch.Tensor, std: torch.Tensor,
                 lowp: torch.dtype | None):
        super().__init__()
        self.visual, self.bridge, self.lowp = visual, bridge, lowp
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # NHWC uint8 -> an NCHW view with channels_last strides, the layout oneDNN's convolutions prefer
        x = (pixels.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        with torch.autocast(x.device.type, dtype=self.lowp or torch.float32, enabled=self.lowp is not None):
            feats = self.visual(x)
        feats = feats.float()
        image = self.bridge(feats) if self.bridge is not None else F.normalize(feats, dim=-1)
        return F.normalize(feats, dim=-1), image


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX512-bf16 or AMX): there bf16 is several times faster."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def choose_plan(precision: str, device: str, runtime: str = "torch") -> str:
    """The execution plan for the image tower.

    With ``runtime`` 'torch': 'fp32', 'bf16', 'fp16' or 'bf16-compiled' (CPU only). With 'openvino' (CPU only):
    'openvino-fp32', or 'openvino-bf16' when bf16 is asked for explicitly (it falls back to 'openvino-fp32' below
    ``MIN_COSINE``: on EfficientNet-Lite0 it reached 0.990 for the bridge vector). 'auto' is 'openvino' on the
    CPU where the package is installed, else 'torch'.
    """
    if device == "cpu" and precision == "fp16":
        raise ConfigError("precision='fp16' needs CUDA; on the CPU use 'bf16', 'fp32' or 'auto'")
    if resolve_runtime(runtime, device) == "openvino":
        return "openvino-bf16" if precision == "bf16" else "openvino-fp32"
    if precision != "auto":
        return precision
    if device == "cuda":
        return "fp16"
    return "bf16-compiled" if cpu_has_native_bf16() else "fp32"


def resolve_runtime(runtime: str, device: str) -> str:
    """'auto' -> 'openvino' on the CPU where it is installed, else 'torch'; 'openvino' needs both."""
    if runtime == "openvino":
        if device != "cpu":
            raise ConfigError("runtime='openvino' runs on the CPU: use device='cpu', or runtime='torch' on CUDA")
        if not openvino_runtime.available():
            raise ConfigError("runtime='openvino' needs the openvino package: pip install openvino "
                              "(or use runtime='torch')")
        return runtime
    if runtime == "auto":
        return "openvino" if device == "cpu" and openvino_runtime.available() else "torch"
    return runtime


def resolve_device(device: str) -> str:
    """'auto' -> CUDA when available; an unavailable CUDA falls back to the CPU with a warning."""
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        log.warning("device='cuda' requested but CUDA is not available: encoding on the CPU")
    return "cuda" if device in ("auto", "cuda") and cuda else "cpu"


def fold_batchnorm(module: torch.nn.Module) -> int:
    """Fold each BatchNorm2d into the Conv2d registered just before it, in fp32, in place; returns the count.

    Inductor's freezing folds them too, but after autocast's bf16 casts, which measurably hurts accuracy
    (EfficientNet-Lite0 bridge vectors fell to cosine 0.93 of fp32); folding first in fp32 keeps them at bf16's
    own error. The caller checks the result (a BN that does not directly follow its conv would fold wrongly).
    """
    prev, n = None, 0
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            prev = m
        elif (isinstance(m, torch.nn.BatchNorm2d) and prev is not None and prev.out_channels == m.num_features
              and m.running_var is not None):
            scale = torch.rsqrt(m.running_var + m.eps) * (m.weight if m.affine else 1.0)
            shift = (m.bias if m.affine else 0.0) - m.running_mean * scale
            with torch.no_grad():
                prev.weight.mul_(scale.view(-1, 1, 1, 1))
                bias = shift + (prev.bias * scale if prev.bias is not None else 0.0)
                prev.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
                m.running_mean.zero_()
                m.running_var.fill_(1.0 - m.eps)  # the BN (with any fused activation) becomes identity + act
                if m.affine:
                    m.weight.fill_(1.0)
                    m.bias.zero_()
            prev, n = None, n + 1
    return n


class Fp32Island(torch.nn.Module):
    """Runs a submodule in fp32 inside an autocast region."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.inner(x.float())


def precision_sensitive(visual: torch.nn.Module) -> list[str]:
    """Submodules kept in fp32 under bf16: in EfficientNets the first depthwise conv (at 112x112).

    Measured on 480 Fashion-MNIST test images, compiled bf16: bridge vectors' min cosine to fp32 0.987 with all
    layers in bf16, 0.996 with this one conv in fp32, for ~17% less throughput.
    """
    trunk = getattr(visual, "trunk", None)
    first = getattr(trunk, "blocks", [[None]])[0][0]
    return ["trunk.blocks.0.0.conv_dw"] if isinstance(getattr(first, "conv_dw", None), torch.nn.Conv2d) else []


def fast_copy(forward: ImageForward, lowp: torch.dtype, size: int) -> ImageForward:
    """The low-precision image forward on a copy of the tower: BatchNorms folded, sensitive layers in fp32.

    Without anything to fold or keep in fp32 it shares the original tower. Folding is checked against the fp32
    original on a fixed random probe and dropped, with a warning, when it changes the vectors.
    """
    mean, std = forward.mean.flatten(), forward.std.flatten()
    islands = precision_sensitive(forward.visual)
    if not islands and not any(isinstance(m, torch.nn.BatchNorm2d) for m in forward.visual.modules()):
        return ImageForward(forward.visual, forward.bridge, mean, std, lowp).eval()  # e.g. ViTs: share weights
    visual = copy.deepcopy(forward.visual)
    if fold_batchnorm(visual):
        probe = torch.randint(0, 256, (2, size, size, 3), generator=torch.Generator().manual_seed(0),
                              dtype=torch.uint8).to(mean.device)
        with torch.inference_mode():
            pairs = zip(ImageForward(visual, forward.bridge, mean, std, None)(probe), forward(probe))
            ok = all(float((a * b).sum(-1).min()) > 0.9999 for a, b in pairs)
        if not ok:
            log.warning("folding BatchNorm changed the image vectors: keeping them unfolded")
            visual = copy.deepcopy(forward.visual)
    for name in islands:
        parent, _, leaf = name.rpartition(".")
        owner = visual.get_submodule(parent)
        setattr(owner, leaf, Fp32Island(getattr(owner, leaf)))
    return ImageForward(visual, forward.bridge, mean, std, lowp).eval()


class ImageRunner:
    """Runs the image forward under a plan, converting or compiling lazily, checking low precision once.

    A plan that cannot run (OpenVINO cannot convert the tower, inductor cannot compile it) falls back, loudly, to
    ``fallback`` (the torch plan for the same precision); a result that drifts from fp32 falls back to fp32.
    """

    def __init__(self, visual: torch.nn.Module, bridge: VisualHead | None, mean: torch.Tensor, std: torch.Tensor,
                 device: str, plan: str, size: int, fallback: str = "fp32"):
        visual.to(memory_format=torch.channels_last)
        self.device, self.size, self.fallback = device, size, fallback
        self.fp32 = ImageForward(visual, bridge, mean, std, None).eval()
        self.checked: set[str] = set()
        self._use(plan)

    def _use(self, plan: str) -> None:
        lowp = {"fp16": torch.float16, "bf16": torch.bfloat16, "bf16-compiled": torch.bfloat16}.get(plan)
        self.plan, self.compiled, self.openvino = plan, None, None
        self.eager = self.fp32 if lowp is None else fast_copy(self.fp32, lowp, self.size)

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            pixels = np.ascontiguousarray(pixels)
            if not pixels.flags.writeable:  # e.g. zero-copy Arrow batches; torch.from_numpy wants writable memory
                pixels = pixels.copy()
            x = torch.from_numpy(pixels).to(self.device)
            outs = [self._run(x[i:i + COMPILE_BATCH], len(x)) for i in range(0, len(x), COMPILE_BATCH)]
        return (np.concatenate([o[0] for o in outs]).astype(np.float32),
                np.concatenate([o[1] for o in outs]).astype(np.float32))

    def _run(self, x: torch.Tensor, call_size: int) -> tuple[np.ndarray, np.ndarray]:
        if self.plan.startswith("openvino"):
            return self._run_openvino(x, call_size)
        if self.plan == "bf16-compiled" and call_size >= COMPILE_MIN_IMAGES:
            return self._run_compiled(x, call_size)
        return self._run_checked("eager", self.eager, x, call_size)

    def _run_openvino(self, x: torch.Tensor, call_size: int) -> tuple[np.ndarray, np.ndarray]:
        if self.openvino is None:
            precision = "bf16" if self.plan == "openvino-bf16" else "f32"
            log.info("converting the image forward for OpenVINO (%s)", precision)
            try:
                self.openvino = openvino_runtime.OpenVINOModel(self.fp32, x, precision, torch.get_num_threads())
            except Exception as e:  # the frontend raises many types (an unsupported op, a tracing error)
                log.warning("OpenVINO could not run the image forward (%s): %s instead", first_line(e), self.fallback)
                self._use(self.fallback)
                return self._run(x, call_size)
        return self._run_checked(self.plan, self.openvino, x, call_size)

    def _run_compiled(self, x: torch.Tensor, call_size: int) -> tuple[np.ndarray, np.ndarray]:
        import torch._inductor.config as inductor_config

        n = len(x)
        if n < COMPILE_BATCH:  # one fixed shape: no recompilation for the last, shorter chunk
            x = torch.cat([x, x.new_zeros((COMPILE_BATCH - n, *x.shape[1:]))])
        if self.compiled is None:
            log.info("compiling the image forward (bf16, inductor with freezing, batch %d)", COMPILE_BATCH)
            self.compiled = torch.compile(self.eager, dynamic=False)
        try:
            with inductor_config.patch(freezing=True):  # weights become constants: oneDNN prepacks them
                v, i = self._run_checked("compiled", self.compiled, x, call_size)
        except Exception as e:  # inductor raises many types (no compiler, codegen errors): fall back, loudly
            log.warning("torch.compile failed (%s): encoding with eager bf16 instead", first_line(e))
            self.plan, self.compiled = "bf16", None
            v, i = self._run_checked("eager", self.eager, x, call_size)
        return v[:n], i[:n]

    def _run_checked(self, name: str, fn: Any, x: torch.Tensor, call_size: int) -> tuple[np.ndarray, np.ndarray]:
        v, i = (t.float().cpu().numpy() if isinstance(t, torch.Tensor) else t for t in fn(x))
        if fn is self.fp32 or name in self.checked:
            return v, i
        k = min(4, len(x))
        rv, ri = (t.cpu().numpy() for t in self.fp32(x[:k]))
        worst = float(min((v[:k] * rv).sum(-1).min(), (i[:k] * ri).sum(-1).min()))
        self.checked.add(name)
        if worst < MIN_COSINE:
            drift = "openvino-fp32" if self.plan == "openvino-bf16" else "fp32"
            log.warning("%s %s image vectors reach only cosine %.4f to fp32 (< %.2f): using %s", self.plan, name,
                        worst, MIN_COSINE, drift)
            self._use(drift)
            return self._run(x, call_size)
        log.info("%s %s image vectors: min cosine %.5f to fp32", self.plan, name, worst)
        return v, i
