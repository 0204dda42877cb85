"""Batch job: train the reranker (common.ranking) on candidates rebuilt from the events, evaluate it, publish it.

Protocol, with nothing from the future leaking into features:

1. events (``common.events.load_events``; events on items missing from the embeddings snapshot are quarantined)
   are split per user in time (``common.interactions.temporal_split``): candidates, features, profiles, rules
   and item statistics come from the training part only; a candidate's label is 1 when it is among the user's
   positive held-out items;
2. each offline source computes what the online retriever computes: ``profile`` = cos(mean profile, item);
   ``session`` = cos(vector of the last training session, item) (``SessionRecommender``); ``item`` = max cos
   between the item and the user's last ``recent_items`` positively engaged items; ``rules`` = max lift of the
   FP-Growth rules whose antecedent lies within those recent items; ``popular`` = ``ItemStats.popularity``.
   ``learned`` and ``text`` are absent (their features are 0, ``has_<source>`` 0). A user's pool is the union of
   every source's top ``candidates`` items never seen in training;
3. users are split (seeded) into fit and test users; the model fits on the fit users' rows and the test users'
   NDCG@10 / HR@10 are reported for the ranker, the ranker followed by MMR, each source alone (ordering the same
   pool) and the equal-weight sum of per-source min-max scores, with the pool's recall of the held-out items;
4. the model is refit on every user's rows and published to ``<artifacts>/ranker/<catalogue>/<version>/``.

No Ray: a few hundred thousand candidate rows fit one process, and the estimators are scikit-learn's.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import scipy.sparse as sp
import sklearn
from fsspec.core import url_to_fs

from common.artifacts import ArtifactStore
from common.catalog import ids_as_str, read_table
from common.config import default_artifacts_uri, default_events, from_mapping, values_from_args
from common.errors import ConfigError
from common.events import EventWeights, load_events
from common.interactions import TrainData, build_interactions, temporal_split
from common.item_index import SCALAR_FIELDS, VECTOR_KINDS, check_base_name
from common.metrics import rank_metrics
from common.profiles import MeanProfileRecommender, ProfileConfig, SessionRecommender
from common.ranking import (
    FEATURES,
    KIND,
    MODELS,
    Candidate,
    ItemStats,
    Ranker,
    feature_matrix,
    mmr,
    stack_vectors,
    user_context,
)
from common.rules import RulesConfig, baskets_from_events, mine_rules
from jobs.build_profiles import EMBEDDINGS, read_item_vectors

log = logging.getLogger(__name__)

OFFLINE_SOURCES = ("item", "profile", "session", "rules", "popular")  # what the job can rebuild from events
ITEM_FIELDS = ("title", "category", "brand", "color", "price", "in_stock")
K = 10  # the cut-off of the reported metrics


@dataclass(frozen=True)
class TrainRankerConfig:
    events: str = field(default_factory=default_events)  # events file (Parquet, CSV, JSON Lines); path or URI
    collection: str = "items"  # catalogue name: reads embeddings/<collection>, writes ranker/<collection>
    artifacts_uri: str = field(default_factory=default_artifacts_uri)  # embeddings are read, the ranker written here
    kind: str = "fused"  # item vectors the vector sources and MMR use (one of VECTOR_KINDS)
    catalog: str | None = None  # catalogue file for item fields when the embeddings snapshot lacks them
    candidates: int = 50  # items each source proposes per user
    recent_items: int = 5  # last positively engaged items behind the "item" and "rules" sources
    holdout: float = 0.2  # per-user share of distinct items (latest first) held out as labels, in (0, 1)
    test_users: float = 0.2  # share of users kept out of fitting to report metrics on, in (0, 1)
    seed: int = 0  # user split and estimator seed
    model: str = "hgb"  # "hgb" (HistGradientBoostingClassifier) or "logreg" (standardised LogisticRegression)
    mmr_lambda: float = 0.8  # lam of the reported "ranker+mmr" metrics, in [0, 1]
    profile: ProfileConfig = field(default_factory=ProfileConfig)  # as jobs/build_profiles: w_pos, w_neg
    weights: EventWeights = field(default_factory=EventWeights)  # event/button -> weight (negative = dislike)
    rules: RulesConfig = field(default_factory=RulesConfig)  # as jobs/mine_rules

    def __post_init__(self) -> None:
        check_base_name(self.collection)
        if self.kind not in VECTOR_KINDS:
            raise ConfigError(f"kind must be one of {', '.join(VECTOR_KINDS)}. Got {self.kind!r}")
        if self.model not in MODELS:
            raise ConfigError(f"model must be one of {', '.join(MODELS)}. Got {self.model!r}")
        for name in ("candidates", "recent_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1. Got {value!r}")
        for name in ("holdout", "test_users"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name} must be within (0, 1). Got {getattr(self, name)!r}")
        if not 0 <= self.mmr_lambda <= 1:
            raise ConfigError(f"mmr_lambda must be within [0, 1]. Got {self.mmr_lambda!r}")


@dataclass(frozen=True)
class TrainRankerResult:
    version: str  # artifact version written (ranker/<collection>/<version>)
    identity: str  # the Ranker's identity ("ranker:<collection>/<version>")
    model: str
    embeddings_version: str  # the item snapshot read
    events: int  # valid events used
    quarantined: int  # event rows set aside
    users: int  # users with a candidate pool
    fit_users: int
    test_users: int  # test users with held-out positives (the metrics' denominator)
    rows: int  # candidate rows of the final fit (every user)
    positives: int  # rows labelled 1
    pool_recall: float  # share of the test users' held-out positives present in their pools
    metrics: dict  # ranker / ranker+mmr / <source> / sum -> {"ndcg@10": ..., "hit_rate@10": ...} on test users
    seconds: float
    ranker_uri: str

    def summary(self) -> str:
        best = max(OFFLINE_SOURCES, key=lambda s: self.metrics[s]["ndcg@10"])
        return (f"ranker {self.identity}: {self.model} on {self.rows} rows ({self.positives} positive) from "
                f"{self.users} users; test users={self.test_users} ndcg@10 ranker="
                f"{self.metrics['ranker']['ndcg@10']:.4f} sum={self.metrics['sum']['ndcg@10']:.4f} best source "
                f"{best}={self.metrics[best]['ndcg@10']:.4f}; pool recall={self.pool_recall:.3f}; "
                f"seconds={self.seconds:.1f}")


# ------------------------------------------------------------------------------------------- inputs


def read_item_fields(artifacts: ArtifactStore, base: str, version: str, catalog: str | None) -> dict[str, dict]:
    """item_id -> {title, category, brand, color, price, in_stock} from the snapshot (or ``catalog`` when given)."""
    if catalog:
        table = read_table(catalog)
        table = table.set_column(table.column_names.index("item_id"), "item_id", ids_as_str(table["item_id"]))
    else:
        fs, path = url_to_fs(artifacts.path(EMBEDDINGS, base, version, "embeddings.parquet"))
        names = set(pq.read_schema(path, filesystem=fs).names)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["item_id"] + [c for c in ITEM_FIELDS if c in names])
    cols = [c for c in ITEM_FIELDS if c in table.column_names and c in SCALAR_FIELDS]
    if "category" not in cols:
        log.warning("item fields lack a category: category_affinity will be 0 (pass --catalog)")
    frame = table.select(["item_id", *cols]).to_pandas()
    return {row.pop("item_id"): row for row in frame.to_dict("records")}


@dataclass(frozen=True, eq=False)
class OfflineSources:
    """Every offline source fitted on the training events, indexed like ``interactions`` (users x items)."""

    data: TrainData  # training interactions, events and item vectors
    profile: MeanProfileRecommender
    session: SessionRecommender
    recent: dict[int, np.ndarray]  # user row -> item rows of the last positive items (oldest first)
    rules: dict[str, list[tuple[frozenset, list[str], float]]]  # antecedent item -> (antecedent, consequents, lift)
    stats: ItemStats
    by_popularity: np.ndarray  # item rows, most popular first


def fit_sources(train: pd.DataFrame, item_ids: np.ndarray, vectors: np.ndarray, cfg: TrainRankerConfig
                ) -> OfflineSources:
    inter = build_interactions(train, cfg.weights, items=item_ids)
    data = TrainData(interactions=inter, events=train, item_vectors=vectors)
    liked = train[cfg.weights.weigh(train) > 0].sort_values(["user_id", "ts"], kind="stable")
    last = liked.drop_duplicates(["user_id", "item_id"], keep="last").groupby("user_id").tail(cfg.recent_items)
    u = pd.Index(inter.users).get_indexer(last["user_id"])
    i = pd.Index(item_ids).get_indexer(last["item_id"])
    recent = {int(k): g.to_numpy() for k, g in pd.Series(i).groupby(u)}
    mined = mine_rules(baskets_from_events(train, cfg.rules.basket_source), cfg.rules).rules
    rules: dict[str, list] = {}
    for a, c, lift in zip(mined["antecedents"], mined["consequents"], mined["lift"]):
        for item in a:
            rules.setdefault(item, []).append((frozenset(a), list(c), float(lift)))
    stats = ItemStats.from_events(train, cfg.weights)
    pop = np.array([stats.popularity.get(i, 0.0) for i in item_ids])
    log.info("offline sources: %d users, %d rules", inter.n_users, len(mined))
    return OfflineSources(data=data, profile=MeanProfileRecommender(cfg.profile, cfg.weights).fit(data),
                          session=SessionRecommender(cfg.weights).fit(data), recent=recent, rules=rules,
                          stats=stats, by_popularity=np.argsort(-pop, kind="stable"))


# ------------------------------------------------------------------------------------------- candidates


def _top(scores: np.ndarray, seen: np.ndarray, n: int) -> np.ndarray:
    """Rows of the ``n`` best unseen items, best first (ties by row)."""
    s = np.where(seen, -np.inf, scores)
    order = np.argsort(-s, kind="stable")[:n]
    return order[np.isfinite(s[order])]


def user_candidates(src: OfflineSources, u: int, n: int) -> list[Candidate]:
    """User row ``u``'s pool: every offline source's top ``n`` unseen items, reasons as the retriever writes them."""
    items, vectors = src.data.interactions.items, src.data.item_vectors
    seen = src.data.interactions.seen[u].toarray().ravel() > 0
    pool: dict[int, Candidate] = {}

    def add(row: int, source: str, score: float, reason: dict) -> None:
        cand = pool.setdefault(int(row), Candidate(items[row], vector=vectors[row]))
        cand.add(source, score, {"source": source, **reason})

    recent = src.recent.get(u, np.zeros(0, dtype=np.int64))
    if len(recent):
        sims = vectors[recent] @ vectors.T  # [r, I]
        best = sims.argmax(axis=0)
        for row in _top(sims.max(axis=0), seen, n):
            add(row, "item", sims[best[row], row], {"because": items[recent[best[row]]],
                                                    "score": float(sims[best[row], row])})
    for source, model in (("profile", src.profile), ("session", src.session)):
        if model.has_profile[u]:
            scores = model.profiles[u] @ vectors.T
            for row in _top(scores, seen, n):
                add(row, source, scores[row], {"score": float(scores[row])})
    query = {items[r] for r in recent}
    lifts: dict[str, tuple[float, frozenset]] = {}
    for q in query:
        for antecedent, consequents, lift in src.rules.get(q, ()):
            if antecedent <= query:
                for c in consequents:
                    if c not in lifts or lift > lifts[c][0]:
                        lifts[c] = (lift, antecedent)
    index = src.data.interactions.item_index
    ranked = sorted(((lift, c, a) for c, (lift, a) in lifts.items() if c in index and not seen[index[c]]),
                    key=lambda t: (-t[0], t[1]))[:n]
    for lift, c, antecedent in ranked:
        add(index[c], "rules", lift, {"because": "+".join(sorted(antecedent)), "lift": lift})
    popular = src.by_popularity[~seen[src.by_popularity]][:n]
    for row in popular:
        p = src.stats.popularity.get(items[row], 0.0)
        add(row, "popular", p, {"score": p})
    return list(pool.values())


@dataclass(frozen=True, eq=False)
class UserRows:
    user: str
    cands: list[Candidate]
    x: np.ndarray  # [n, len(FEATURES)]
    y: np.ndarray  # [n] 0/1
    n_truth: int  # held-out positive items of the user (in the pool or not)


def build_rows(src: OfflineSources, truth: dict[str, set[str]], fields: dict[str, dict],
               cfg: TrainRankerConfig) -> list[UserRows]:
    inter = src.data.interactions
    by_user = dict(tuple(src.data.events.groupby("user_id", sort=False)))
    out = []
    for u, user in enumerate(inter.users):
        cands = user_candidates(src, u, cfg.candidates)
        if not cands:
            continue
        for c in cands:
            c.fields = fields.get(c.item_id, {})
        profile = src.profile.profiles[u] if src.profile.has_profile[u] else None
        ctx = user_context(by_user[user], fields, profile, cfg.weights)
        positives = truth.get(user, set())
        y = np.array([c.item_id in positives for c in cands], dtype=np.int64)
        out.append(UserRows(user, cands, feature_matrix(cands, ctx, src.stats), y, len(positives)))
    return out


# ------------------------------------------------------------------------------------------- evaluation


def _at_k(orders: list[list[str]], truth: list[set[str]]) -> dict[str, float]:
    """NDCG@K and HR@K of ranked id lists (common.metrics; short lists are padded with a never-relevant item)."""
    ids = sorted({i for t in truth for i in t} | {i for o in orders for i in o[:K]})
    col = {i: j for j, i in enumerate(ids)}
    pad = len(ids)
    ranked = np.full((len(orders), K), pad, dtype=np.int64)
    for r, o in enumerate(orders):
        ranked[r, :min(K, len(o))] = [col[i] for i in o[:K]]
    rows = [r for r, t in enumerate(truth) for _ in t]
    cols = [col[i] for t in truth for i in t]
    m = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(orders), pad + 1))
    out = rank_metrics(ranked, m, (K,))
    return {f"ndcg@{K}": out[f"ndcg@{K}"], f"hit_rate@{K}": out[f"hit_rate@{K}"]}


def _minmax(v: np.ndarray, has: np.ndarray) -> np.ndarray:
    if not has.any():
        return np.zeros_like(v)
    lo, hi = v[has].min(), v[has].max()
    return np.where(has, (v - lo) / (hi - lo) if hi > lo else 1.0, 0.0)


def evaluate(rows: list[UserRows], ranker: Ranker, truth: dict[str, set[str]], cfg: TrainRankerConfig
             ) -> tuple[dict[str, dict[str, float]], float, int]:
    """(metrics per ordering, pool recall, users evaluated) over the test users with held-out positives."""
    rows = [r for r in rows if r.n_truth]
    tie = np.random.default_rng(cfg.seed)  # a fixed random tie-break, so no source inherits the pool's order
    orders: dict[str, list[list[str]]] = {name: [] for name in ("ranker", "ranker+mmr", *OFFLINE_SOURCES, "sum")}
    for r in rows:
        ids = [c.item_id for c in r.cands]
        jitter = tie.random(len(ids))
        score = ranker.score(r.x)
        orders["ranker"].append([ids[i] for i in np.lexsort((jitter, -score))])
        picks = mmr(score, stack_vectors(r.cands), K, cfg.mmr_lambda)
        orders["ranker+mmr"].append([ids[i] for i in picks])
        total = np.zeros(len(ids))
        for s in OFFLINE_SOURCES:
            has = np.array([s in c.scores for c in r.cands])
            raw = np.array([c.scores.get(s, -np.inf) for c in r.cands])
            orders[s].append([ids[i] for i in np.lexsort((jitter, -raw))])
            total += _minmax(np.where(has, raw, 0.0), has)
        orders["sum"].append([ids[i] for i in np.lexsort((jitter, -total))])
    sets = [truth[r.user] for r in rows]
    metrics = {name: _at_k(o, sets) for name, o in orders.items()}
    found = sum(int(r.y.sum()) for r in rows)
    recall = found / max(1, sum(r.n_truth for r in rows))
    return metrics, recall, len(rows)


# ------------------------------------------------------------------------------------------- the job


def _stack(rows: list[UserRows]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([r.x for r in rows]), np.concatenate([r.y for r in rows])


def run(cfg: TrainRankerConfig) -> TrainRankerResult:
    """Rebuild candidates from the events, fit and evaluate the ranker, refit on every user and publish it."""
    t0 = time.perf_counter()
    artifacts = ArtifactStore(cfg.artifacts_uri)
    snap = read_item_vectors(artifacts, cfg.collection, cfg.kind)
    fields = read_item_fields(artifacts, cfg.collection, snap.version, cfg.catalog)
    checked = load_events(cfg.events, known_items=set(snap.item_ids))
    log.info("events %s: %s", cfg.events, checked.summary())
    train, test = temporal_split(checked.valid, cfg.holdout)
    held = build_interactions(test, cfg.weights)
    pos = held.positives.tocoo()
    truth: dict[str, set[str]] = {}
    for u, i in zip(pos.row, pos.col):
        truth.setdefault(held.users[u], set()).add(held.items[i])

    src = fit_sources(train, snap.item_ids, snap.vectors, cfg)
    rows = build_rows(src, truth, fields, cfg)
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    n_test = max(1, int(round(len(rows) * cfg.test_users)))
    test_rows = [rows[i] for i in sorted(order[:n_test])]
    fit_rows = [rows[i] for i in sorted(order[n_test:])]
    if not fit_rows:
        raise ConfigError(f"only {len(rows)} user(s) with candidates: too few to hold out test_users="
                          f"{cfg.test_users} and still fit")
    held_out = Ranker(cfg.model, FEATURES, seed=cfg.seed).fit(*_stack(fit_rows))
    metrics, pool_recall, n_eval = evaluate(test_rows, held_out, truth, cfg)
    log.info("test users: %s", metrics)

    version = artifacts.new_version(KIND, cfg.collection)
    identity = f"{KIND}:{cfg.collection}/{version}"
    x, y = _stack(rows)
    ranker = Ranker(cfg.model, FEATURES, identity=identity, seed=cfg.seed).fit(x, y)
    uri = artifacts.path(KIND, cfg.collection, version)
    ranker.save(uri)
    result = TrainRankerResult(
        version=version, identity=identity, model=cfg.model, embeddings_version=snap.version,
        events=len(checked.valid), quarantined=len(checked.quarantine), users=len(rows), fit_users=len(fit_rows),
        test_users=n_eval, rows=len(y), positives=int(y.sum()), pool_recall=pool_recall, metrics=metrics,
        seconds=time.perf_counter() - t0, ranker_uri=uri)
    artifacts.publish(KIND, cfg.collection, version, {
        "result": dataclasses.asdict(result), "config": dataclasses.asdict(cfg), "features": list(FEATURES),
        "sources": list(OFFLINE_SOURCES), "events": cfg.events, "embeddings_version": snap.version,
        "encoder_identity": snap.model, "sklearn_version": sklearn.__version__})
    return result


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="vitrine train ranker", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file with TrainRankerConfig settings (flags override it)")
    p.add_argument("--events", help="events file (Parquet, CSV, JSON Lines); default: the shipped sample's")
    p.add_argument("--collection", help="catalogue name (default: items)")
    p.add_argument("--artifacts", dest="artifacts_uri", help="artifact store folder or URI")
    p.add_argument("--kind", choices=VECTOR_KINDS, help="item vectors of the vector sources (default: fused)")
    p.add_argument("--catalog", help="catalogue file for item fields when the embeddings snapshot lacks them")
    p.add_argument("--candidates", type=int, help="items each source proposes per user (default 50)")
    p.add_argument("--recent-items", type=int, help="recent items behind the item and rules sources (default 5)")
    p.add_argument("--holdout", type=float, help="per-user share of items held out as labels (default 0.2)")
    p.add_argument("--test-users", type=float, help="share of users metrics are reported on (default 0.2)")
    p.add_argument("--seed", type=int, help="user split and model seed (default 0)")
    p.add_argument("--model", choices=MODELS, help="hgb (default) or logreg")
    p.add_argument("--mmr-lambda", type=float, help="lam of the reported ranker+mmr metrics (default 0.8)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainRankerConfig:
    values = values_from_args(args, ("events", "collection", "artifacts_uri", "kind", "catalog", "candidates",
                                     "recent_items", "holdout", "test_users", "seed", "model", "mmr_lambda"),
                              uris=("events", "artifacts_uri", "catalog"))
    return from_mapping(TrainRankerConfig, values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(config_from_args(args))
    print(result.summary())
    return 0
