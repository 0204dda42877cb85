"""The GraphSAGE training job on Ray Train (2 CPU workers) with a tiny catalogue: checkpoint, published version,
vectors in Milvus Lite, and a resume from the last checkpoint after a worker fails."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.artifacts import ArtifactStore
from common.errors import ConfigError, NotFoundError
from common.graphsage import GraphSAGEConfig, embed_graph, export_item_vectors
from common.vector_store import open_store
from jobs.train_graphsage import (
    KIND,
    STATE_FILE,
    TrainGraphSAGEConfig,
    build_parser,
    config_from_args,
    load_item_vectors,
    load_model,
    run,
)

N_ITEMS, N_USERS, DIM = 16, 10, 8


def write_inputs(tmp: Path) -> tuple[str, str]:
    """Item vectors (the embed snapshot's columns) and events: two taste groups; item i15 has no events."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = pd.DataFrame({"item_id": [f"i{k}" for k in range(N_ITEMS)], "fused_vector": list(vectors)})
    rows = []
    for u in range(N_USERS):
        first, size = (0, 7) if u % 2 == 0 else (7, 8)  # every item of items 0..14 is bought by someone
        for k, item in enumerate(first + (u // 2 + np.arange(4)) % size):
            rows.append({"user_id": f"u{u}", "item_id": f"i{item}", "event": "purchase",
                         "ts": pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(minutes=10 * k + u)})
    rows.append({"user_id": "u0", "item_id": "not-in-catalogue", "event": "view", "ts": pd.Timestamp.now(tz="UTC")})
    rows.append({"user_id": "u-dislikes", "item_id": "i1", "event": "dislike", "ts": pd.Timestamp.now(tz="UTC")})
    items.to_parquet(tmp / "vectors.parquet", index=False)
    pd.DataFrame(rows).to_parquet(tmp / "events.parquet", index=False)
    return str(tmp / "vectors.parquet"), str(tmp / "events.parquet")


def tiny_config(tmp: Path, store_dir: str, collection: str) -> TrainGraphSAGEConfig:
    vectors, events = write_inputs(tmp)
    return TrainGraphSAGEConfig(
        events=events, item_vectors=vectors, collection=collection, store_uri=store_dir,
        artifacts_uri=str(tmp / "artifacts"), num_workers=2, max_failures=1,
        model=GraphSAGEConfig(hidden=16, dim=8, epochs=3, batch_size=8, negatives=4, fanouts=(4, 4), threads=1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local, store_dir):
    """One Ray Train run (the slow part) serves every test: worker 1 dies once after epoch 1 (a fault drill)."""
    tmp = tmp_path_factory.mktemp("gs")
    cfg, marker = tiny_config(tmp, store_dir, "gstiny"), tmp / "failed-once"

    def fail_once_after_epoch_1(epochs_done: int, rank: int) -> None:
        if epochs_done == 1 and rank == 1 and not marker.exists():
            marker.write_text("x")
            raise RuntimeError("fault drill: worker 1 dies after epoch 1")

    return cfg, run(cfg, on_epoch_end=fail_once_after_epoch_1), marker


def test_a_failed_worker_resumes_from_the_last_checkpoint(trained):
    _, result, marker = trained
    assert marker.exists()  # the drill did kill a worker
    assert result.resumed_at_epoch == 2 and result.epochs == 3


def test_job_trains_on_two_workers_and_publishes_a_checkpoint(trained):
    cfg, result, _ = trained
    assert (result.workers, result.epochs) == (2, 3)
    assert result.edges == N_USERS * 4 and result.quarantined == 1  # the unknown item's event
    assert np.isfinite(result.final_loss)
    artifacts = ArtifactStore(cfg.artifacts_uri)
    assert artifacts.latest(KIND, "gstiny") == result.version
    assert artifacts.manifest(KIND, "gstiny")["result"]["checkpoint_uri"] == result.checkpoint_uri
    _, state = load_model(result.checkpoint_uri)
    assert state["epochs_done"] == 3 and Path(result.checkpoint_uri, STATE_FILE).exists()


def test_vectors_in_the_store_are_the_checkpoints_embeddings(trained):
    cfg, result, _ = trained
    store = open_store(cfg.store_uri)
    assert store.count(result.item_collection) == N_ITEMS == result.items  # the cold item i15 included
    assert store.count(result.user_collection) == N_USERS == result.users  # not the user with only a dislike
    assert result.cold_items == 1
    assert store.describe(result.item_collection).model == result.model == store.describe(result.user_collection).model
    model, _ = load_model(result.checkpoint_uri)
    from common.events import load_events
    from common.graph_sampler import BipartiteGraph
    from common.interactions import build_interactions

    ids, vectors, _ = load_item_vectors(cfg)
    inter = build_interactions(load_events(cfg.events, set(ids)).valid, items=ids)
    _, items = embed_graph(model, BipartiteGraph.from_interactions(inter, vectors))
    expected = export_item_vectors(items)
    got = {r["item_id"]: r["vector"] for r in store.get(result.item_collection, ["i0", "i15"], with_vectors=True)}
    np.testing.assert_allclose(got["i0"], expected[0], atol=1e-5)
    np.testing.assert_allclose(got["i15"], expected[15], atol=1e-5)
    hits = store.search(result.item_collection, expected[:1], k=1)
    assert hits[0][0].item_id == "i0"


def test_missing_embeddings_tell_the_user_to_run_embed(tmp_path):
    cfg = TrainGraphSAGEConfig(collection="nothing_here", artifacts_uri=str(tmp_path))
    with pytest.raises(NotFoundError, match="vitrine embed --collection nothing_here"):
        load_item_vectors(cfg)


def test_flags_become_a_validated_config(tmp_path):
    args = build_parser().parse_args(["--workers", "3", "--epochs", "2", "--collection", "shop",
                                      "--artifacts", str(tmp_path)])
    cfg = config_from_args(args)
    assert (cfg.num_workers, cfg.model.epochs, cfg.collection, cfg.artifacts_uri) == (3, 2, "shop", str(tmp_path))
    with pytest.raises(ConfigError, match="Got 0"):
        config_from_args(build_parser().parse_args(["--workers", "0"]))
