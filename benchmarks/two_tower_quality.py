"""Quality of the two-tower model on MovieLens-100K, alone and blended with EASE, under the harness protocol.

    python -m benchmarks.two_tower_quality --out var/bench/two_tower_quality.json

Protocol: per-user temporal 80/20 split, items seen in training excluded, full-catalogue ranking, NDCG@10 with
the ideal DCG of the held-out items. Item content is the text tower's vector of "title (year). genres".
The blend is a normalised score sum, ``w * norm(EASE) + (1 - w) * norm(two-tower)``, with norm = the rank share
or the per-user z-score; each ``w`` is chosen on a validation split carved from the TRAINING events only (the last
20% of each user's training items), then both models are refitted on all training events and scored once on the test split. BCE with random negatives (the
source projects' loss) is measured beside the default in-batch softmax with logQ correction.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time

import numpy as np
import pandas as pd

from benchmarks.report import write_report
from common.datasets import item_table_ids, load_dataset
from common.events import EventWeights, user_segments
from common.interactions import TrainData, build_interactions, temporal_split
from common.metrics import rank_metrics
from common.recommenders.base import top_k
from common.recommenders.ease import EASE
from common.two_tower import TwoTowerConfig, TwoTowerRecommender

log = logging.getLogger(__name__)
KS = (10, 20)
BLEND_WEIGHTS = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 11))


def rank_normalised(scores: np.ndarray) -> np.ndarray:
    """Each row's scores -> their rank share in [0, 1] (1 = best), so two models' scales do not matter."""
    ranks = np.argsort(np.argsort(scores, axis=1, kind="stable"), axis=1, kind="stable")
    return (ranks / max(scores.shape[1] - 1, 1)).astype(np.float32)


def z_scored(scores: np.ndarray) -> np.ndarray:
    """Each row's scores -> (s - mean) / std over the catalogue: keeps how far apart the top items are."""
    std = scores.std(axis=1, keepdims=True)
    return ((scores - scores.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)).astype(np.float32)


NORMALISERS = {"rank": rank_normalised, "zscore": z_scored}


def evaluate(scores: np.ndarray, train: TrainData, truth) -> dict[str, float]:
    ranked = top_k(scores, max(KS), exclude=train.interactions.seen)
    return {k: round(v, 4) for k, v in rank_metrics(ranked, truth.positives, KS).items()}


def _split(events: pd.DataFrame, users: np.ndarray, items: np.ndarray, vectors: np.ndarray, segments: pd.Series,
           holdout: float) -> tuple[TrainData, object]:
    train, test = temporal_split(events, holdout)
    weights = EventWeights()
    data = TrainData(build_interactions(train, weights, users, items), train, item_vectors=vectors, segments=segments)
    return data, build_interactions(test, weights, users, items)


def _fit_scores(data: TrainData, cfg: TwoTowerConfig) -> tuple[np.ndarray, np.ndarray]:
    users = np.arange(data.interactions.n_users)
    tt = TwoTowerRecommender(cfg).fit(data).scores(users)
    return tt, EASE(250.0).fit(data).scores(users)


def run(cfg: TwoTowerConfig) -> dict:
    ds = load_dataset("ml-100k")
    items = item_table_ids(ds.items, ds.events)
    users = np.asarray(sorted(ds.events["user_id"].unique()), dtype=object)
    from common.encoder import EncoderConfig, ItemEncoder

    t0 = time.perf_counter()
    text = ds.items.set_index("item_id")["text"].reindex(items).fillna("").tolist()
    encoder = ItemEncoder(EncoderConfig())
    vectors = encoder.encode_texts(text)
    segments = user_segments(ds.users)
    report: dict = {"dataset": "ml-100k", "protocol": "per-user temporal 80/20, seen excluded, full catalogue",
                    "config": cfg.to_dict(), "encoder": encoder.identity, "encode_s": round(time.perf_counter() - t0, 1)}

    # 1. blend weight on a validation split carved from the training events only
    train_events, _ = temporal_split(ds.events, 0.2)
    val_data, val_truth = _split(train_events, users, items, vectors, segments, 0.2)
    tt, ease = _fit_scores(val_data, cfg)
    best_w = {}
    for mode, norm in NORMALISERS.items():
        rt, re = norm(tt), norm(ease)
        val = {w: evaluate(w * re + (1 - w) * rt, val_data, val_truth)["ndcg@10"] for w in BLEND_WEIGHTS}
        best_w[mode] = max(val, key=lambda w: (val[w], -abs(w - 0.5)))
        report[f"validation_ndcg@10_by_ease_weight_{mode}"] = {str(w): v for w, v in val.items()}
    report["blend_ease_weight"] = best_w

    # 2. refit on all training events, score once on the test split
    data, truth = _split(ds.events, users, items, vectors, segments, 0.2)
    t1 = time.perf_counter()
    tt, ease = _fit_scores(data, cfg)
    report["fit_s"] = round(time.perf_counter() - t1, 1)
    report["test"] = {
        "two_tower": evaluate(tt, data, truth),
        "ease_250": evaluate(ease, data, truth),
    }
    for mode, norm in NORMALISERS.items():
        w = best_w[mode]
        report["test"][f"blend_{mode}_ease{w}"] = evaluate(w * norm(ease) + (1 - w) * norm(tt), data, truth)
    bce = dataclasses.replace(cfg, loss="bce")
    report["test"]["two_tower_bce"] = evaluate(TwoTowerRecommender(bce).fit(data).scores(
        np.arange(data.interactions.n_users)), data, truth)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, help="override the default epochs")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = TwoTowerConfig() if args.epochs is None else TwoTowerConfig(epochs=args.epochs)
    report = run(cfg)
    print(write_report(report, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
