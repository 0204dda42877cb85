"""OpenVINO as the encoder's CPU runtime: the real conversion against torch fp32, and its loud fallbacks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from common import image_forward, openvino_runtime
from common.config import default_catalog
from common.encoder import EncoderConfig, ItemEncoder
from common.errors import ConfigError

pytestmark = pytest.mark.skipif(not openvino_runtime.available(), reason="openvino is not installed")

TEXTS = ["dress", "black ankle boots with a zip", "a long red evening dress with sleeves, a belt and a slit, "
         "made of cotton and silk, for summer parties and weddings", "bag", "sneaker " * 30]


@pytest.fixture(scope="module")
def torch_fp32() -> ItemEncoder:
    return ItemEncoder(EncoderConfig(precision="fp32", device="cpu", runtime="torch"))


@pytest.fixture(scope="module")
def default() -> ItemEncoder:
    return ItemEncoder(EncoderConfig(device="cpu"))  # runtime and precision 'auto'


@pytest.fixture(scope="module")
def pixels(torch_fp32) -> np.ndarray:
    catalog = pd.read_parquet(default_catalog()).head(40)
    base = Path(default_catalog()).parent
    return np.stack([torch_fp32.prepare_image(Image.open(base / rel)) for rel in catalog["image"]])


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_auto_picks_openvino_on_the_cpu(default):
    assert default.plan == "openvino-fp32"  # exact: OpenVINO's bf16 image forward fell below 0.99 (bridge)
    expected_text = "openvino-bf16" if image_forward.cpu_has_native_bf16() else "openvino-fp32"
    assert default.text_plan == expected_text
    assert default.describe()["config"]["runtime"] == "auto"


def test_openvino_image_vectors_equal_torch_fp32_at_any_batch_size(default, torch_fp32, pixels):
    one = default.encode_images(pixels[:1])  # traced on one image, then run on 32 + 7
    many = default.encode_images(pixels)
    reference = torch_fp32.encode_images(pixels)
    assert default.plan == "openvino-fp32"  # the check against fp32 passed: no fallback
    for kind in ("visual", "image"):
        assert many[kind].dtype == np.float32 and many[kind].shape == reference[kind].shape
        assert _cos(many[kind], reference[kind]).min() > 0.9999
        assert _cos(one[kind], many[kind][:1]).min() > 0.9999
        np.testing.assert_allclose(np.linalg.norm(many[kind], axis=1), 1.0, atol=1e-5)


def test_openvino_text_vectors_stay_within_cosine_of_torch_fp32(default, torch_fp32):
    reference = torch_fp32.encode_texts(TEXTS * 5)
    first = default.encode_texts(TEXTS[:1])  # a one-off query: eager torch, nothing converted yet
    assert default._text_openvino is None and _cos(first, reference[:1]).min() > 0.999
    default.warm_up()  # traced on 16 equal strings, then run on other lengths and batch sizes
    assert default._text_openvino is not None and default.text_plan.startswith("openvino")
    one, out = default.encode_texts(TEXTS[:1]), default.encode_texts(TEXTS * 5)
    assert _cos(out, reference).min() > 0.999
    assert _cos(one, reference[:1]).min() > 0.999
    assert out.shape == reference.shape and out.dtype == np.float32


def test_identity_does_not_depend_on_the_runtime(default, torch_fp32):
    assert default.identity == torch_fp32.identity  # same space: stored vectors and query vectors mix


def test_a_failing_conversion_falls_back_to_torch_loudly(monkeypatch, caplog, torch_fp32, pixels):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operation aten::weird")

    monkeypatch.setattr(openvino_runtime, "OpenVINOModel", broken)
    monkeypatch.setattr("common.encoder.OpenVINOModel", broken)
    enc = ItemEncoder(EncoderConfig(precision="fp32", device="cpu"))
    with caplog.at_level("WARNING"):
        images = enc.encode_images(pixels[:3])
        texts = enc.encode_texts(TEXTS * 4)  # 20 strings: enough to convert
    assert enc.plan == "fp32" and enc.text_plan == "fp32"
    assert caplog.text.count("aten::weird") == 2
    reference = torch_fp32.encode_images(pixels[:3])
    np.testing.assert_allclose(images["image"], reference["image"], atol=1e-5)
    np.testing.assert_allclose(texts, torch_fp32.encode_texts(TEXTS * 4), atol=1e-5)


def test_drifting_openvino_bf16_falls_back_to_openvino_fp32(monkeypatch, caplog, torch_fp32, pixels):
    real = openvino_runtime.OpenVINOModel

    class Drifting(real):  # a bf16 result far from fp32 (a unit-test stand-in; the real bf16 is checked above)
        def __call__(self, x):
            outs = super().__call__(x)
            return [np.roll(o, 1, axis=0) for o in outs] if self.precision == "bf16" else outs

    monkeypatch.setattr(openvino_runtime, "OpenVINOModel", Drifting)
    enc = ItemEncoder(EncoderConfig(precision="bf16", device="cpu"))
    assert enc.plan == "openvino-bf16"
    with caplog.at_level("WARNING"):
        out = enc.encode_images(pixels[:6])
    assert enc.plan == "openvino-fp32" and "using openvino-fp32" in caplog.text
    assert _cos(out["image"], torch_fp32.encode_images(pixels[:6])["image"]).min() > 0.9999


def test_openvino_runtime_is_refused_where_it_cannot_run(monkeypatch):
    with pytest.raises(ConfigError, match="device='cpu'"):
        image_forward.choose_plan("auto", "cuda", "openvino")
    assert image_forward.choose_plan("auto", "cuda", "auto") == "fp16"  # auto: torch on CUDA
    monkeypatch.setattr(openvino_runtime, "available", lambda: False)
    with pytest.raises(ConfigError, match="pip install openvino"):
        image_forward.choose_plan("auto", "cpu", "openvino")
    assert image_forward.choose_plan("fp32", "cpu", "auto") == "fp32"  # auto without the package: torch


def test_openvino_model_runs_a_module_with_dynamic_shapes():
    module = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval()
    model = openvino_runtime.OpenVINOModel(module, torch.zeros(2, 8), threads=1)
    assert model.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert model.compiled.get_property("ENABLE_CPU_PINNING") is False  # replicas share cores: never pinned
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    (out,) = model(x)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    with pytest.raises(ValueError, match="precision"):
        openvino_runtime.OpenVINOModel(module, torch.zeros(2, 8), precision="int4")


def test_a_clip_architecture_runs_both_runtimes_alike():
    """ViT-B-32 (what a user with internet runs, with laion2b_s34b_b79k): open_clip's own CLIP class, not the
    preset's CustomTextCLIP. Random weights here (no download), announced loudly by the encoder."""
    torch.manual_seed(0)
    reference = ItemEncoder(EncoderConfig(model="ViT-B-32", allow_random_weights=True, precision="fp32",
                                          runtime="torch", device="cpu"))
    torch.manual_seed(0)
    default = ItemEncoder(EncoderConfig(model="ViT-B-32", allow_random_weights=True, device="cpu"))
    assert default.identity == reference.identity and default.dims == {k: 512 for k in default.dims}
    pixels = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    texts = TEXTS * 4  # enough strings to convert the text tower
    got, expected = default.encode_images(pixels), reference.encode_images(pixels)
    assert default.plan == "openvino-fp32"
    assert _cos(got["image"], expected["image"]).min() > 0.9999
    assert _cos(default.encode_texts(texts), reference.encode_texts(texts)).min() > 0.999
    assert default.text_plan.startswith("openvino")


def test_openvino_sends_no_telemetry(tmp_path):
    """``import openvino`` would send a usage event to Intel and count imports under ~/intel: not from Vitrine."""
    code = ("import sys, torch\n"
            "from common.openvino_runtime import OpenVINOModel\n"
            "OpenVINOModel(torch.nn.Linear(4, 2), torch.zeros(1, 4))\n"
            "print(sys.modules['openvino.tools.ovc.telemetry_utils'].tm.__name__)\n")
    env = {**os.environ, "HOME": str(tmp_path), "CI": "false"}  # CI=true would switch OpenVINO's telemetry off
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split()[-1] == "openvino.tools.ovc.telemetry_stub"
    assert not (tmp_path / "intel").exists()  # nothing counted or identified in the user's home
