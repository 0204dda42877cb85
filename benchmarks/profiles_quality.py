"""Benchmark: ranking quality of the mean-profile and session recommenders on the shipped sample vs popularity.

The shared protocol (jobs/evaluate): per-user temporal 80/20 split of the sample's events, full-catalogue ranking
with each user's training items excluded, binary relevance = a positive net weight on a test item, NDCG@10 etc.
averaged over users with test positives. Item vectors come from the embed job's latest snapshot (run
``vitrine embed`` or ``make demo`` first), aligned to the evaluation's item index. Prints JSON; no assertions.

    python -m benchmarks.profiles_quality --kinds fused visual --out var/bench/profiles_quality.json
"""
from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import numpy as np

from benchmarks.report import write_report
from common.artifacts import ArtifactStore
from common.config import default_artifacts_uri
from common.datasets import item_table_ids, load_dataset
from common.events import EventWeights
from common.interactions import TrainData, build_interactions, temporal_split
from common.item_index import VECTOR_KINDS
from common.metrics import rank_metrics
from common.profiles import MeanProfileRecommender, ProfileConfig, SessionRecommender
from common.recommenders.base import top_k
from common.recommenders.ease import EASE
from common.recommenders.neighbours import ItemKNN
from common.recommenders.popularity import Popularity
from jobs.build_profiles import read_item_vectors

log = logging.getLogger(__name__)
KS = (10, 20)


def aligned_vectors(ids: np.ndarray, snapshot_ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, int]:
    """Rows of ``vectors`` in the order of ``ids`` (zero rows for ids the snapshot lacks) and how many were missing."""
    pos = {item: k for k, item in enumerate(snapshot_ids)}
    out = np.zeros((len(ids), vectors.shape[1]), dtype=np.float32)
    rows = np.array([pos.get(item, -1) for item in ids])
    out[rows >= 0] = vectors[rows[rows >= 0]]
    return out, int((rows < 0).sum())


def evaluate(rec: Any, data: TrainData, test_truth: Any) -> dict[str, float]:
    t0 = time.perf_counter()
    rec.fit(data)
    ranked = top_k(rec.scores(np.arange(data.interactions.n_users)), max(KS), exclude=data.interactions.seen)
    metrics = {k: round(v, 4) for k, v in rank_metrics(ranked, test_truth, KS).items()}
    if hasattr(rec, "has_profile"):
        metrics["users_with_profile"] = int(rec.has_profile.sum())
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    return metrics


def run(kinds: list[str], artifacts_uri: str, collection: str, holdout: float) -> dict[str, Any]:
    d = load_dataset("sample")
    train_ev, test_ev = temporal_split(d.events, holdout)
    items = item_table_ids(d.items, d.events)
    users = np.asarray(sorted(d.events["user_id"].unique()), dtype=object)
    weights = EventWeights()
    train = build_interactions(train_ev, weights, users, items)
    test = build_interactions(test_ev, weights, users, items)
    report: dict[str, Any] = {"dataset": "sample", "events": len(d.events), "train_events": len(train_ev),
                              "test_events": len(test_ev), "users": len(users), "items": len(items),
                              "holdout": holdout, "results": {}}
    baselines = TrainData(train, train_ev)
    for rec in (Popularity(), ItemKNN(200), EASE(250)):
        report["results"][rec.name] = evaluate(rec, baselines, test.positives)
    snapshots = {}
    for kind in kinds:
        snap = read_item_vectors(ArtifactStore(artifacts_uri), collection, kind)
        vectors, missing = aligned_vectors(items, snap.item_ids, snap.vectors)
        snapshots[kind] = {"version": snap.version, "model": snap.model, "missing_items": missing}
        data = TrainData(train, train_ev, item_vectors=vectors)
        for w_neg in (0.0, 0.5, 1.0):
            rec = MeanProfileRecommender(ProfileConfig(w_pos=1.0, w_neg=w_neg), weights)
            report["results"][f"mean-profile[{kind}, w_neg={w_neg}]"] = evaluate(rec, data, test.positives)
        report["results"][f"session[{kind}]"] = evaluate(SessionRecommender(weights), data, test.positives)
    report["snapshots"] = snapshots
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="+", default=["fused"], choices=VECTOR_KINDS, help="item vector kinds")
    p.add_argument("--artifacts", default=default_artifacts_uri(), help="artifact store holding the embeddings")
    p.add_argument("--collection", default="items", help="catalogue name the embed job wrote")
    p.add_argument("--holdout", type=float, default=0.2, help="per-user share of items held out (latest)")
    p.add_argument("--out", help="also write the JSON report here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = run(args.kinds, args.artifacts, args.collection, args.holdout)
    print(write_report(report, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
