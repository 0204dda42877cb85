"""User and session profiles in item-vector space: the weighted mean profile and the session update rule.

Pure numpy (no I/O), so serving calls the same functions online that ``jobs/build_profiles`` runs offline.

Mean profile (the source projects' approach): for one user's events with item vectors ``v_k`` and event weights
``w_k`` (``common.events.EventWeights``: negative for dislike and return)::

    E_p = sum_{w_k > 0} w_k v_k / sum_{w_k > 0} w_k          (weighted mean of the liked side)
    E_n = sum_{w_k < 0} |w_k| v_k / sum_{w_k < 0} |w_k|      (weighted mean of the disliked side)
    E   = normalise(w_pos * E_p - w_neg * E_n)               (a missing side contributes 0)

Every *event* counts (not the net weight per item), so an item bought and then returned pulls the profile
towards it (view, bag, purchase) and away from it (return) at once, as the source projects do. Events of weight
0 count on neither side. A user with no weighted event, or whose two sides cancel exactly, has no profile:
``mean_profile`` raises ``EmptyProfileError``; the batched ``mean_profiles`` returns a zero row and ``ok=False``.

Session vector: ``s <- a1 * s + a2 * u`` with ``u = f(v) / |f(v)|``, ``a1 = (cos(u, s) + 1) / 2``, ``a2 = 1 - a1``,
and ``s = u`` on a session's first event. The result is L2-normalised after every step: item vectors are unit,
so ``s`` stays a direction whose dot product with an item is its cosine, and its scale does not drift with the
session's length (a convex mix of two unit vectors is shorter than 1 whenever they disagree). Note what the rule
does: an item close to the session barely moves it (``a1`` near 1), an item opposite to it replaces it (``a1``
near 0), so the session follows a shopper who changes their mind.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from common.errors import ConfigError, EmptyProfileError
from common.events import SESSION_GAP, EventWeights
from common.interactions import TrainData

Transform = Callable[[np.ndarray], np.ndarray]


def _identity(v: np.ndarray) -> np.ndarray:
    return v


def _finite_non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0. Got {value!r}")


@dataclass(frozen=True)
class ProfileConfig:
    """How a user's liked and disliked sides combine: ``E = w_pos * E_p - w_neg * E_n``."""

    w_pos: float = 1.0  # weight of the mean of positively weighted events
    w_neg: float = 0.5  # weight of the mean of negatively weighted events (dislike, return); 0 ignores them

    def __post_init__(self) -> None:
        _finite_non_negative("w_pos", self.w_pos)
        _finite_non_negative("w_neg", self.w_neg)
        if self.w_pos == 0 and self.w_neg == 0:
            raise ConfigError("w_pos and w_neg are both 0: a profile needs at least one side. Got 0, 0")


# ------------------------------------------------------------------------------------------- mean profile


def mean_profile(item_vectors: np.ndarray, weights: np.ndarray, cfg: ProfileConfig | None = None) -> np.ndarray:
    """One user's profile from the vectors ``[n, D]`` of the items of their events and the events' weights ``[n]``.

    Returns a float32 unit vector ``[D]``; EmptyProfileError when no event has a non-zero weight or the two
    sides cancel (see the module docstring).
    """
    cfg = cfg or ProfileConfig()
    v = np.asarray(item_vectors, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64).ravel()
    if v.ndim != 2 or v.shape[0] != w.shape[0]:
        raise ConfigError(f"item_vectors must be [n, D] with one row per weight; got {list(v.shape)} and "
                          f"{w.shape[0]} weights")
    e = np.zeros(v.shape[1])
    pos, neg = w > 0, w < 0
    if pos.any():
        e += cfg.w_pos * (w[pos] @ v[pos]) / w[pos].sum()
    if neg.any():
        e -= cfg.w_neg * (-w[neg] @ v[neg]) / -w[neg].sum()
    if not pos.any() and not neg.any():
        raise EmptyProfileError(f"no event with a non-zero weight among {len(w)} event(s): no profile")
    norm = np.linalg.norm(e)
    if norm == 0 or not np.isfinite(norm):
        raise EmptyProfileError(f"liked and disliked sides cancel out ({int(pos.sum())} positive, "
                                f"{int(neg.sum())} negative events): no profile")
    return (e / norm).astype(np.float32)


@dataclass(frozen=True, eq=False)
class Profiles:
    """Profiles of many users (rows in the caller's user order)."""

    vectors: np.ndarray  # [U, D] float32, unit rows; zero rows where ``ok`` is False
    n_positive: np.ndarray  # [U] int64: events with a positive weight
    n_negative: np.ndarray  # [U] int64: events with a negative weight
    ok: np.ndarray  # [U] bool: the user has a profile


