"""The mine_rules job end to end: artifacts and manifest, quarantine, idempotent reruns, the shipped sample."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.artifacts import ArtifactStore
from common.config import default_catalog
from common.errors import ConfigError
from common.rules import BoughtTogether, RulesConfig
from common.synthetic_events import COMPLEMENTARY_PAIRS
from jobs.mine_rules import KIND, MineRulesConfig, build_parser, config_from_args, main, run


def tiny_events(path: Path) -> str:
    """10 orders: jacket+scarf in 6, jacket alone in 2, boots alone in 2; plus three rows that cannot be used."""
    rows = []
    for n in range(10):
        items = ["jacket", "scarf"] if n < 6 else (["jacket"] if n < 8 else ["boots"])
        for j, item in enumerate(items):
            rows.append({"user_id": f"u{n}", "item_id": item, "event": "purchase", "ts": 1_700_000_000 + 60 * n + j,
                         "order_id": f"o{n}"})
    rows += [{"user_id": None, "item_id": "jacket", "event": "purchase", "ts": 1_700_000_000, "order_id": "o1"},
             {"user_id": "u1", "item_id": "jacket", "event": "teleport", "ts": 1_700_000_000, "order_id": "o1"},
             {"user_id": "u1", "item_id": "scarf", "event": "purchase", "ts": "yesterday", "order_id": "o1"}]
    pd.DataFrame(rows).astype({"ts": str}).to_csv(path, index=False)
    return str(path)


@pytest.fixture()
def tiny(tmp_path):
    cfg = MineRulesConfig(events=tiny_events(tmp_path / "events.csv"), artifacts_uri=str(tmp_path / "artifacts"),
                          rules=RulesConfig(min_support=0.1, min_confidence=0.5))
    return cfg, run(cfg)


def test_the_job_writes_rules_and_a_manifest_and_publishes_latest(tiny):
    cfg, result = tiny
    store = ArtifactStore(cfg.artifacts_uri)
    assert store.latest(KIND, "items") == result.version
    rules = pq.read_table(result.rules_uri)
    assert rules.schema.field("antecedents").type == pa.list_(pa.string())
    got = {(tuple(r["antecedents"]), tuple(r["consequents"])): (r["support"], r["confidence"], r["lift"])
           for r in rules.to_pylist()}
    # scarf -> jacket: 6 of 6 scarves, jacket in 8 of 10 orders: lift 1.25; jacket -> scarf: 6/8, lift 1.25
    assert got == pytest.approx({(("scarf",), ("jacket",)): (0.6, 1.0, 1.25),
                                 (("jacket",), ("scarf",)): (0.6, 0.75, 1.25)})
    manifest = store.manifest(KIND, "items")
    assert manifest["result"]["rules"] == 2 and manifest["config"]["rules"]["min_support"] == 0.1
    assert (result.baskets, result.basket_source, result.items_kept, result.events) == (10, "orders", 3, 16)


def test_bad_event_rows_are_quarantined_with_their_reason(tiny):
    _, result = tiny
    assert result.quarantined == 3
    quarantine = pd.read_parquet(result.quarantine_uri)
    assert sorted(quarantine["reason"].str.split(" '").str[0]) == ["bad ts", "missing user_id", "unknown event"]
    assert "yesterday" in set(quarantine["ts"])


def test_a_rerun_writes_a_new_version_with_the_same_rules(tiny):
    cfg, first = tiny
    second = run(cfg)
    assert second.version != first.version
    assert ArtifactStore(cfg.artifacts_uri).latest(KIND, "items") == second.version
    assert pq.read_table(second.rules_uri).equals(pq.read_table(first.rules_uri))


def test_the_published_folder_loads_as_a_bought_together_scorer(tiny):
    _, result = tiny
    scorer = BoughtTogether.load(str(Path(result.rules_uri).parent))
    top = scorer.recommend(["scarf"], k=2)
    assert top[0].item_id == "jacket" and "lift 1.25" in top[0].reason
    assert top[1].item_id == "boots" and top[1].reason.startswith("popularity")


def test_category_rules_on_the_shipped_sample_are_the_planted_complementary_pairs(tmp_path):
    cfg = MineRulesConfig(artifacts_uri=str(tmp_path), level="category", catalog=default_catalog(),
                          rules=RulesConfig(min_support=0.01))
    result = run(cfg)
    rules = pd.read_parquet(result.rules_uri)
    pairs = {frozenset([a[0], c[0]]) for a, c in zip(rules["antecedents"], rules["consequents"])}
    assert pairs == {frozenset(p) for p in COMPLEMENTARY_PAIRS}
    assert result.rules == 8 and (rules["lift"] > 2).all()
    assert ArtifactStore(str(tmp_path)).latest(KIND, "categories") == result.version


def test_main_parses_flags_into_the_config_and_runs(tmp_path, capsys):
    events = tiny_events(tmp_path / "events.csv")
    assert main(["--events", events, "--out", str(tmp_path / "a"), "--min-support", "0.5",
                 "--min-confidence", "0.8"]) == 0
    assert " 1 rules" in capsys.readouterr().out  # scarf -> jacket (1.0); jacket -> scarf is 0.75
    cfg = config_from_args(build_parser().parse_args(["--max-len", "4", "--long-baskets", "skip"]))
    assert (cfg.rules.max_len, cfg.rules.long_baskets, Path(cfg.events).name) == (4, "skip", "events.parquet")


def test_bad_settings_are_refused_with_the_value():
    with pytest.raises(ConfigError, match="'categories'"):
        MineRulesConfig(level="categories")
    with pytest.raises(ConfigError, match="needs a catalog"):
        MineRulesConfig(level="category")
    with pytest.raises(ConfigError, match="min_support must be in"):
        config_from_args(build_parser().parse_args(["--min-support", "2"]))
