"""Batch job: mine frequently-bought-together rules from an events file into a versioned rules artifact.

No Ray here on purpose: mlxtend's FP-Growth runs in one process on one in-memory basket table, and reading one
events file with pandas takes a fraction of the mining time, so a cluster would add start-up cost and nothing
else. The job scales by bounding the table instead (see common.rules). Re-running on the same inputs writes a
new version holding the same rules.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from common.artifacts import ArtifactStore
from common.catalog import ids_as_str, read_table
from common.config import default_artifacts_uri, default_events, from_mapping, values_from_args
from common.errors import ConfigError, SchemaError
from common.events import load_events, rows_as_text
from common.rules import (
    BoughtTogether,
    RulesConfig,
    basket_stats,
    baskets_from_events,
    cap_baskets,
    mine_rules,
    resolve_basket_source,
)

log = logging.getLogger(__name__)

KIND = "rules"  # artifact kind: <artifacts>/rules/<name>/<version>/
LEVELS = ("item", "category")


@dataclass(frozen=True)
class MineRulesConfig:
    events: str = field(default_factory=default_events)  # events file (Parquet, CSV, JSON Lines); path or URI
    artifacts_uri: str = field(default_factory=default_artifacts_uri)  # rules go to <this>/rules/<name>/<version>
    name: str | None = None  # artifact name; None = "items" or "categories" by level
    level: str = "item"  # "item": rules between item ids; "category": between catalogue categories
    catalog: str | None = None  # catalogue file: events of unknown items are quarantined; needed by "category"
    rules: RulesConfig = field(default_factory=RulesConfig)  # mining thresholds and memory bounds
    max_neighbours: int = 100  # co-occurrence partners kept per item for the fallback

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ConfigError(f"level must be one of {', '.join(LEVELS)}. Got {self.level!r}")
        if self.level == "category" and not self.catalog:
            raise ConfigError("level='category' needs a catalog (item_id -> category). Got catalog=None")
        if self.name is not None and (not self.name or "/" in self.name):
            raise ConfigError(f"name must be a non-empty name without '/'. Got {self.name!r}")
        if self.max_neighbours < 1:
            raise ConfigError(f"max_neighbours must be >= 1. Got {self.max_neighbours!r}")

    @property
    def artifact_name(self) -> str:
        return self.name or ("items" if self.level == "item" else "categories")


@dataclass(frozen=True)
class MineRulesResult:
    name: str
    version: str  # artifact version written (rules/<name>/<version>)
    level: str
    basket_source: str  # orders, session_bag or session_positive
    events: int  # valid events read
    quarantined: int  # event rows set aside (see quarantine_uri)
    baskets: int  # baskets mined (the support denominator)
    baskets_truncated: int
    baskets_skipped: int
    items_kept: int  # items in the one-hot table
    items_pruned: int  # items below the count threshold (min_item_count or min_support)
    itemsets: int
    rules: int
    seconds: float
    rules_uri: str
    quarantine_uri: str | None

    def summary(self) -> str:
        return (f"rules {self.name} {self.version}: {self.rules} rules from {self.itemsets} itemsets; "
                f"{self.baskets} {self.basket_source} baskets ({self.baskets_truncated} truncated, "
                f"{self.baskets_skipped} skipped); items kept={self.items_kept} pruned={self.items_pruned}; "
                f"events={self.events} quarantined={self.quarantined}; seconds={self.seconds:.1f}")


def _catalog_categories(uri: str) -> dict[str, str]:
    table = read_table(uri)
    missing = [c for c in ("item_id", "category") if c not in table.column_names]
    if missing:
        raise SchemaError(f"catalog {uri} lacks column(s) {', '.join(missing)}")
    ids = ids_as_str(table["item_id"]).to_pylist()
    return dict(zip(ids, table["category"].cast(pa.string()).to_pylist()))


def _write_quarantine(rows: pd.DataFrame, uri: str) -> None:
    """Raw values as text (a bad row's columns may hold mixed types) plus the reason."""
    fs, path = url_to_fs(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    pq.write_table(rows_as_text(rows), path, filesystem=fs)


def run(cfg: MineRulesConfig) -> MineRulesResult:
    """Read and validate events, build baskets, mine rules, and publish a new rules version."""
    t0 = time.perf_counter()
    categories = _catalog_categories(cfg.catalog) if cfg.catalog else None
    checked = load_events(cfg.events, known_items=set(categories) if categories is not None else None)
    events = checked.valid
    log.info("events %s: %s", cfg.events, checked.summary())
    source = resolve_basket_source(events, cfg.rules.basket_source)
    baskets = baskets_from_events(events, source)
    if cfg.level == "category":
        baskets = [[categories[i] for i in b if categories.get(i)] for b in baskets]
    mined = mine_rules(baskets, cfg.rules)
    # fallbacks see the same capped baskets as mining, so one long basket cannot flood the pair table
    capped, _, _ = cap_baskets(baskets, cfg.rules.max_basket_len, cfg.rules.long_baskets)
    scorer = BoughtTogether(mined.rules, *basket_stats(capped, cfg.max_neighbours))
    if mined.rules.empty:
        log.warning("no rules at min_support=%g min_confidence=%g min_lift=%g over %d %s baskets; "
                    "BoughtTogether will answer from co-occurrence and popularity",
                    cfg.rules.min_support, cfg.rules.min_confidence, cfg.rules.min_lift, mined.baskets, source)

    artifacts = ArtifactStore(cfg.artifacts_uri)
    name = cfg.artifact_name
    version = artifacts.new_version(KIND, name)
    folder = artifacts.path(KIND, name, version)
    files = scorer.save(folder)
    quarantine_uri = None
    if len(checked.quarantine):
        quarantine_uri = artifacts.path(KIND, name, version, "quarantine", "events.parquet")
        _write_quarantine(checked.quarantine, quarantine_uri)
    result = MineRulesResult(
        name=name, version=version, level=cfg.level, basket_source=source, events=len(events),
        quarantined=len(checked.quarantine), baskets=mined.baskets, baskets_truncated=mined.baskets_truncated,
        baskets_skipped=mined.baskets_skipped, items_kept=mined.items_kept, items_pruned=mined.items_pruned,
        itemsets=mined.itemsets, rules=len(mined.rules), seconds=time.perf_counter() - t0,
        rules_uri=files["rules.parquet"], quarantine_uri=quarantine_uri)
    artifacts.publish(KIND, name, version, {
        "result": dataclasses.asdict(result), "config": dataclasses.asdict(cfg), "files": files,
        "table_rows": mined.table_rows, "min_count": mined.min_count})
    return result


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="vitrine rules", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file with MineRulesConfig settings (flags override it)")
    p.add_argument("--events", help="events file (Parquet, CSV, JSON Lines); default: the shipped sample")
    p.add_argument("--out", "--artifacts", dest="artifacts_uri", help="artifact store folder or URI")
    p.add_argument("--name", help="artifact name (default: items, or categories with --level category)")
    p.add_argument("--level", choices=LEVELS, help="mine rules between items (default) or categories")
    p.add_argument("--catalog", help="catalogue file: quarantines events of unknown items; needed by --level category")
    p.add_argument("--max-neighbours", type=int, help="co-occurrence partners kept per item (default 100)")
    p.add_argument("--min-support", type=float, help="share of baskets an itemset needs (default 0.001)")
    p.add_argument("--min-confidence", type=float, help="default 0.1")
    p.add_argument("--min-lift", type=float, help="default 1.0")
    p.add_argument("--max-len", type=int, help="longest itemset (default 3)")
    p.add_argument("--min-item-count", type=int, help="drop items in fewer baskets before mining (default 2)")
    p.add_argument("--max-basket-len", type=int, help="cap on items per basket (default 50)")
    p.add_argument("--long-baskets", choices=("truncate", "skip"), help="what the cap does (default truncate)")
    p.add_argument("--max-table-cells", type=int, help="baskets x items bound (default 200,000,000)")
    p.add_argument("--on-oversize", choices=("raise", "prune"), help="over the bound: raise (default) or prune")
    p.add_argument("--basket-source", choices=("auto", "orders", "session_bag", "session_positive"))
    return p


RULES_FLAGS = ("min_support", "min_confidence", "min_lift", "max_len", "min_item_count", "max_basket_len",
               "long_baskets", "max_table_cells", "on_oversize", "basket_source")


def config_from_args(args: argparse.Namespace) -> MineRulesConfig:
    values = values_from_args(args, ("events", "artifacts_uri", "name", "level", "catalog", "max_neighbours"),
                              {"rules": RULES_FLAGS}, uris=("events", "artifacts_uri", "catalog"))
    return from_mapping(MineRulesConfig, values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(config_from_args(args))
    print(result.summary())
    return 0
