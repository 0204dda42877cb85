"""Benchmark of GraphSAGE ranking quality on MovieLens-100K under the project's one evaluation protocol.

    python -m benchmarks.graphsage_quality --epochs 20 --out graphsage_quality.json
    python -m benchmarks.graphsage_quality --set loss=bpr --set id_embeddings=false     # any GraphSAGEConfig field

Protocol: per-user temporal 80/20 split, items seen in training excluded, full-catalogue ranking, NDCG@10 with the
ideal DCG of the held-out items. Item content features are the text tower's vectors of "title (year). genres"
(common.encoder, cached in --vectors-cache). Prints one JSON object: the config, metrics at 10, fit seconds, and
the same metrics for a blend with EASE(250) (z-scored scores, weight --blend) as a reference point.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from common.datasets import item_table_ids, load_dataset
from common.events import EventWeights
from common.graphsage import GraphSAGEConfig, GraphSAGERecommender
from common.interactions import TrainData, build_interactions, temporal_split
from common.metrics import rank_metrics
from common.recommenders.base import top_k
from common.recommenders.ease import EASE

log = logging.getLogger(__name__)


def item_text_vectors(items_table, items: np.ndarray, cache: Path) -> np.ndarray:
    """The text tower's vectors of each item's text, aligned to ``items`` (computed once, then read from cache)."""
    if cache.exists():
        vectors = np.load(cache)
        if len(vectors) == len(items):
            return vectors
    from common.encoder import EncoderConfig, ItemEncoder

    text = items_table.set_index(items_table["item_id"].astype(str))["text"].reindex(items).fillna("").tolist()
    vectors = ItemEncoder(EncoderConfig()).encode_texts(text).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return vectors


def _zscore(s: np.ndarray) -> np.ndarray:
    return (s - s.mean(axis=1, keepdims=True)) / (s.std(axis=1, keepdims=True) + 1e-9)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def run(cfg: GraphSAGEConfig, vectors_cache: Path, blend: float) -> dict:
    data = load_dataset("ml-100k")
    train_ev, test_ev = temporal_split(data.events, 0.2)
    items = item_table_ids(data.items, data.events)
    users = np.asarray(sorted(data.events["user_id"].unique()), dtype=object)
    train = build_interactions(train_ev, EventWeights(), users, items)
    test = build_interactions(test_ev, EventWeights(), users, items)
    vectors = item_text_vectors(data.items, items, vectors_cache)
    every = np.arange(train.n_users)

    t = time.perf_counter()
    rec = GraphSAGERecommender(cfg).fit(TrainData(train, train_ev, item_vectors=vectors))
    fit_s = time.perf_counter() - t
    gs_scores = rec.scores(every)
    out = {"dataset": "ml-100k", "config": dataclasses.asdict(cfg), "fit_seconds": round(fit_s, 1),
           "graphsage": rank_metrics(top_k(gs_scores, 10, exclude=train.seen), test.positives, (10,))}
    ease_scores = EASE(250).fit(TrainData(train, train_ev)).scores(every)
    out["ease"] = rank_metrics(top_k(ease_scores, 10, exclude=train.seen), test.positives, (10,))
    mixed = blend * _zscore(gs_scores) + (1 - blend) * _zscore(ease_scores)
    out[f"blend_graphsage{blend:g}_ease"] = rank_metrics(top_k(mixed, 10, exclude=train.seen), test.positives, (10,))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="any GraphSAGEConfig field")
    p.add_argument("--vectors-cache", type=Path, default=Path("var/bench/ml100k_text_vectors.npy"))
    p.add_argument("--blend", type=float, default=0.3, help="GraphSAGE weight in the blend with EASE")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    overrides = {k: _parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    defaults = {"epochs": args.epochs, "threads": 1}  # 1 thread: far faster than 2 on a shared 2-core machine
    result = run(GraphSAGEConfig(**{**defaults, **overrides}), args.vectors_cache, args.blend)
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
