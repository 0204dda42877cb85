"""Benchmark: the encoder's batched image forward under each precision/compilation variant, against fp32.

Runs on real Fashion-MNIST test images (prepared like the encoder does) and prints JSON: per variant the
warm-up time (first call, compilation included), images/s (best of ``--repeats`` passes, wall clock), images per
CPU-second (robust when other processes share the cores), and min/mean cosine of the ``visual`` and ``image``
vectors to fp32 eager. No assertions on time: this informs ``precision="auto"`` in :mod:`common.encoder`.

    python -m benchmarks.encoder_forward --images 256 --batch 32 --out encoder_forward.json
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

VARIANTS = (
    "fp32-eager", "fp32-eager-cl", "fp32-jit-freeze", "fp32-compiled",
    "bf16-weights-cl", "bf16-eager", "bf16-eager-cl", "bf16-jit-freeze", "bf16-compiled-freezing",
    "bf16-compiled-fold", "bf16-eager-fold-island", "bf16-compiled-fold-island",
    "bf16-compiled-fold-island-autotune", "openvino-fp32", "openvino-bf16", "encoder-torch-auto", "encoder-auto",
)


def fashion_pixels(n: int, size: int) -> np.ndarray:
    """``n`` Fashion-MNIST test images, evenly spread over the set, as uint8 ``[n, size, size, 3]``."""
    from PIL import Image

    from common import fashion_mnist
    from common.encoder import prepare_image

    images, _ = fashion_mnist.load("test")
    idx = np.linspace(0, len(images) - 1, n).astype(int)
    return np.stack([prepare_image(Image.fromarray(images[i]), size) for i in idx])


def _jit(forward: Any, x: torch.Tensor, lowp: torch.dtype | None) -> Callable:
    with torch.inference_mode(), torch.autocast("cpu", dtype=lowp or torch.float32, enabled=lowp is not None):
        traced = torch.jit.freeze(torch.jit.trace(forward, x, check_trace=False))
    return torch.jit.optimize_for_inference(traced) if lowp is None else traced


def _compiled(module: Any, **options: Any) -> Callable:
    import torch._inductor.config as inductor_config

    compiled = torch.compile(module, dynamic=False, **options)

    def run(x: torch.Tensor) -> Any:
        with inductor_config.patch(freezing=True):
            return compiled(x)

    return run


class _BF16Weights(torch.nn.Module):
    """The tower with its weights cast to bf16 (no autocast); outputs as the encoder's forward does."""

    def __init__(self, forward: Any):
        super().__init__()
        self.forward_fp32 = forward
        self.visual = copy.deepcopy(forward.visual).to(torch.bfloat16)

    def forward(self, pixels: torch.Tensor) -> Any:
        f = self.forward_fp32
        x = ((pixels.permute(0, 3, 1, 2).float() / 255.0 - f.mean) / f.std).to(torch.bfloat16)
        feats = self.visual(x).float()
        image = f.bridge(feats) if f.bridge is not None else torch.nn.functional.normalize(feats, dim=-1)
        return torch.nn.functional.normalize(feats, dim=-1), image


