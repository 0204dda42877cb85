"""The GPU paths, on a machine with CUDA (marked ``gpu``: skipped elsewhere, so never in CI; ``make test-gpu``).

Each checks that work lands on the GPU and that its results agree with the CPU's: the encoder in fp16, the embed
job's encoder actors with ``num_gpus``, and both Ray Train jobs with ``use_gpu``. The Ray fixture detects the
machine's GPUs itself (``ray.init`` without ``num_gpus``); one GPU is enough for every test here.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.encoder import EncoderConfig, ItemEncoder
from common.vector_store import open_store

pytestmark = pytest.mark.gpu

TEXTS = ["black ankle boots", "a long red evening dress with sleeves", "leather bag", "white sneakers"]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def cpu_encoder() -> ItemEncoder:
    return ItemEncoder(EncoderConfig(device="cpu", precision="fp32", runtime="torch"))


def test_the_encoder_runs_fp16_on_cuda_within_cosine_of_cpu_fp32(cpu_encoder):
    from tests.jobs.test_embed_catalog import SAMPLE

    gpu = ItemEncoder(EncoderConfig())  # device and runtime 'auto': CUDA with torch
    assert (gpu.device, gpu.plan) == ("cuda", "fp16")
    assert gpu.identity == cpu_encoder.identity
    assert next(gpu.model.parameters()).is_cuda
    catalog = pd.read_parquet(SAMPLE).head(40)
    pixels = np.stack([cpu_encoder.prepare_image(Image.open(SAMPLE.parent / p)) for p in catalog["image"]])
    on_gpu, on_cpu = gpu.encode_images(pixels), cpu_encoder.encode_images(pixels)
    assert gpu.plan == "fp16"  # the check against fp32 passed: no fallback
    for kind in ("visual", "image"):
        assert on_gpu[kind].dtype == np.float32
        assert _cos(on_gpu[kind], on_cpu[kind]).min() > 0.99
    assert _cos(gpu.encode_texts(TEXTS), cpu_encoder.encode_texts(TEXTS)).min() > 0.99


def test_the_embed_job_puts_one_encoder_actor_on_each_gpu(tmp_path, ray_local, store_dir, cpu_encoder, caplog):
    from common.item_index import collection_name
    from jobs.embed_catalog import EmbedConfig, _plan_actors, run
    from tests.jobs.test_embed_catalog import tiny_catalog, write

    gpus = int(ray_local.cluster_resources().get("GPU", 0))
    assert gpus >= 1, "the Ray fixture found no GPU although torch sees one"
    df = tiny_catalog(tmp_path)
    cfg = EmbedConfig(catalog=write(df, tmp_path / "catalog.parquet"), collection="gpu", store_uri=store_dir,
                      batch_size=8, artifacts_uri=str(tmp_path / "artifacts"))
    assert _plan_actors(cfg) == (gpus, 1.0)
    with caplog.at_level("INFO", logger="jobs.embed_catalog"):
        result = run(cfg)
    assert result.encoded == len(df) and result.quarantined == 0
    assert "1 GPU each" in caplog.text
    rows = open_store(store_dir).get(collection_name("gpu", "image"), list(df["item_id"]), with_vectors=True)
    stored = {r["item_id"]: np.asarray(r["vector"], np.float32) for r in rows}
    pixels = np.stack([cpu_encoder.prepare_image(Image.open(tmp_path / p)) for p in df["image"]])
    expected = cpu_encoder.encode_images(pixels)["image"]
    assert _cos(np.stack([stored[i] for i in df["item_id"]]), expected).min() > 0.99


def test_two_tower_trains_on_the_gpu(tmp_path, ray_local, store_dir):
    from jobs.train_two_tower import TrainTwoTowerConfig, run
    from tests.common.test_two_tower import SMALL
    from tests.jobs.test_train_two_tower import planted_inputs

    world = planted_inputs(tmp_path, "gputt")
    result = run(TrainTwoTowerConfig(events=world["events"], collection="gputt", artifacts_uri=world["artifacts"],
                                     store_uri=store_dir, model=dataclasses.replace(SMALL, epochs=2), workers=1,
                                     use_gpu=True))
    assert result.used_gpu and result.epochs == 2
    assert Path(result.model_uri).exists()


def test_graphsage_trains_on_the_gpu(tmp_path, ray_local, store_dir):
    from jobs.train_graphsage import run
    from tests.jobs.test_train_graphsage import tiny_config

    cfg = dataclasses.replace(tiny_config(tmp_path, store_dir, "gpugs"), num_workers=1, use_gpu=True)
    result = run(cfg)
    assert result.epochs == cfg.model.epochs
    assert Path(result.checkpoint_uri).exists()
