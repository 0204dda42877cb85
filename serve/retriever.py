"""Retriever deployment: candidates from every source through the vector store, with the reasons they came.

Sources (``common.ranking.SOURCES``): ``item`` (nearest items to a seed item or to the user's latest items),
``learned`` (two-tower / GraphSAGE user and item vectors, when those jobs have published), ``profile`` (the
user's mean-embedding profile), ``session`` (the live session vector that POST /events updates), ``text`` (a
query through the text tower), ``rules`` (frequently bought together) and ``popular`` (by segment when known).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from ray import serve
from ray.serve.handle import DeploymentHandle

from common.artifacts import ArtifactStore
from common.catalog import read_table
from common.errors import NotFoundError
from common.events import load_events
from common.item_index import collection_name
from common.ranking import Candidate, ItemStats, UserContext, merge_candidates, user_context
from common.rules import BoughtTogether
from common.session_store import Session, SessionStore
from common.user_history import UserHistory
from common.vector_store import Hit, open_store
from serve.config import ServeConfig

log = logging.getLogger(__name__)

SHOWN_FIELDS = ("title", "category", "brand", "color", "price", "in_stock")
LEARNED_MODELS = ("two_tower", "graphsage")  # <collection>_<model>_users / _items, written by the training jobs
PROFILE_KIND = "fused"  # the profiles job writes <collection>_users_<kind>


def sessions_collection(base: str) -> str:
    return f"{base}_sessions"


@dataclass
class Retrieval:
    """What the retriever found for one request."""

    strategy: str  # personal | session | popular | similar | bought_together | search
    candidates: list[Candidate]
    seen: list[str] = field(default_factory=list)  # items the user already interacted with (for the filter)
    recent: list[str] = field(default_factory=list)  # the user's latest items, newest first
    context: UserContext = field(default_factory=UserContext)  # affinities and profile (ranking features)
    segment: str | None = None


@serve.deployment
class Retriever:
    def __init__(self, cfg: ServeConfig, text_encoder: DeploymentHandle | None = None) -> None:
        self.cfg = cfg
        self.store = open_store(cfg.store_uri, connect_timeout=cfg.store_timeout_s,
                                call_timeout=cfg.store_timeout_s)
        self.text_encoder = text_encoder
        self.content = collection_name(cfg.collection, cfg.kind)
        self.similar_space = collection_name(cfg.collection, cfg.similar_kind)
        spec = self.store.describe(self.content)  # NotFoundError when the catalogue was never embedded
        self.sessions = SessionStore(self.store, sessions_collection(cfg.collection), dim=spec.dim, model=spec.model,
                                     gap_seconds=cfg.session_gap_s)
        events = load_events(cfg.events).valid if cfg.events else None
        if events is None:
            log.warning("no events file configured: no offline history, popularity from nothing")
        users = read_table(cfg.users).to_pandas() if cfg.users and events is not None else None
        self.history = UserHistory.from_events(events, users) if events is not None else UserHistory()
        # The ranker's features are computed as in training (jobs/train_ranker): popularity from ItemStats and
        # affinities from the user's whole positive history (common.ranking.user_context).
        self.stats = ItemStats.from_events(events) if events is not None else ItemStats({}, {})
        self.user_events = dict(tuple(events.groupby("user_id", sort=False))) if events is not None else {}
        self.fields_by_id = {r["item_id"]: r for batch in self.store.scan(self.content, ["category", "brand", "price"])
                            for r in batch}
        self._contexts: dict[str, UserContext] = {}
        self.rules = self._load_rules()
        self.learned = self._learned_models()
        self.profiles = f"{cfg.collection}_users_{PROFILE_KIND}"
        self.has_profiles = self.store.has_collection(self.profiles)
        log.info("retriever ready: %d known users, rules=%s, learned=%s, profiles=%s", len(self.history.seen),
                 self.rules is not None, self.learned, self.has_profiles)

    # ---- start-up -------------------------------------------------------------------------------------------
    def _load_rules(self) -> BoughtTogether | None:
        artifacts = ArtifactStore(self.cfg.artifacts_uri)
        version = artifacts.latest("rules", self.cfg.collection)
        if version is None:
            log.warning("no published rules for %r: bought-together falls back to nothing; run `vitrine rules`",
                        self.cfg.collection)
            return None
        return BoughtTogether.load(artifacts.path("rules", self.cfg.collection, version))

    def _learned_models(self) -> list[str]:
        names = set(self.store.list_collections())
        return [m for m in LEARNED_MODELS
                if f"{self.cfg.collection}_{m}_users" in names and f"{self.cfg.collection}_{m}_items" in names]

    def ready(self) -> dict[str, Any]:
        self.store.count(self.content)  # raises StoreUnavailableError when Milvus is down
        return {"items": self.store.count(self.content), "users": len(self.history.seen),
                "rules": self.rules is not None, "learned": self.learned, "profiles": self.has_profiles}

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _search(self, name: str, vectors: np.ndarray, n: int, expr: str | None, exclude: list[str]) -> list[list[Hit]]:
        return self.store.search(name, np.asarray(vectors, dtype=np.float32).reshape(len(vectors), -1), k=n,
                                 filter=expr, exclude_ids=exclude)

    def _attach(self, cands: list[Candidate]) -> list[Candidate]:
        """Fields and content vectors of every candidate in one read (items gone from the catalogue dropped)."""
        if not cands:
            return cands
        rows = {r["item_id"]: r for r in self.store.get(self.content, [c.item_id for c in cands], with_vectors=True)}
        kept = []
        for c in cands:
            row = rows.get(c.item_id)
            if row is None:
                continue
            c.fields = {k: row.get(k) for k in SHOWN_FIELDS}
            c.vector = np.asarray(row["vector"], dtype=np.float32)
            kept.append(c)
        return kept

    def _require_item(self, item_id: str) -> None:
        if not self.store.get(self.content, [item_id]):
            raise NotFoundError(f"unknown item_id {item_id!r}")

    def _item_neighbours(self, seeds: list[str], n: int, expr: str | None, exclude: list[str],
                         space: str) -> list[Candidate]:
        if not seeds:
            return []
        rows = self.store.get(space, seeds, with_vectors=True)
        if not rows:
            return []
        hits = self._search(space, np.stack([r["vector"] for r in rows]), n, expr, exclude + seeds)
        out: dict[str, Candidate] = {}
        for row, found in zip(rows, hits):
            for h in found:
                c = out.setdefault(h.item_id, Candidate(h.item_id))
                c.add("item", h.score, {"source": "item", "because": row["item_id"], "score": round(h.score, 4)})
        return list(out.values())

    def _learned_items(self, model: str, vector: np.ndarray, n: int, expr: str | None, exclude: list[str],
                       because: str | None = None) -> list[Candidate]:
        hits = self._search(f"{self.cfg.collection}_{model}_items", vector[None, :], n, expr, exclude)[0]
        return [_cand(h, "learned", {"source": "learned", "model": model, "score": round(h.score, 4),
                                     **({"because": because} if because else {})}) for h in hits]

    def _rules(self, seeds: list[str], n: int, exclude: list[str]) -> list[Candidate]:
        if self.rules is None or not seeds:
            return []
        out = []
        for r in self.rules.recommend(seeds, n, exclude=exclude):
            if r.lift is None:
                continue  # co-occurrence and popularity fallbacks are other sources' business
            c = Candidate(r.item_id)
            c.add("rules", float(r.lift), {"source": "rules", "because": list(r.because), "lift": round(r.lift, 3),
                                           "rule": r.reason})
            out.append(c)
        return out

    def _popular(self, segment: str | None, n: int, exclude: set[str]) -> list[Candidate]:
        out = []
        for item, share in self.history.popular_for(segment):
            if item in exclude:
                continue
            c = Candidate(item)  # ordered by the segment's popularity; scored as the ranker was trained (overall)
            c.add("popular", self.stats.popularity.get(item, 0.0),
                  {"source": "popular", "segment": segment or "overall", "share": round(share, 4)})
            out.append(c)
            if len(out) >= n:
                break
        return out

    # ---- endpoints ----------------------------------------------------------------------------------------------
    def similar(self, item_id: str, n: int, expr: str | None = None) -> Retrieval:
        self._require_item(item_id)
        cands = self._item_neighbours([item_id], n, expr, [], self.similar_space)
        for model in self.learned:
            rows = self.store.get(f"{self.cfg.collection}_{model}_items", [item_id], with_vectors=True)
            if rows:
                cands += self._learned_items(model, np.asarray(rows[0]["vector"]), n, expr, [item_id], item_id)
        return Retrieval("similar", self._attach(merge_candidates([cands])))

    def bought_together(self, item_id: str, n: int, expr: str | None = None) -> Retrieval:
        self._require_item(item_id)
        cands = self._rules([item_id], n, [])
        if self.rules is not None and len(cands) < n:  # then items bought in the same baskets
            for r in self.rules.recommend([item_id], n, exclude=[c.item_id for c in cands]):
                if r.lift is None and r.because:
                    c = Candidate(r.item_id)
                    c.add("rules", 1.0, {"source": "cooccurrence", "because": list(r.because), "rule": r.reason})
                    cands.append(c)
        return Retrieval("bought_together", self._attach(cands[:n]))

    async def search(self, query: str, n: int, expr: str | None = None) -> Retrieval:
        if self.text_encoder is None:
            raise NotFoundError("text search is not configured (no text encoder)")
        vector = await self.text_encoder.encode.remote(query)
        hits = self._search(self.content, np.asarray(vector)[None, :], n, expr, [])[0]
        return Retrieval("search", self._attach([_cand(h, "text", {"source": "text", "query": query,
                                                                   "score": round(h.score, 4)}) for h in hits]))

    def for_user(self, user_id: str, n: int, expr: str | None = None, segment: str | None = None,
                 exclude_seen: bool = True) -> Retrieval:
        t0 = time.perf_counter()
        session: Session | None = self.sessions.get(user_id)
        seen = list(dict.fromkeys([*(session.seen if session else ()), *self.history.seen.get(user_id, ())]))
        recent = list(dict.fromkeys([*(session.recent if session else ()), *self.history.recent.get(user_id, ())]))
        seeds = recent[:self.cfg.recent_items]
        exclude = seen if exclude_seen else []
        segment = segment or self.history.segments.get(user_id)
        lists: list[list[Candidate]] = []
        profile = self._user_vector(self.profiles, user_id) if self.has_profiles else None
        learned = {m: self._user_vector(f"{self.cfg.collection}_{m}_users", user_id) for m in self.learned}
        if profile is not None or any(v is not None for v in learned.values()) or self.history.knows(user_id):
            strategy = "personal"
        elif session is not None and session.vector is not None:
            strategy = "session"
        else:
            strategy = "popular"
        if profile is not None:
            hits = self._search(self.content, profile[None, :], n, expr, exclude)[0]
            lists.append([_cand(h, "profile", {"source": "profile", "score": round(h.score, 4)}) for h in hits])
        for model, vector in learned.items():
            if vector is not None:
                lists.append(self._learned_items(model, vector, n, expr, exclude))
        if session is not None and session.vector is not None:
            hits = self._search(self.content, session.vector[None, :], n, expr, exclude)[0]
            lists.append([_cand(h, "session", {"source": "session", "events": session.n_events,
                                               "score": round(h.score, 4)}) for h in hits])
        lists.append(self._item_neighbours(seeds, max(n // max(len(seeds), 1), 10), expr, exclude, self.content))
        lists.append(self._rules(seeds, n, exclude))
        lists.append(self._popular(segment, n, set(exclude)))
        cands = self._attach(merge_candidates(lists))
        log.debug("retrieved %d candidates for %s (%s) in %.1f ms", len(cands), user_id, strategy,
                  (time.perf_counter() - t0) * 1e3)
        if profile is None and session is not None and session.vector is not None:
            profile = session.vector
        return Retrieval(strategy, cands, seen=seen, recent=recent, context=self._context(user_id, session, profile),
                         segment=segment)

    def _context(self, user_id: str, session: Session | None, profile: np.ndarray | None) -> UserContext:
        """Category and brand affinity and price level over the user's positive history (and live session)."""
        offline = self.user_events.get(user_id)
        live = list(session.recent) if session is not None else []
        if not live:
            if user_id not in self._contexts:
                frame = offline if offline is not None else pd.DataFrame(columns=["item_id", "event"])
                self._contexts[user_id] = user_context(frame, self.fields_by_id)
            return dataclasses.replace(self._contexts[user_id], profile=profile)
        frame = pd.DataFrame({"item_id": live, "event": "view", "button": None, "value": None})
        if offline is not None:
            frame = pd.concat([offline[frame.columns], frame], ignore_index=True)
        return user_context(frame, self.fields_by_id, profile)

    def _user_vector(self, name: str, user_id: str) -> np.ndarray | None:
        rows = self.store.get(name, [user_id], with_vectors=True)
        return np.asarray(rows[0]["vector"], dtype=np.float32) if rows else None

    def item_fields(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Fields of items by id (for pinned items that retrieval did not bring)."""
        return {r["item_id"]: {k: r.get(k) for k in SHOWN_FIELDS} for r in self.store.get(self.content, ids)}

    def item_vectors(self, ids: list[str]) -> dict[str, np.ndarray]:
        """Content vectors by id (the events sink folds them into session vectors)."""
        return {r["item_id"]: np.asarray(r["vector"], dtype=np.float32)
                for r in self.store.get(self.content, ids, with_vectors=True)}


def _cand(hit: Hit, source: str, reason: dict[str, Any]) -> Candidate:
    c = Candidate(hit.item_id)
    c.add(source, float(hit.score), reason)
    return c