def _nchw_forward_class() -> type:
    from common.image_forward import ImageForward

    class NCHWForward(ImageForward):
        """The encoder's forward with plain NCHW activations (the layout before channels_last)."""

        def forward(self, pixels: torch.Tensor) -> Any:
            x = ((pixels.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std).contiguous()
            with torch.autocast("cpu", dtype=self.lowp or torch.float32, enabled=self.lowp is not None):
                feats = self.visual(x).float()
            image = self.bridge(feats) if self.bridge is not None else torch.nn.functional.normalize(feats, dim=-1)
            return torch.nn.functional.normalize(feats, dim=-1), image

    return NCHWForward


def _openvino(forward: Any, sample: torch.Tensor, precision: str) -> Callable:
    from common.openvino_runtime import OpenVINOModel

    model = OpenVINOModel(forward, sample, precision, torch.get_num_threads())
    return lambda x: tuple(torch.from_numpy(o) for o in model(x))


def build_variant(name: str, encoder: Any, sample: torch.Tensor) -> Callable:
    """A callable uint8 NHWC tensor -> (visual, image) for the named variant."""
    from common.image_forward import ImageForward, fast_copy, fold_batchnorm

    _NCHWForward = _nchw_forward_class()

    fp32 = encoder.images.fp32  # channels_last fp32 forward of the loaded model
    bridge, mean, std = fp32.bridge, fp32.mean.flatten(), fp32.std.flatten()
    nchw = copy.deepcopy(fp32.visual).to(memory_format=torch.contiguous_format)

    def forward(visual: Any, lowp: torch.dtype | None, cl: bool = True) -> Any:
        return (ImageForward if cl else _NCHWForward)(visual, bridge, mean, std, lowp).eval()

    folded = copy.deepcopy(fp32.visual)
    fold_batchnorm(folded)
    table: dict[str, Callable[[], Callable]] = {
        "fp32-eager": lambda: forward(nchw, None, cl=False),
        "fp32-eager-cl": lambda: fp32,
        "fp32-jit-freeze": lambda: _jit(fp32, sample, None),
        "fp32-compiled": lambda: _compiled(fp32),
        "bf16-weights-cl": lambda: _BF16Weights(fp32).eval(),
        "bf16-eager": lambda: forward(nchw, torch.bfloat16, cl=False),
        "bf16-eager-cl": lambda: forward(fp32.visual, torch.bfloat16),
        "bf16-jit-freeze": lambda: _jit(forward(fp32.visual, torch.bfloat16), sample, torch.bfloat16),
        "bf16-compiled-freezing": lambda: _compiled(forward(fp32.visual, torch.bfloat16)),
        "bf16-compiled-fold": lambda: _compiled(forward(folded, torch.bfloat16)),
        "bf16-eager-fold-island": lambda: fast_copy(fp32, torch.bfloat16, encoder.image_size),
        "bf16-compiled-fold-island": lambda: _compiled(fast_copy(fp32, torch.bfloat16, encoder.image_size)),
        "bf16-compiled-fold-island-autotune": lambda: _compiled(fast_copy(fp32, torch.bfloat16, encoder.image_size),
                                                                mode="max-autotune-no-cudagraphs"),
        "openvino-fp32": lambda: _openvino(fp32, sample, "f32"),
        "openvino-bf16": lambda: _openvino(fp32, sample, "bf16"),
    }
    return table[name]()


def measure(fn: Callable, x: torch.Tensor, batch: int, repeats: int, ref: tuple[torch.Tensor, torch.Tensor],
            numpy_api: bool = False) -> dict[str, float]:
    """Warm-up, best-of-``repeats`` throughput, and cosine to ``ref`` over all of ``x``."""
    chunks = [x[i:i + batch] for i in range(0, len(x) - len(x) % batch or len(x), batch)]
    n = sum(len(c) for c in chunks)

    def one_pass() -> tuple[torch.Tensor, torch.Tensor]:
        if numpy_api:
            out = fn(x[:n].numpy())
            return torch.from_numpy(out["visual"]), torch.from_numpy(out["image"])
        outs = [fn(c) for c in chunks]
        return torch.cat([o[0].float() for o in outs]), torch.cat([o[1].float() for o in outs])

    with torch.inference_mode():
        t0 = time.perf_counter()
        fn(x[:batch].numpy()) if numpy_api else fn(chunks[0])
        warmup = time.perf_counter() - t0
        wall, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            visual, image = one_pass()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    cos_v = (visual * ref[0][:n]).sum(-1)
    cos_i = (image * ref[1][:n]).sum(-1)
    return {"images_per_s": round(n / min(wall), 1), "images_per_cpu_s": round(n / min(cpu), 1),
            "warmup_s": round(warmup, 2), "visual_cos_min": round(float(cos_v.min()), 5),
            "visual_cos_mean": round(float(cos_v.mean()), 5), "image_cos_min": round(float(cos_i.min()), 5),
            "image_cos_mean": round(float(cos_i.mean()), 5)}


def run(images: int, batch: int, repeats: int, variants: list[str], threads: int | None) -> dict[str, Any]:
    from common.encoder import EncoderConfig, ItemEncoder

    if threads:
        torch.set_num_threads(threads)
    encoder = ItemEncoder(EncoderConfig(precision="fp32", device="cpu", runtime="torch"))
    x = torch.from_numpy(fashion_pixels(images, encoder.image_size))
    with torch.inference_mode():
        outs = [encoder.images.fp32(x[i:i + batch]) for i in range(0, len(x), batch)]
        ref = (torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]))
    results: dict[str, Any] = {}
    for name in variants:
        try:
            if name in ("encoder-auto", "encoder-torch-auto"):
                runtime = "torch" if name == "encoder-torch-auto" else "auto"
                auto = ItemEncoder(EncoderConfig(precision="auto", device="cpu", runtime=runtime))
                results[name] = measure(auto.encode_images, x, batch, repeats, ref, numpy_api=True)
                results[name]["plan"] = auto.plan
            else:
                results[name] = measure(build_variant(name, encoder, x[:batch]), x, batch, repeats, ref)
        except Exception as e:  # one failing variant (e.g. no C++ compiler) must not hide the others
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        logging.getLogger(__name__).info("%s: %s", name, results[name])
    return {"model": encoder.identity, "images": images, "batch": batch, "repeats": repeats,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "variants": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256, help="Fashion-MNIST test images to encode per pass")
    p.add_argument("--batch", type=int, default=32, help="images per forward call")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per variant (best is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args.images, args.batch, args.repeats, args.variants, args.threads)
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
