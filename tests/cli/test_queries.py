"""`vitrine similar` and `vitrine search` on the shipped sample catalogue, as a user runs them."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from common.config import default_catalog
from jobs.embed_catalog import EmbedConfig, run
from vitrine.cli import main


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, ray_local, store_dir):
    artifacts = str(tmp_path_factory.mktemp("artifacts"))
    result = run(EmbedConfig(collection="shipped", store_uri=store_dir, artifacts_uri=artifacts))
    assert result.items == 2000 and result.quarantined == 0
    return {"store": store_dir, "artifacts": artifacts, "catalog": pd.read_parquet(default_catalog())}


def cli_json(capsys, *argv: str) -> list[dict]:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_same_category_neighbours_dominate(shipped, capsys):
    df = shipped["catalog"]
    picks = df.groupby("category").head(5)
    precisions = []
    for item_id, category in zip(picks["item_id"], picks["category"]):
        rows = cli_json(capsys, "similar", item_id, "-k", "10", "--json", "--collection", "shipped",
                        "--store", shipped["store"])
        assert len(rows) == 10 and item_id not in [r["item_id"] for r in rows]
        assert {"item_id", "score", "category", "title"} <= set(rows[0])
        precisions.append(sum(r["category"] == category for r in rows) / 10)
    assert sum(precisions) / len(precisions) >= 0.6


def test_similar_with_a_filter(shipped, capsys):
    item = shipped["catalog"]["item_id"].iloc[0]
    rows = cli_json(capsys, "similar", item, "--json", "--collection", "shipped", "--store", shipped["store"],
                    "--filter", 'category == "Bag" and price < 50')
    assert rows and all(r["category"] == "Bag" and r["price"] < 50 for r in rows)


def test_text_search_finds_ankle_boots(shipped, capsys):
    rows = cli_json(capsys, "search", "black ankle boots", "-k", "10", "--json", "--collection", "shipped",
                    "--store", shipped["store"], "--artifacts", shipped["artifacts"])
    assert len(rows) == 10
    assert sum(r["category"] == "Ankle boot" for r in rows) >= 8


def test_table_output_is_readable(shipped, capsys):
    item = shipped["catalog"]["item_id"].iloc[0]
    assert main(["similar", item, "-k", "3", "--collection", "shipped", "--store", shipped["store"]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["item_id", "score", "category", "title"] and len(out) == 4


@pytest.mark.parametrize("argv, message", [
    (["similar", "no-such-item"], "unknown item_id 'no-such-item'"),
    (["similar", "ITEM", "--filter", "price <<< 3"], "filter"),
    (["similar", "ITEM", "-k", "0"], "k must be"),
])
def test_bad_queries_fail_with_one_line(shipped, capsys, argv, message):
    item = shipped["catalog"]["item_id"].iloc[0]
    argv = [item if a == "ITEM" else a for a in argv] + ["--collection", "shipped", "--store", shipped["store"]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
