"""The ranker job end to end on a tiny generated catalogue with planted tastes (no Ray, no encoder model)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.artifacts import ArtifactStore
from common.errors import ConfigError, NotFoundError
from common.events import load_events
from common.interactions import temporal_split
from common.ranking import FEATURES, load_latest_ranker
from common.synthetic_events import generate_events
from jobs.train_ranker import TrainRankerConfig, fit_sources, main, run, user_candidates

BASE = "rankcat"
CATEGORIES = ("Sneaker", "T-shirt", "Coat", "Ankle boot", "Bag", "Dress")
BRANDS = ("Alba", "Brio", "Corsa", "Dune")


def tiny_catalog(per_category: int = 20, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Items whose unit vectors point at their category (and a little at their brand), plus noise."""
    rng = np.random.default_rng(seed)
    rows, vectors = [], []
    for c, category in enumerate(CATEGORIES):
        for n in range(per_category):
            b = int(rng.integers(len(BRANDS)))
            rows.append({"item_id": f"it-{c}-{n:02d}", "title": f"{BRANDS[b]} {category}", "category": category,
                         "brand": BRANDS[b], "color": "black", "price": float(rng.uniform(10, 200)),
                         "in_stock": True})
            v = np.zeros(16)
            v[c], v[len(CATEGORIES) + b] = 1.0, 0.4
            v += rng.normal(scale=0.3, size=16)
            vectors.append(v / np.linalg.norm(v))
    return pd.DataFrame(rows), np.asarray(vectors, dtype=np.float32)


def write_snapshot(artifacts: str, items: pd.DataFrame, vectors: np.ndarray) -> str:
    """An embeddings version as the embed job publishes it (only the columns the ranker job reads)."""
    store = ArtifactStore(artifacts)
    version = store.new_version("embeddings", BASE)
    table = pa.Table.from_pandas(items, preserve_index=False).append_column(
        "fused_vector", pa.array(list(vectors), pa.list_(pa.float32())))
    pq.write_table(table, store.path("embeddings", BASE, version, "embeddings.parquet"))
    store.publish("embeddings", BASE, version, {"result": {"version": version}, "encoder_identity": "test-enc@0"})
    return version


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranker")
    items, vectors = tiny_catalog()
    artifacts = str(tmp / "artifacts")
    embeddings_version = write_snapshot(artifacts, items, vectors)
    events, _ = generate_events(items, n_users=150, days=30, seed=1)
    events.to_parquet(tmp / "events.parquet", index=False)
    cfg = TrainRankerConfig(events=str(tmp / "events.parquet"), collection=BASE, artifacts_uri=artifacts,
                            candidates=20, test_users=0.3, seed=0)
    return {"tmp": tmp, "cfg": cfg, "embeddings_version": embeddings_version, "result": run(cfg),
            "items": items, "vectors": vectors}


def test_the_job_publishes_a_ranker_whose_manifest_holds_the_metrics(setup):
    result, cfg = setup["result"], setup["cfg"]
    store = ArtifactStore(cfg.artifacts_uri)
    manifest = store.manifest("ranker", BASE)
    assert manifest["result"]["version"] == result.version == store.latest("ranker", BASE)
    assert manifest["features"] == list(FEATURES)
    assert manifest["embeddings_version"] == setup["embeddings_version"]
    assert manifest["config"]["candidates"] == 20
    for name in ("ranker", "ranker+mmr", "item", "profile", "session", "rules", "popular", "sum"):
        assert set(manifest["result"]["metrics"][name]) == {"ndcg@10", "hit_rate@10"}
    assert 0 < result.pool_recall <= 1 and result.test_users > 0 and result.positives > 0
    ranker = load_latest_ranker(cfg.artifacts_uri, BASE)
    assert ranker.identity == result.identity == f"ranker:{BASE}/{result.version}"
    assert ranker.features == FEATURES


def test_the_ranker_beats_popularity_on_planted_tastes(setup):
    metrics = setup["result"].metrics
    assert metrics["ranker"]["ndcg@10"] > metrics["popular"]["ndcg@10"] + 0.02
    assert metrics["ranker"]["hit_rate@10"] > metrics["popular"]["hit_rate@10"]


def test_candidates_never_hold_a_training_item_and_carry_reasons(setup):
    cfg = setup["cfg"]
    checked = load_events(cfg.events)
    train, _ = temporal_split(checked.valid, cfg.holdout)
    src = fit_sources(train, setup["items"]["item_id"].to_numpy(object), setup["vectors"], cfg)
    users = src.data.interactions.users
    for u in range(0, len(users), 15):
        cands = user_candidates(src, u, cfg.candidates)
        seen = set(train.loc[train["user_id"] == users[u], "item_id"])
        assert cands and not seen & {c.item_id for c in cands}
        for c in cands:
            assert {r["source"] for r in c.reasons} == set(c.scores)
        rules = [r for c in cands for r in c.reasons if r["source"] == "rules"]
        assert all(r["lift"] > 0 and r["because"] for r in rules)


def test_main_prints_the_summary_and_returns_zero(setup, capsys):
    cfg = setup["cfg"]
    argv = ["--events", cfg.events, "--collection", BASE, "--artifacts", cfg.artifacts_uri, "--candidates", "10",
            "--model", "logreg", "--seed", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ranker ranker:{BASE}/") and "logreg" in out and "ndcg@10" in out
    assert load_latest_ranker(cfg.artifacts_uri, BASE).model == "logreg"


def test_missing_embeddings_name_the_job_to_run(tmp_path):
    cfg = TrainRankerConfig(collection=BASE, artifacts_uri=str(tmp_path))
    with pytest.raises(NotFoundError, match="vitrine embed"):
        run(cfg)


@pytest.mark.parametrize("bad, echo", [({"model": "forest"}, "'forest'"), ({"holdout": 1.5}, "1.5"),
                                       ({"candidates": 0}, "0"), ({"kind": "audio"}, "'audio'")])
def test_config_refuses_bad_values_and_echoes_them(bad, echo):
    with pytest.raises(ConfigError, match=echo):
        TrainRankerConfig(**bad)


def test_yaml_event_weights_keep_the_defaults_they_do_not_name(tmp_path):
    from common.events import EventWeights
    from jobs.build_profiles import build_parser as profiles_parser
    from jobs.build_profiles import config_from_args as profiles_config
    from jobs.train_ranker import build_parser, config_from_args

    path = tmp_path / "cfg.yaml"
    path.write_text("weights:\n  events: {view: 0.5}\n")
    for parser, config in ((build_parser, config_from_args), (profiles_parser, profiles_config)):
        weights = config(parser().parse_args(["--config", str(path)])).weights
        assert isinstance(weights, EventWeights) and weights.events["view"] == 0.5
        assert weights.events["purchase"] == EventWeights().events["purchase"]
    path.write_text("weights:\n  clicks: {view: 0.5}\n")
    with pytest.raises(ConfigError, match="unknown event-weight"):
        config_from_args(build_parser().parse_args(["--config", str(path)]))
