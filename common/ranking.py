"""The learned reranker: a scikit-learn model over ``FEATURES``, its artifact format, and MMR diversification.

``jobs/train_ranker`` fits a ``Ranker`` offline and publishes it to ``<artifacts>/ranker/<catalogue>/<version>/``;
serving loads it with ``load_latest_ranker``, scores ``feature_matrix(cands, ctx, stats, ranker.features)`` and
orders the result with ``mmr``. The candidate and feature pieces live in ``common.rank_features`` and are
re-exported here, so ``common.ranking`` is the one import serving needs.

The model file is a joblib pickle: load only artifacts your own jobs wrote. A model pickled by one scikit-learn
version may score differently (or not load) under another, so ``Ranker.load`` refuses a version mismatch.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import joblib
import numpy as np
import sklearn
from fsspec.core import url_to_fs

from common.artifacts import ArtifactStore
from common.errors import ConfigError, NotFoundError
from common.rank_features import (
    FEATURES,
    SOURCES,
    AffinitySums,
    Candidate,
    ItemStats,
    UserContext,
    affinity_sums,
    feature_matrix,
    merge_candidates,
    stack_vectors,
    user_context,
)

__all__ = ["FEATURES", "SOURCES", "AffinitySums", "Candidate", "ItemStats", "UserContext", "affinity_sums",
           "feature_matrix", "merge_candidates", "stack_vectors", "user_context", "MODELS", "KIND", "Ranker",
           "load_latest_ranker", "mmr"]

log = logging.getLogger(__name__)

KIND = "ranker"  # artifact kind: <artifacts>/ranker/<catalogue>/<version>/
MODELS: tuple[str, ...] = ("hgb", "logreg")  # HistGradientBoostingClassifier; LogisticRegression on standardised X
MODEL_FILE, META_FILE = "ranker.joblib", "ranker.json"


def _estimator(model: str, seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if model == "hgb":
        # Shallow trees and a minimum leaf size: a few thousand positives at most, so keep the model coarse.
        return HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, max_leaf_nodes=15,
                                              min_samples_leaf=40, l2_regularization=1.0, random_state=seed)
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))


class Ranker:
    """A binary classifier of "the user will engage with this candidate" whose probability orders candidates."""

    def __init__(self, model: str = "hgb", features: Sequence[str] = FEATURES, identity: str = "",
                 seed: int = 0) -> None:
        if model not in MODELS:
            raise ConfigError(f"ranker model must be one of {', '.join(MODELS)}. Got {model!r}")
        unknown = [f for f in features if f not in FEATURES]
        if unknown or not features:
            raise ConfigError(f"ranker features must be a non-empty subset of FEATURES; unknown: {unknown}")
        self.model = model  # which estimator (MODELS)
        self.features: tuple[str, ...] = tuple(features)  # column names of X, in order
        self.identity = identity  # "ranker:<catalogue>/<version>", set by the job before saving
        self.seed = seed  # random_state of the estimator
        self.estimator = None  # the fitted scikit-learn estimator

    def _check_x(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.features):
            raise ConfigError(f"X must be [n, {len(self.features)}] (one column per ranker feature). "
                              f"Got shape {list(x.shape)}")
        return x

    def fit(self, x: np.ndarray, y: np.ndarray) -> Ranker:
        x = self._check_x(x)
        y = np.asarray(y).astype(np.int64).ravel()
        if len(y) != len(x):
            raise ConfigError(f"X has {len(x)} rows but y has {len(y)} labels")
        if set(np.unique(y)) != {0, 1}:
            raise ConfigError(f"labels must hold both 0 and 1 to learn a ranking. Got {sorted(set(y.tolist()))}")
        self.estimator = _estimator(self.model, self.seed).fit(x, y)
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        """float32 ``[n]``, higher is better (the probability of a positive)."""
        if self.estimator is None:
            raise ConfigError("this Ranker is not fitted: call fit() or Ranker.load()")
        x = self._check_x(x)
        if len(x) == 0:
            return np.zeros(0, dtype=np.float32)
        return self.estimator.predict_proba(x)[:, 1].astype(np.float32)

    def save(self, folder_uri: str) -> None:
        """Write the model (joblib) and a JSON sidecar (features, identity, scikit-learn version) into a folder."""
        if self.estimator is None:
            raise ConfigError("cannot save an unfitted Ranker")
        fs, path = url_to_fs(folder_uri)
        fs.makedirs(path, exist_ok=True)
        with fs.open(f"{path.rstrip('/')}/{MODEL_FILE}", "wb") as f:
            joblib.dump(self.estimator, f)
        meta = {"model": self.model, "features": list(self.features), "identity": self.identity,
                "seed": self.seed, "sklearn_version": sklearn.__version__}
        with fs.open(f"{path.rstrip('/')}/{META_FILE}", "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def load(cls, folder_uri: str) -> Ranker:
        """A Ranker written by ``save``; ConfigError when it was saved under another scikit-learn version."""
        fs, path = url_to_fs(folder_uri)
        base = path.rstrip("/")
        if not fs.exists(f"{base}/{META_FILE}"):
            raise NotFoundError(f"no ranker in {folder_uri}: {META_FILE} is missing")
        with fs.open(f"{base}/{META_FILE}", "r") as f:
            meta = json.load(f)
        saved = meta.get("sklearn_version")
        if saved != sklearn.__version__:
            raise ConfigError(f"ranker in {folder_uri} was saved with scikit-learn {saved} but {sklearn.__version__} "
                              f"is installed: install scikit-learn=={saved} or retrain with `vitrine train ranker`")
        ranker = cls(model=meta["model"], features=meta["features"], identity=meta.get("identity", ""),
                     seed=int(meta.get("seed", 0)))
        with fs.open(f"{base}/{MODEL_FILE}", "rb") as f:
            ranker.estimator = joblib.load(f)
        return ranker


def load_latest_ranker(artifacts_uri: str, collection: str = "items", version: str | None = None) -> Ranker:
    """The published ranker of a catalogue (latest, or a pinned ``version``); NotFoundError when there is none."""
    artifacts = ArtifactStore(artifacts_uri)
    try:
        manifest = artifacts.manifest(KIND, collection, version)
    except (NotFoundError, FileNotFoundError) as e:
        what = f"version {version!r} of the ranker" if version else "ranker"
        raise NotFoundError(f"no {what} for catalogue {collection!r} under {artifacts.root}: "
                            f"run `vitrine train ranker` first") from e
    version = version or manifest["result"]["version"]
    return Ranker.load(artifacts.path(KIND, collection, version))


def mmr(scores: np.ndarray, vectors: np.ndarray | None, k: int, lam: float = 0.8,
        top: int | None = None) -> np.ndarray:
    """Maximal marginal relevance: indices of ``k`` picks (fewer if there are fewer items), best first.

    Each step picks ``argmax lam * s_i - (1 - lam) * max_{j picked} cos(v_i, v_j)`` where ``s`` are the scores
    min-max normalised to [0, 1] (so ``lam`` means the same whatever the model's scale; equal scores become 0).
    ``lam=1`` or ``vectors=None`` gives the score order; ties go to the lower index. ``vectors`` are unit rows
    (a zero row, an item without a vector, is similar to nothing).

    ``top`` limits the MMR steps to the first ``top`` picks; the rest of the ``k`` follow in score order (ties
    to the lower index). Each step costs a pass over all vectors, and diversity only matters where results are
    shown, so a caller that shows few of many candidates need not diversify the tail. None: every pick is MMR.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not 0 <= lam <= 1:
        raise ConfigError(f"lam must be within [0, 1]. Got {lam!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ConfigError(f"k must be an integer >= 0. Got {k!r}")
    if top is not None and (isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 0):
        raise ConfigError(f"top must be None or an integer >= 0. Got {top!r}")
    k = min(int(k), len(s))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    s = np.nan_to_num(s, nan=-np.inf)
    if vectors is None or lam == 1:
        return np.argsort(-s, kind="stable")[:k].astype(np.int64)
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2 or len(v) != len(s):
        raise ConfigError(f"vectors must be [{len(s)}, D] (one row per score). Got shape {list(v.shape)}")
    picked = _mmr_picks(s, v, k if top is None else min(k, int(top)), lam)
    if len(picked) == k:
        return picked
    by_score = np.argsort(-s, kind="stable")
    rest = by_score[~np.isin(by_score, picked)][:k - len(picked)]
    return np.concatenate([picked, rest]).astype(np.int64)


def _mmr_picks(s: np.ndarray, v: np.ndarray, n: int, lam: float) -> np.ndarray:
    """The first ``n`` MMR picks (see ``mmr``) of float64 scores without NaN and their float64 vectors."""
    finite = np.isfinite(s)
    lo, hi = (s[finite].min(), s[finite].max()) if finite.any() else (0.0, 0.0)
    norm = np.where(finite, (s - lo) / (hi - lo) if hi > lo else 0.0, -1.0)
    gain = lam * norm
    max_sim = np.full(len(s), -np.inf)
    picked = np.zeros(len(s), dtype=bool)
    order = np.empty(n, dtype=np.int64)
    for step in range(n):
        value = gain if step == 0 else gain - (1 - lam) * max_sim
        value = np.where(picked, -np.inf, value)
        best = int(np.argmax(value))
        order[step] = best
        picked[best] = True
        max_sim = np.maximum(max_sim, v @ v[best])
    return order
