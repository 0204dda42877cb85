"""The evaluation harness end to end on events files: tables, report files, JSON keys, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.config import default_catalog
from common.errors import ConfigError
from jobs import evaluate
from vitrine import cli

SAMPLE = Path(default_catalog()).parent


@pytest.fixture(scope="module")
def sample_eval(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    cfg = evaluate.EvalConfig(dataset=None, events=str(SAMPLE / "events.parquet"), ks=(10, 20),
                              models=("popularity", "itemknn", "ease", "cooccurrence"), out=str(out))
    return evaluate.run(cfg)


def test_the_report_goes_to_any_fsspec_uri():
    """On a cluster the report is written to object storage; fsspec's memory:// stands in for s3:// here."""
    import fsspec

    cfg = evaluate.EvalConfig(dataset=None, events=str(SAMPLE / "events.parquet"), ks=(10,),
                              models=("popularity",), out="memory://evals")
    result = evaluate.run(cfg)
    fs = fsspec.filesystem("memory")
    assert result.out_dir == "memory://evals/events"
    assert json.loads(fs.cat("/evals/events/metrics.json"))["models"]["popularity"]["metrics"]["ndcg@10"] >= 0
    assert fs.size("/evals/events/ndcg_at_k.png") > 1000 and b"| popularity |" in fs.cat("/evals/events/report.md")


def test_learned_neighbours_beat_popularity_on_the_planted_tastes(sample_eval):
    ndcg = {r.model: r.metrics["ndcg@10"] for r in sample_eval.reports}
    assert set(ndcg) == {"popularity", "itemknn", "ease", "cooccurrence"}
    assert ndcg["itemknn"] > ndcg["popularity"] and ndcg["ease"] > ndcg["popularity"]
    assert sample_eval.protocol == "user" and sample_eval.users == 500


def test_report_files_and_documented_json_keys(sample_eval):
    out = Path(sample_eval.out_dir)
    data = json.loads((out / "metrics.json").read_text())
    assert {"dataset", "protocol", "users", "items", "train_events", "test_events", "quarantined", "seconds",
            "config", "skipped", "models"} <= set(data)
    ease = data["models"]["ease"]
    for m in ("precision", "recall", "ndcg", "hit_rate", "map", "coverage"):
        assert f"{m}@10" in ease["metrics"] and f"{m}@20" in ease["metrics"]
    assert set(ease["slices"]) == {"light_users", "cold_items"}
    assert (out / "ndcg_at_k.png").stat().st_size > 1000 and (out / "recall_at_k.png").exists()
    report = (out / "report.md").read_text()
    assert "| ease |" in report and "ndcg_at_k.png" in report


def test_basket_protocol_on_an_events_file(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for u in range(30):  # every order holds a pair (2k, 2k+1): the partner is the answer to the query
        for o in range(4):
            a = int(rng.integers(0, 10)) * 2
            for pos, item in enumerate((a, a + 1)):
                rows.append((f"u{u}", f"i{item}", "purchase", o * 1000 + pos, f"o{u}-{o}"))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "event", "ts", "order_id"])
    df.to_csv(tmp_path / "orders.csv", index=False)
    result = evaluate.run(evaluate.EvalConfig(dataset=None, events=str(tmp_path / "orders.csv"), protocol="basket",
                                              ks=(1, 5), out=str(tmp_path / "out")))
    hr = {r.model: r.metrics["hit_rate@1"] for r in result.reports}
    assert hr["cooccurrence"] == 1.0 and hr["popularity"] < 0.5
    assert "userknn" in result.skipped


def test_bad_rows_are_counted_and_the_evaluation_goes_on(tmp_path):
    events = pd.read_parquet(SAMPLE / "events.parquet").head(3000)
    events.loc[[0, 5], "event"] = "teleport"
    events.to_parquet(tmp_path / "ev.parquet")
    result = evaluate.run(evaluate.EvalConfig(dataset=None, events=str(tmp_path / "ev.parquet"),
                                              models=("popularity",), ks=(10,), out=str(tmp_path / "out")))
    assert result.quarantined == 2 and result.reports[0].metrics["users"] > 0


@pytest.mark.parametrize("kwargs, match", [({"protocol": "random"}, "'random'"), ({"holdout": 1.0}, "1.0"),
                                           ({"models": ("magic",)}, "magic"), ({"dataset": "netflix"}, "netflix")])
def test_bad_config_is_refused_naming_the_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        evaluate.EvalConfig(**kwargs)


def test_cli_prints_the_table_and_a_one_line_error(tmp_path, capsys):
    assert cli.main(["eval", "--events", str(SAMPLE / "events.parquet"), "--models", "popularity", "--k", "10",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "popularity" in out and "ndcg@10" in out and "report:" in out
    assert cli.main(["eval", "--events", str(tmp_path / "missing.parquet"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error:")


@pytest.mark.slow
def test_movielens_reproduces_the_reference_baselines(tmp_path):
    """Fetches recbole==1.2.1 from the package index; reference NDCG@10: MostPop 0.122, EASE 0.208."""
    result = evaluate.run(evaluate.EvalConfig(dataset="ml-100k", models=("popularity", "ease"), ks=(10,),
                                              out=str(tmp_path)))
    ndcg = {r.model: r.metrics["ndcg@10"] for r in result.reports}
    assert abs(ndcg["popularity"] - 0.122) <= 0.01 and abs(ndcg["ease"] - 0.208) <= 0.01


def test_item_vectors_from_a_file_are_aligned_to_the_catalogue(tmp_path):
    pd.DataFrame({"item_id": ["b", "a"], "v": [[0.0, 1.0], [1.0, 0.0]]}).to_parquet(tmp_path / "vec.parquet")
    out = evaluate.file_vectors(str(tmp_path / "vec.parquet"), "v", np.array(["a", "b", "c"], object))
    assert out.tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    with pytest.raises(ConfigError, match="fused_vector"):
        evaluate.file_vectors(str(tmp_path / "vec.parquet"), "fused_vector", np.array(["a"], object))
