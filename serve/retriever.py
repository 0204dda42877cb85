"""Retriever deployment: candidates from every source through the vector store, with the reasons they came.

Sources (``common.ranking.SOURCES``): ``item`` (nearest items to a seed item or to the user's latest items),
``learned`` (two-tower / GraphSAGE user and item vectors, when those jobs have published), ``profile`` (the
user's mean-embedding profile), ``session`` (the live session vector that POST /events updates), ``text`` (a
query through the text tower), ``rules`` (frequently bought together) and ``popular`` (by segment when known).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from common.artifacts import ArtifactStore, LatestArtifact
from common.catalog import read_table
from common.errors import NotFoundError
from common.event_log import History
from common.events import EventWeights
from common.item_index import collection_name
from common.item_table import ItemTable, watch_snapshots
from common.ranking import AffinitySums, Candidate, ItemStats, UserContext, affinity_sums, merge_candidates
from common.refresher import Refresher
from common.rules import BoughtTogether
from common.session_store import Session, SessionStore
from common.ttl_cache import TtlRows
from common.user_history import UserHistory
from common.vector_store import Hit, open_store
from serve.config import ServeConfig
from serve.learned import LearnedModels, LearnedVectors
from serve.messages import Retrieval, load_in_replica

log = logging.getLogger(__name__)

SHOWN_FIELDS = ("title", "category", "brand", "color", "price", "in_stock")
PROFILE_KIND = "fused"  # the profiles job writes <collection>_users_<kind>

FRESH_READ_WARN_MS = 100.0  # a fresh session read slower than this at start-up gets a warning (see ServeConfig)


def sessions_collection(base: str) -> str:
    return f"{base}_sessions"


@dataclass(frozen=True)
class Known:
    """What the event history (offline file + event log) says, swapped in whole when it is read again."""

    history: UserHistory
    stats: ItemStats
    affinity: Mapping[str, AffinitySums]
    events: int  # events read


@serve.deployment
class Retriever:
    def __init__(self, cfg: ServeConfig, text_encoder: DeploymentHandle | None = None) -> None:
        load_in_replica(self)
        self.cfg = cfg
        self.store = open_store(cfg.store_uri, connect_timeout=cfg.store_timeout_s,
                                call_timeout=cfg.store_timeout_s, search_ef=cfg.search_ef)
        self.text_encoder = text_encoder
        self.content = collection_name(cfg.collection, cfg.kind)
        self.similar_space = collection_name(cfg.collection, cfg.similar_kind)
        spec = self.store.describe(self.content)  # NotFoundError when the catalogue was never embedded
        self.sessions = SessionStore(self.store, sessions_collection(cfg.collection), dim=spec.dim, model=spec.model,
                                     gap_seconds=cfg.session_gap_s)
        self.fresh_read_ms = self._probe_fresh_reads() if cfg.fresh_sessions else None
        self.tables = watch_snapshots(cfg.artifacts_uri, cfg.collection, cfg.kind, cfg.artifacts_check_s)  # re-embeds
        self.users = read_table(cfg.users).to_pandas() if cfg.users else None
        # What the event history says (seen items, latest items, segments, popularity, affinities), read again in
        # the background whenever the event log changed, at most every history_refresh_s.
        self.history_source = History(cfg.events, cfg.event_log)
        self.known = Refresher(self.history_source.signature, self._read_history, cfg.history_refresh_s,
                               "retriever history")
        self.view_weight = EventWeights().events["view"]
        self.published_rules = self._watch_rules()
        self.learned = LearnedModels(self.store, cfg.collection, check_s=cfg.learned_check_s)
        self.profiles = f"{cfg.collection}_users_{PROFILE_KIND}"
        self.has_profiles = self.store.has_collection(self.profiles)
        self.item_fields = TtlRows(cfg.fields_ttl_s)  # rules / popular / pinned candidates' current fields
        self.user_vectors = TtlRows(cfg.user_vector_ttl_s)  # (collection, user id) -> offline vector or None
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="retriever-io")
        log.info("retriever ready: %d items, %d known users, rules=%s, learned=%s, profiles=%s", len(self.table.ids),
                 len(self.history.seen), self.published_rules.version, [v.model for v in self.learned.current()],
                 self.has_profiles)

    # ---- start-up -------------------------------------------------------------------------------------------
    def _read_history(self, _signature: object = None) -> Known:
        events = self.history_source.read()
        if events is None:
            log.warning("no events file and an empty event log: no history, popularity from nothing")
            return Known(UserHistory(), ItemStats({}, {}), {}, 0)
        # The ranker's features are computed as in training (jobs/train_ranker): popularity from ItemStats and
        # affinities from the user's whole positive history (common.ranking.user_context, here as per-user sums
        # computed for every known user at once, to which a live session's views are added per request).
        return Known(UserHistory.from_events(events, self.users), ItemStats.from_events(events),
                     affinity_sums(events, self.table.fields), len(events))

    @property
    def table(self) -> ItemTable:  # vectors and fields of the latest snapshot
        return self.tables.value

    @property
    def history(self) -> UserHistory:
        return self.known.value.history

    @property
    def stats(self) -> ItemStats:
        return self.known.value.stats

    @property
    def affinity(self) -> Mapping[str, AffinitySums]:
        return self.known.value.affinity

    def _watch_rules(self) -> LatestArtifact[BoughtTogether]:
        """The latest published rules, swapped for newer ones as ``vitrine rules`` publishes them."""
        artifacts = ArtifactStore(self.cfg.artifacts_uri)
        rules = LatestArtifact(artifacts, "rules", self.cfg.collection,
                               lambda version: BoughtTogether.load(artifacts.path("rules", self.cfg.collection,
                                                                                  version)),
                               self.cfg.artifacts_check_s)
        if rules.value is None:
            log.warning("no published rules for %r: bought-together has nothing to answer until `vitrine rules` "
                        "publishes some (looked for every %s s)", self.cfg.collection, self.cfg.artifacts_check_s)
        return rules

    @property
    def rules(self) -> BoughtTogether | None:
        return self.published_rules.value

    async def ready(self) -> dict[str, Any]:
        """What this stage serves; the text encoder's too, so that the service is ready only once search is."""
        state = await asyncio.get_running_loop().run_in_executor(self._pool, self._state)
        if self.text_encoder is not None:
            state["text_encoder"] = await self.text_encoder.ready.remote()
        return state

    def _state(self) -> dict[str, Any]:
        items = self.store.count(self.content)  # raises StoreUnavailableError when Milvus is down
        return {"items": items, "users": len(self.history.seen), "rules": self.published_rules.version,
                "history": {"events": self.known.value.events, "refreshes": self.known.refreshes},
                "learned": {v.model: v.version for v in self.learned.current()}, "profiles": self.has_profiles,
                "snapshot": self.table.version,
                "caches": {"item_fields": self.item_fields.stats(), "user_vectors": self.user_vectors.stats()},
                "fresh_session_read_ms": self.fresh_read_ms,  # measured at start-up (None: fresh_sessions off)
                "stale_session_reads": self.store.stale_reads}  # fresh session reads that timed out (lagging Milvus)

    # ---- helpers ----------------------------------------------------------------------------------------------

    def _probe_fresh_reads(self) -> float:
        """The median wait of a fresh session read (ms), measured once; a loud warning when the server's time tick
        makes every recommendation wait long for it."""
        waits = []
        for _ in range(3):
            t = time.perf_counter()
            self.sessions.get("__vitrine_probe__", fresh=True)  # no such user: the wait is all it measures
            waits.append((time.perf_counter() - t) * 1e3)
        median = float(np.median(waits))
        if median > FRESH_READ_WARN_MS:
            log.warning("a fresh session read waits %.0f ms at %s (Milvus' time tick; 200 ms by default): every "
                        "recommendation pays it. Set proxy.timeTickInterval to 20 on the server, or fresh_sessions: "
                        "false (sessions may then lag by up to a tick)", median, self.cfg.store_uri)
        return round(median, 1)

    def _search(self, name: str, vectors: np.ndarray, n: int, expr: str | None, exclude: list[str]) -> list[list[Hit]]:
        return self.store.search(name, np.asarray(vectors, dtype=np.float32).reshape(len(vectors), -1), k=n,
                                 filter=expr, exclude_ids=exclude)

    def _fields(self, ids: list[str]) -> dict[str, dict | None]:
        """Current shown fields of ``ids`` (None: not in the catalogue), read from the store at most every
        ``fields_ttl_s`` per item."""
        def fetch(missing: list[str]) -> dict[str, dict]:
            return {r["item_id"]: {k: r.get(k) for k in SHOWN_FIELDS} for r in self.store.get(self.content, missing)}

        return self.item_fields.get_many(ids, fetch)

    def _attach(self, cands: list[Candidate], fresh: set[str] = frozenset()) -> list[Candidate]:
        """Fields for candidates that did not come from a search of the content collection (one read, no
        vectors, reused for ``fields_ttl_s``); items gone from the catalogue are dropped."""
        missing = [c.item_id for c in cands if c.item_id not in fresh]
        rows = self._fields(missing) if missing else {}
        kept = []
        for c in cands:
            if c.item_id not in fresh:
                if rows.get(c.item_id) is None:
                    continue
                c.fields = dict(rows[c.item_id])
            kept.append(c)
        return kept

    def _require_item(self, item_id: str) -> None:
        if item_id not in self.table.index and not self.store.get(self.content, [item_id]):
            raise NotFoundError(f"unknown item_id {item_id!r}")

    def _hits(self, hits: list[Hit], source: str, reason: dict[str, Any], out: dict[str, Candidate]) -> None:
        for h in hits:
            c = out.get(h.item_id)
            if c is None:
                c = out[h.item_id] = Candidate(h.item_id, fields={k: h.fields.get(k) for k in SHOWN_FIELDS})
            c.add(source, float(h.score), {**reason, "score": round(float(h.score), 4)})

    def _learned_items(self, learned: LearnedVectors, vector: np.ndarray, n: int, expr: str | None,
                       exclude: list[str], because: str | None = None) -> list[Candidate]:
        # The filter is the catalogue's (stock, price, category): learned vectors are filtered by it as it is now.
        hits = self._learned_read(self.store.search_where, learned.items, vector[None, :], n, expr, self.content,
                                  exclude)
        return [_cand(h, "learned", {"source": "learned", "model": learned.model, "score": round(h.score, 4),
                                     **({"because": because} if because else {})}) for h in (hits or [[]])[0]]

    def _learned_read(self, read, *args):
        """``read(*args)`` on a learned model's versioned collection; None when that version is gone (a retraining
        moved on and dropped it): the model sits out this request and its version is resolved again."""
        try:
            return read(*args)
        except NotFoundError as e:
            log.info("learned vectors moved on (%s); resolving their version again", e)
            self.learned.invalidate()
            return None

    def _rules(self, seeds: list[str], n: int, exclude: list[str]) -> list[Candidate]:
        rules = self.rules
        if rules is None or not seeds:
            return []
        out = []
        for r in rules.recommend(seeds, n, exclude=exclude):
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

    def _pinned(self, pinned: list[str] | tuple[str, ...]) -> dict[str, dict]:
        if not pinned:
            return {}
        return {i: dict(row) for i, row in self._fields(list(pinned)).items() if row is not None}

    # ---- endpoints ----------------------------------------------------------------------------------------------
    def similar(self, item_id: str, n: int, expr: str | None = None) -> Retrieval:
        rows = self.store.get(self.similar_space, [item_id], with_vectors=True)
        if not rows:
            raise NotFoundError(f"unknown item_id {item_id!r}")
        out: dict[str, Candidate] = {}
        self._hits(self._search(self.similar_space, np.asarray(rows[0]["vector"])[None, :], n, expr, [item_id])[0],
                   "item", {"source": "item", "because": item_id}, out)
        cands = list(out.values())
        for learned in self.learned.current():
            found = self._learned_read(self.store.get, learned.items, [item_id], True)
            if found:
                cands += self._learned_items(learned, np.asarray(found[0]["vector"]), n, expr, [item_id], item_id)
        return Retrieval("similar", self._attach(merge_candidates([cands]), fresh=set(out)))

    def bought_together(self, item_id: str, n: int, expr: str | None = None) -> Retrieval:
        """Rules first (by confidence, then lift), then items of the same baskets, then popular items: the
        order of ``BoughtTogether.recommend``, whose score ranks the three kinds; each reason says which."""
        self._require_item(item_id)
        cands = []
        rules = self.rules
        for r in (rules.recommend([item_id], n) if rules is not None else []):
            c = Candidate(r.item_id)
            if r.lift is not None:
                reason = {"source": "rules", "because": list(r.because), "lift": round(r.lift, 3), "rule": r.reason}
            elif r.because:
                reason = {"source": "cooccurrence", "because": list(r.because), "rule": r.reason}
            else:
                reason = {"source": "popular", "fallback": "no rule or shared basket", "rule": r.reason}
            c.add("rules", r.score, reason)
            cands.append(c)
        return Retrieval("bought_together", self._attach(cands))

    async def search(self, query: str, n: int, expr: str | None = None) -> Retrieval:
        if self.text_encoder is None:
            raise NotFoundError("text search is not configured (no text encoder)")
        vector = await self.text_encoder.encode.remote(query)
        out: dict[str, Candidate] = {}
        self._hits(self._search(self.content, np.asarray(vector)[None, :], n, expr, [])[0], "text",
                   {"source": "text", "query": query}, out)
        return Retrieval("search", list(out.values()))

    def for_user(self, user_id: str, n: int, expr: str | None = None, segment: str | None = None,
                 exclude_seen: bool = True, pinned: tuple[str, ...] = ()) -> Retrieval:
        """Candidates for a user from every source. Store round trips: the user's session and (cached) offline
        vectors in parallel; then, in parallel, one batched search for profile + session and one for the seed
        items; one (cached) read of the fields of candidates that came from memory (rules, popular)."""
        t0 = time.perf_counter()
        session_f = self._pool.submit(self.sessions.get, user_id, self.cfg.fresh_sessions)
        profile_f = self._pool.submit(self._user_vector, self.profiles, user_id) if self.has_profiles else None
        learned_f = {v: self._pool.submit(self._learned_read, self._user_vector, v.users, user_id)
                     for v in self.learned.current()}
        pinned_f = self._pool.submit(self._pinned, pinned) if pinned else None
        session: Session | None = session_f.result()
        profile = profile_f.result() if profile_f is not None else None
        learned = {m: f.result() for m, f in learned_f.items()}
        seen = list(dict.fromkeys([*(session.seen if session else ()), *self.history.seen.get(user_id, ())]))
        recent = list(dict.fromkeys([*(session.recent if session else ()), *self.history.recent.get(user_id, ())]))
        exclude = seen if exclude_seen else []
        segment = segment or self.history.segments.get(user_id)
        live = session is not None and session.vector is not None
        if profile is not None or any(v is not None for v in learned.values()) or self.history.knows(user_id):
            strategy = "personal"
        else:
            strategy = "session" if live else "popular"
        seeds, seed_vectors = self.table.lookup(recent[:self.cfg.recent_items])
        queries, kinds = [], []
        if profile is not None:
            queries.append(profile), kinds.append(("profile", {"source": "profile"}))
        if live:
            queries.append(session.vector)
            kinds.append(("session", {"source": "session", "events": session.n_events}))
        learned_f = {m: self._pool.submit(self._learned_items, m, v, n, expr, exclude)
                     for m, v in learned.items() if v is not None}  # m: the model's vectors of one training
        # Each seed item contributes its nearest few, so the seeds are searched for that few (a narrower beam and
        # fewer hits to decode than the user's own vectors need), beside the user's search.
        per_seed = max(n // max(len(seeds), 1), 10)
        seeds_f = self._pool.submit(self._search, self.content, seed_vectors, per_seed, expr, exclude + seeds) \
            if seeds else None
        found: dict[str, Candidate] = {}
        if queries:
            for (source, reason), h in zip(kinds, self._search(self.content, np.stack(queries), n, expr,
                                                                 exclude + seeds)):
                self._hits(h, source, reason, found)
        for seed, h in zip(seeds, seeds_f.result() if seeds_f is not None else ()):
            self._hits(h, "item", {"source": "item", "because": seed}, found)
        lists = [list(found.values()), *(f.result() for f in learned_f.values()), self._rules(seeds, n, exclude),
                 self._popular(segment, n, set(exclude))]
        cands = self._attach(merge_candidates(lists), fresh=set(found))
        if profile is None and live:
            profile = session.vector
        log.debug("retrieved %d candidates for %s (%s) in %.1f ms", len(cands), user_id, strategy,
                  (time.perf_counter() - t0) * 1e3)
        return Retrieval(strategy, cands, seen=seen, context=self._context(user_id, session, profile),
                         segment=segment, pinned_fields=pinned_f.result() if pinned_f is not None else {},
                         stats=self.stats.only(c.item_id for c in cands))

    def _context(self, user_id: str, session: Session | None, profile: np.ndarray | None) -> UserContext:
        """Category and brand affinity and price level over the user's positive history (and live session, whose
        items count as views, as the ranker's training rows would see them)."""
        sums = self.affinity.get(user_id, AffinitySums())
        live = list(session.recent) if session is not None else []
        return (sums.plus(live, self.table.fields, self.view_weight) if live else sums).context(profile)

    def _user_vector(self, name: str, user_id: str) -> np.ndarray | None:
        """An offline user vector (the profiles and training jobs write them), reused for ``user_vector_ttl_s``."""
        def fetch(keys: list[tuple[str, str]]) -> dict[tuple[str, str], np.ndarray]:
            rows = self.store.get(name, [user_id], with_vectors=True)
            return {(name, user_id): np.asarray(rows[0]["vector"], dtype=np.float32)} if rows else {}

        return self.user_vectors.get((name, user_id), fetch)


def _cand(hit: Hit, source: str, reason: dict[str, Any]) -> Candidate:
    c = Candidate(hit.item_id, fields={k: hit.fields.get(k) for k in SHOWN_FIELDS})
    c.add(source, float(hit.score), reason)
    return c
