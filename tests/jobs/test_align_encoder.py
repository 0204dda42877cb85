"""The alignment job on Ray Train (2 CPU workers): a loadable model folder, and resuming after a worker failure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file

from common.artifacts import ArtifactStore

from common.alignment import HEADS_FILE, MANIFEST_FILE, AlignmentHeads, TrainSettings, embed
from common.encoder import EncoderConfig, ItemEncoder
from common.errors import ConfigError
from common.model_assets import ALIGNED_MODEL_NAME, BASE_MODEL_NAME
from jobs.align_encoder import AlignConfig, AlignData, class_prompts, run

PAIRS, CLASSES = 320, 4


@pytest.fixture(scope="module")
def base() -> ItemEncoder:
    return ItemEncoder(EncoderConfig(model=BASE_MODEL_NAME, precision="fp32", device="cpu"))


@pytest.fixture(scope="module")
def data(base) -> AlignData:
    return synthetic_data(base)


def synthetic_data(base: ItemEncoder) -> AlignData:
    """Synthetic frozen features in the real dimensions (1280 -> 384), linked only through a shared class."""
    rng = np.random.default_rng(0)
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)
    img_c, txt_c = rng.normal(size=(CLASSES, 1280)), rng.normal(size=(CLASSES, 384))
    labels = np.repeat(np.arange(CLASSES), PAIRS // CLASSES)
    visual = unit(img_c[labels] + 0.5 * rng.normal(size=(PAIRS, 1280)))
    text = unit(txt_c[labels] + 0.5 * rng.normal(size=(PAIRS, 384)))
    eval_labels = np.repeat(np.arange(CLASSES), 20)
    val_labels = np.repeat(np.arange(CLASSES), 10)
    return AlignData(visual=visual, text=text, eval_visual=unit(img_c[eval_labels] + 0.5 * rng.normal(size=(80, 1280))),
                     eval_image_before=unit(rng.normal(size=(80, 384))), eval_labels=eval_labels,
                     val_visual=unit(img_c[val_labels] + 0.5 * rng.normal(size=(40, 1280))), val_labels=val_labels,
                     prompts=base.encode_texts(class_prompts()), encoder_identity="synthetic")


def _cfg(tmp_path: Path, **kw) -> AlignConfig:
    return AlignConfig(artifacts_uri=str(tmp_path), epochs=2, workers=2, per_class=30, eval_per_class=20,
                       train=TrainSettings(batch_size=32, lr=1e-2), **kw)


def test_the_job_resumes_after_a_failure_and_writes_a_model_itemencoder_loads(ray_local, tmp_path, data, base):
    result = run(_cfg(tmp_path, fail_after_epoch=1, max_failures=1), data=data)
    assert (result.epochs, result.pairs) == (2, PAIRS)
    assert result.resumed_from_epoch == 2  # the second attempt started after epoch 1's checkpoint, not from 1
    folder = Path(result.model_dir)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["after"] == result.after and manifest["verify_min_cosine"] > 0.99
    assert result.best_epoch in (1, 2) and manifest["best_epoch"] == result.best_epoch  # chosen on validation
    assert 0 < manifest["validation_score"] <= 1
    assert result.after["precision_at_10"] > 0.9  # separable classes (chance 0.25)

    heads = AlignmentHeads(1280, 384)
    heads.load_state_dict(load_file(str(folder / HEADS_FILE)))
    aligned = ItemEncoder(EncoderConfig(model=f"local-dir:{folder}", precision="fp32", device="cpu"))
    assert aligned.identity.startswith("vitrine-effnet-minilm-aligned@") and aligned.identity != base.identity
    pixels = np.stack([aligned.prepare_image(Image.fromarray(np.full((28, 28), v, np.uint8))) for v in (0, 200)])
    out, ref = aligned.encode_images(pixels), base.encode_images(pixels)
    np.testing.assert_allclose(out["visual"], ref["visual"], atol=1e-5)  # the same frozen trunk
    np.testing.assert_allclose(out["image"], embed(heads, visual=ref["visual"]), atol=1e-4)  # the trained head
    texts = ["red dress", "black ankle boots"]
    np.testing.assert_allclose(aligned.encode_texts(texts), embed(heads, text=base.encode_texts(texts)), atol=1e-4)


_ALIGN_TO_OBJECT_STORAGE = textwrap.dedent("""
    import json, sys
    from common.alignment import TrainSettings
    from common.encoder import EncoderConfig, ItemEncoder
    from common.model_assets import ALIGNED_MODEL_NAME, BASE_MODEL_NAME
    from jobs.align_encoder import AlignConfig, run
    from tests.jobs.test_align_encoder import synthetic_data

    base = ItemEncoder(EncoderConfig(model=BASE_MODEL_NAME, precision="fp32", device="cpu"))
    result = run(AlignConfig(artifacts_uri=sys.argv[1], epochs=1, workers=2, per_class=30, eval_per_class=20,
                             train=TrainSettings(batch_size=32, lr=1e-2)), data=synthetic_data(base))
    print(json.dumps({"model_dir": result.model_dir, "version": result.version}))
