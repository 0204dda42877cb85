"""The two-tower job on Ray Train (2 CPU workers) over a tiny planted catalogue: checkpoints, store, recovery."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from common.artifacts import ArtifactStore
from common.embedding_cache import vector_column
from common.errors import NotFoundError
from common.vector_store import open_store
from jobs.train_two_tower import KIND, TrainTwoTowerConfig, main, run
from tests.common.test_two_tower import COLD, SMALL, planted

FAST = dataclasses.replace(SMALL, epochs=3)


def fake_embed_snapshot(artifacts: str, base: str, items: np.ndarray, vectors: np.ndarray) -> None:
    """What `vitrine embed` publishes, reduced to what this job reads: item ids and fused vectors."""
    store = ArtifactStore(artifacts)
    version = store.new_version("embeddings", base)
    uri = store.path("embeddings", base, version, "embeddings.parquet")
    pq.write_table(pa.table({"item_id": pa.array(items.astype(str)), "fused_vector": vector_column(vectors)}), uri)
    store.publish("embeddings", base, version, {"result": {"embeddings_uri": uri}, "encoder_identity": "fake@1"})


def planted_inputs(tmp: Path, collection: str = "tiny") -> dict:
    """The planted world's events file and a fake embeddings snapshot for ``collection``, under ``tmp``."""
    w = planted()
    data = w["data"]
    events = tmp / "events.parquet"
    data.events.to_parquet(events, index=False)
    artifacts = str(tmp / "artifacts")
    fake_embed_snapshot(artifacts, collection, data.interactions.items, data.item_vectors)
    return {**w, "events": str(events), "artifacts": artifacts, "tmp": tmp}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return planted_inputs(tmp_path_factory.mktemp("two_tower"))


def config(world: dict, store_dir: str, **kw) -> TrainTwoTowerConfig:
    return TrainTwoTowerConfig(events=world["events"], collection="tiny", artifacts_uri=world["artifacts"],
                               store_uri=store_dir, model=FAST, workers=2, **kw)


@pytest.fixture(scope="module")
def trained(world, ray_local, store_dir):
    """One run for the module (Ray Train start-up dominates): the workers raise once after epoch 1."""
    return run(config(world, store_dir, fail_after_epoch=1, max_failures=1))


def test_a_failed_worker_is_restarted_from_the_last_checkpoint(trained, world):
    assert trained.resumed_at_epoch == 2 and trained.epochs == 3
    manifest = ArtifactStore(world["artifacts"]).manifest(KIND, "tiny")
    assert manifest["result"]["resumed_at_epoch"] == 2


def test_trains_on_two_workers_and_publishes_checkpoint_model_and_vectors(trained, world, store_dir):
    r = trained
    assert (r.epochs, r.workers, r.used_gpu) == (3, 2, False)
    assert (r.users, r.items, r.cold_items) == (36, 37, 1)
    assert Path(r.checkpoint_uri, "state.pt").exists()
    artifacts = ArtifactStore(world["artifacts"])
    assert artifacts.latest(KIND, "tiny") == r.version
    manifest = artifacts.manifest(KIND, "tiny")
    assert manifest["collections"] == {"items": "tiny_two_tower_items", "users": "tiny_two_tower_users"}
    saved = torch.load(r.model_uri, weights_only=False)
    assert COLD in saved["items"] and saved["config"]["dim"] == FAST.dim
    store = open_store(store_dir)
    for name, n in ((r.items_collection, 37), (r.users_collection, 36)):
        assert store.count(name) == n
        assert store.describe(name).model == r.model_identity
        # readers use the name; the vectors sit in this version's own collection, the name moved to it at the end
        assert f"{name}__{r.version}" in store.list_collections()
    # the stored user vector of an A-lover finds A items first
    a_user = next(u for u, t in world["taste"].items() if t == "A")
    user = store.get(r.users_collection, [a_user], with_vectors=True)[0]
    hits = store.search(r.items_collection, np.asarray([user["vector"]], np.float32), k=5)[0]
    assert sum(h.item_id.startswith("A") for h in hits) >= 4


def test_vectors_files_are_normalised_and_aligned(trained, world):
    base = Path(trained.model_uri).parent
    items = pq.read_table(base / "item_vectors.parquet")
    v = np.asarray(items.column("vector").to_pylist(), np.float32)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert items.column("item_id").to_pylist() == list(world["data"].interactions.items)


def test_without_an_embed_snapshot_the_error_says_to_run_embed(world, store_dir, tmp_path):
    cfg = dataclasses.replace(config(world, store_dir), artifacts_uri=str(tmp_path / "empty"))
    with pytest.raises(NotFoundError, match="vitrine embed --collection tiny"):
        run(cfg)


def test_main_parses_flags_into_the_config(world, store_dir, capsys, monkeypatch):
    seen = {}

    def fake_run(cfg: TrainTwoTowerConfig) -> _Done:
        seen["cfg"] = cfg
        return _Done()

    monkeypatch.setattr("jobs.train_two_tower.run", fake_run)
    assert main(["--events", world["events"], "--collection", "tiny", "--workers", "1", "--epochs", "2",
                 "--loss", "bce", "--no-use-gpu", "--artifacts", world["artifacts"], "--store", store_dir]) == 0
    cfg = seen["cfg"]
    assert (cfg.workers, cfg.model.epochs, cfg.model.loss, cfg.use_gpu) == (1, 2, "bce", False)
    assert capsys.readouterr().out.strip() == "done"


class _Done:
    def summary(self) -> str:
        return "done"