def mean_profiles(user_rows: np.ndarray, item_rows: np.ndarray, weights: np.ndarray, item_vectors: np.ndarray,
                  n_users: int, cfg: ProfileConfig | None = None) -> Profiles:
    """``mean_profile`` for every user at once: event ``k`` is (``user_rows[k]``, ``item_rows[k]``, ``weights[k]``).

    Two sparse matrices (positive and |negative| weights, [U, I]) times the item vectors: one pass over the
    events, equal to calling ``mean_profile`` per user on that user's events.
    """
    cfg = cfg or ProfileConfig()
    u = np.asarray(user_rows, dtype=np.int64)
    i = np.asarray(item_rows, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    vecs = np.asarray(item_vectors, dtype=np.float64)
    if not (len(u) == len(i) == len(w)):
        raise ConfigError(f"user_rows, item_rows and weights differ in length: {len(u)}, {len(i)}, {len(w)}")
    if len(u) and (u.min() < 0 or u.max() >= n_users or i.min() < 0 or i.max() >= len(vecs)):
        raise ConfigError(f"event rows out of range: users must be in [0, {n_users}), items in [0, {len(vecs)})")
    shape = (n_users, len(vecs))

    def side(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m = sp.csr_matrix((np.abs(w[mask]), (u[mask], i[mask])), shape=shape)
        total = np.asarray(m.sum(axis=1)).ravel()
        mean = (m @ vecs) / np.where(total > 0, total, 1.0)[:, None]
        return mean, total > 0, np.bincount(u[mask], minlength=n_users)

    e_p, has_p, n_pos = side(w > 0)
    e_n, has_n, n_neg = side(w < 0)
    e = cfg.w_pos * e_p - cfg.w_neg * e_n  # a missing side is a zero row
    norms = np.linalg.norm(e, axis=1)
    ok = (has_p | has_n) & (norms > 0)
    out = np.zeros_like(e, dtype=np.float32)
    out[ok] = e[ok] / norms[ok, None]
    return Profiles(vectors=out, n_positive=n_pos.astype(np.int64), n_negative=n_neg.astype(np.int64), ok=ok)


# ------------------------------------------------------------------------------------------- sessions


def _unit(v: np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).ravel()
    norm = np.linalg.norm(v)
    if norm == 0 or not np.isfinite(norm):
        raise ConfigError(f"{what} must be a finite non-zero vector. Got norm {norm}")
    return v / norm


def session_update(s: np.ndarray | None, v: np.ndarray, f: Transform = _identity) -> np.ndarray:
    """One step of the session rule (module docstring): ``s`` None starts the session at ``f(v)``. Unit float32."""
    u = _unit(f(np.asarray(v, dtype=np.float64)), "f(v)")
    if s is None:
        return u.astype(np.float32)
    s = _unit(s, "the session vector")
    if s.shape != u.shape:
        raise ConfigError(f"session vector has dimension {s.shape[0]} but f(v) has {u.shape[0]}")
    a1 = (float(s @ u) + 1.0) / 2.0  # s and u are unit: the dot product is the cosine
    a2 = 1.0 - a1
    # Never zero: it would need s = -u, where a1 = 0 and the result is u.
    return _unit(a1 * s + a2 * u, "the updated session vector").astype(np.float32)


def _seconds(ts: Any) -> float:
    """Epoch seconds from a number, a datetime or a pandas Timestamp."""
    if isinstance(ts, (int, float, np.integer, np.floating)) and not isinstance(ts, bool):
        return float(ts)
    if isinstance(ts, (datetime, pd.Timestamp, np.datetime64)):
        t = pd.Timestamp(ts)
        return (t.tz_localize("UTC") if t.tzinfo is None else t).timestamp()
    raise ConfigError(f"event time must be epoch seconds or a datetime. Got {ts!r}")


@dataclass(frozen=True, eq=False)
class SessionState:
    """A live session: its vector, how many events built it and when the last one happened (immutable)."""

    vector: np.ndarray | None = None  # [D] unit float32; None before the first event
    count: int = 0  # events folded into ``vector`` since the session (re)started
    last_ts: float | None = None  # epoch seconds of the latest event
    timeout_s: float = SESSION_GAP.total_seconds()  # inactivity that ends a session (the events' SESSION_GAP)
    transform: Transform = _identity  # f: maps an item vector into the session's space

    def __post_init__(self) -> None:
        _finite_non_negative("timeout_s", self.timeout_s)
        if self.timeout_s == 0:
            raise ConfigError("timeout_s must be > 0 (seconds of inactivity that end a session). Got 0")

    def update(self, vector: np.ndarray, ts: Any) -> SessionState:
        """The state after one more event at ``ts``. A gap longer than ``timeout_s`` since the last event starts a
        new session at this event. An event older than the last one (late delivery) joins the session and does not
        move ``last_ts`` back."""
        t = _seconds(ts)
        expired = self.vector is None or (self.last_ts is not None and t - self.last_ts > self.timeout_s)
        base, count = (None, 0) if expired else (self.vector, self.count)
        last = t if self.last_ts is None or expired else max(self.last_ts, t)
        return SessionState(vector=session_update(base, vector, self.transform), count=count + 1, last_ts=last,
                            timeout_s=self.timeout_s, transform=self.transform)


def session_vector(item_vectors: np.ndarray, f: Transform = _identity) -> np.ndarray:
    """The vector of one session from its events' item vectors in time order (a fold of ``session_update``)."""
    s = None
    for v in np.asarray(item_vectors):
        s = session_update(s, v, f)
    if s is None:
        raise EmptyProfileError("a session needs at least one event")
    return s


# ------------------------------------------------------------------------------------------- recommenders


def _item_vectors(data: TrainData, who: str) -> np.ndarray:
    if data.item_vectors is None:
        raise ConfigError(f"{who} needs TrainData.item_vectors (content vectors aligned to interactions.items)")
    v = np.asarray(data.item_vectors, dtype=np.float32)
    if v.ndim != 2 or v.shape[0] != data.interactions.n_items:
        raise ConfigError(f"{who}: item_vectors have shape {list(v.shape)}; expected [{data.interactions.n_items}, D]")
    return v


def _event_rows(data: TrainData) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The training events whose user and item are in the index, with their user and item rows."""
    inter = data.interactions
    u = pd.Index(inter.users).get_indexer(data.events["user_id"])
    i = pd.Index(inter.items).get_indexer(data.events["item_id"])
    keep = (u >= 0) & (i >= 0)
    return data.events[keep], u[keep], i[keep]


class MeanProfileRecommender:
    """score(u, i) = cos(mean profile of u, item i). Users without a profile score 0 everywhere (all ties, so
    the evaluation ranks them by item index; callers wanting a fallback check ``has_profile``)."""

    def __init__(self, cfg: ProfileConfig | None = None, weights: EventWeights | None = None):
        self.cfg = cfg or ProfileConfig()  # w_pos, w_neg
        self.weights = weights or EventWeights()  # event -> weight
        self.name = "mean-profile"

    def fit(self, data: TrainData) -> MeanProfileRecommender:
        self.item_vectors = _item_vectors(data, self.name)
        events, u, i = _event_rows(data)
        p = mean_profiles(u, i, self.weights.weigh(events), self.item_vectors, data.interactions.n_users, self.cfg)
        self.profiles, self.has_profile = p.vectors, p.ok
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return (self.profiles[users] @ self.item_vectors.T).astype(np.float32)


class SessionRecommender:
    """score(u, i) = cos(vector of u's last training session, item i), the session built by ``session_update``
    over its positively weighted events in time order (a dislike or return says where not to go, which the
    rule cannot express). The last session is the ``session_id`` of the user's latest positive event. Users
    without a positive event score 0 everywhere (ties; see ``has_profile``)."""

    def __init__(self, weights: EventWeights | None = None, transform: Transform = _identity):
        self.weights = weights or EventWeights()  # event -> weight; only weight > 0 events feed the session
        self.transform = transform  # f in the update rule
        self.name = "session"

    def fit(self, data: TrainData) -> SessionRecommender:
        self.item_vectors = _item_vectors(data, self.name)
        events, u, i = _event_rows(data)
        liked = self.weights.weigh(events) > 0
        ev = pd.DataFrame({"u": u[liked], "i": i[liked], "ts": events["ts"].to_numpy()[liked],
                           "session": events["session_id"].to_numpy()[liked]})
        ev = ev.sort_values(["u", "ts"], kind="stable")
        last = ev.groupby("u")["session"].transform("last")
        ev = ev[ev["session"] == last]
        n_users, dim = data.interactions.n_users, self.item_vectors.shape[1]
        self.profiles = np.zeros((n_users, dim), dtype=np.float32)
        self.has_profile = np.zeros(n_users, dtype=bool)
        for user, rows in ev.groupby("u", sort=False)["i"]:
            self.profiles[user] = session_vector(self.item_vectors[rows.to_numpy()], self.transform)
            self.has_profile[user] = True
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return (self.profiles[users] @ self.item_vectors.T).astype(np.float32)