""")


def test_artifacts_in_object_storage_model_and_checkpoints_land_there(object_storage, base, tmp_path, monkeypatch):
    """``vitrine align --artifacts s3://...`` as on a cluster: its own Ray (started by the job, so its workers see
    the bucket's endpoint the way a cluster's nodes would), the model folder uploaded, then loaded from the URI."""
    root = f"{object_storage['s3']}/align-artifacts"
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", _ALIGN_TO_OBJECT_STORAGE, root], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    store = ArtifactStore(root)
    assert store.latest("models", ALIGNED_MODEL_NAME) == out["version"]
    assert out["model_dir"] == store.path("models", ALIGNED_MODEL_NAME, out["version"])
    assert store.manifest("models", ALIGNED_MODEL_NAME)["verify_min_cosine"] > 0.99
    fs, path = fsspec.core.url_to_fs(root)
    assert fs.glob(f"{path}/train_runs/{ALIGNED_MODEL_NAME}-{out['version']}/checkpoint_*")  # Ray Train wrote there
    monkeypatch.setenv("VITRINE_CACHE", str(tmp_path / "cache"))
    aligned = ItemEncoder(EncoderConfig(model=f"local-dir:{out['model_dir']}", precision="fp32", device="cpu"))
    heads = AlignmentHeads(1280, 384)
    heads.load_state_dict(load_bytes(fs.cat_file(f"{path}/models/{ALIGNED_MODEL_NAME}/{out['version']}/{HEADS_FILE}")))
    texts = ["red dress", "black ankle boots"]
    np.testing.assert_allclose(aligned.encode_texts(texts), embed(heads, text=base.encode_texts(texts)), atol=1e-4)


def test_too_few_pairs_per_worker_is_a_config_error(ray_local, tmp_path, data):
    with pytest.raises(ConfigError, match="batch_size=256"):
        run(AlignConfig(artifacts_uri=str(tmp_path), epochs=1, workers=2, train=TrainSettings(batch_size=256)),
            data=data)


@pytest.mark.parametrize("kwargs, echoed", [({"base_model": "nope"}, "'nope'"), ({"epochs": 0}, "0"),
                                            ({"fail_after_epoch": 9, "epochs": 2}, "9")])
def test_config_validation_echoes_the_bad_value(kwargs, echoed):
    with pytest.raises(ConfigError, match=echoed):
        AlignConfig(**kwargs)


def test_a_catalogue_splits_its_items_by_id_and_leaves_out_bad_images(tmp_path):
    import pandas as pd

    from common.config import default_catalog
    from jobs.align_data import catalog_pairs, split_of

    sample = pd.read_parquet(default_catalog())
    rows = sample.groupby("category").head(3).copy()
    rows["image"] = [str(Path(default_catalog()).parent / r) for r in rows["image"]]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rows.iloc[0, rows.columns.get_loc("image")] = str(broken)
    rows.to_parquet(tmp_path / "catalog.parquet")
    pairs = catalog_pairs(str(tmp_path / "catalog.parquet"), 64)
    assert pairs.skipped == 1 and len(pairs.texts) == len(rows) - 1 == len(pairs.labels)
    assert pairs.pixels.shape == (len(rows) - 1, 64, 64, 3) and len(pairs.categories) == 10
    assert split_of("fm-000001") == split_of("fm-000001") and set(pairs.split) <= {"train", "val", "test"}
    shares = pd.Series([split_of(f"item-{i}") for i in range(5000)]).value_counts(normalize=True)
    assert abs(shares["train"] - 0.8) < 0.03 and abs(shares["test"] - 0.1) < 0.02


def test_a_catalogue_with_one_category_is_refused(tmp_path):
    import pandas as pd

    from common.config import default_catalog
    from jobs.align_data import catalog_pairs

    sample = pd.read_parquet(default_catalog())
    rows = sample[sample["category"] == "Bag"].head(4).copy()
    rows["image"] = [str(Path(default_catalog()).parent / r) for r in rows["image"]]
    rows.to_parquet(tmp_path / "catalog.parquet")
    with pytest.raises(ConfigError, match="at least 2 categories"):
        catalog_pairs(str(tmp_path / "catalog.parquet"), 32)


def test_the_job_aligns_on_a_catalogue_file(ray_local, tmp_path):
    import pandas as pd

    from common.config import default_catalog

    sample = pd.read_parquet(default_catalog())
    rows = sample.groupby("category").head(8).copy()
    rows["image"] = [str(Path(default_catalog()).parent / r) for r in rows["image"]]
    rows.to_parquet(tmp_path / "catalog.parquet")
    cfg = AlignConfig(catalog=str(tmp_path / "catalog.parquet"), name="shop-aligned", artifacts_uri=str(tmp_path),
                      features_dir=str(tmp_path / "features"), epochs=1, workers=2, precision="fp32",
                      train=TrainSettings(batch_size=8, lr=1e-2))
    result = run(cfg)
    manifest = json.loads((Path(result.model_dir) / MANIFEST_FILE).read_text())
    assert "catalogue" in manifest["trained_on"]["data"] and manifest["verify_min_cosine"] > 0.99
    assert result.pairs + len(manifest["evaluated_on"]) > 0 and result.pairs < len(rows)  # test items held out
    encoder = ItemEncoder(EncoderConfig(model=f"local-dir:{result.model_dir}", precision="fp32", device="cpu"))
    assert encoder.identity.startswith("shop-aligned@")
