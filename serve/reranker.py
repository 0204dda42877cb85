"""Reranker deployment: the learned ranking model over the retriever's candidates, then diversity (MMR).

Personal recommendations (strategies personal, session, popular) are ordered by the model that
``vitrine train ranker`` published (``common.ranking.Ranker``; a newer one is swapped in within
``artifacts_check_s`` of its publication), scored in batches across concurrent requests;
item and query endpoints keep their own source's order (similarity, rule lift, text match). Every result keeps
the reasons the retriever gave and gains its model score.
"""
from __future__ import annotations

import logging

import numpy as np
from ray import serve

from common.artifacts import ArtifactStore, LatestArtifact
from common.business_rules import Ranked
from common.item_table import ItemTable, watch_snapshots
from common.ranking import KIND, ItemStats, Ranker, feature_matrix, load_latest_ranker, mmr
from serve.config import ServeConfig
from serve.messages import Ranking, Retrieval, load_in_replica

log = logging.getLogger(__name__)

PERSONAL = ("personal", "session", "popular")
DIVERSE_HEAD = 30  # at least this many results are picked by MMR, however small k (the filter may drop some)
PRIMARY = {"similar": ("item", "learned"), "bought_together": ("rules",), "search": ("text",)}


@serve.deployment
class Reranker:
    def __init__(self, cfg: ServeConfig) -> None:
        load_in_replica(self)
        self.cfg = cfg
        self.published: LatestArtifact[Ranker] | None = None  # "latest": newer rankers are swapped in as published
        if cfg.ranker == "none":
            log.warning("ranker=none: personal recommendations are ordered by summed source scores, not a model")
            self._pinned: Ranker | None = None
        elif cfg.ranker == "latest":
            self._pinned = None
            artifacts = ArtifactStore(cfg.artifacts_uri)
            self.published = LatestArtifact(artifacts, KIND, cfg.collection,
                                            lambda v: Ranker.load(artifacts.path(KIND, cfg.collection, v)),
                                            cfg.artifacts_check_s)
            if self.published.value is None:
                load_latest_ranker(cfg.artifacts_uri, cfg.collection)  # raises NotFoundError naming the fix
        else:
            self._pinned = load_latest_ranker(cfg.artifacts_uri, cfg.collection, cfg.ranker)
        # Popularity and recency features come with each personal retrieval: the Retriever reads the event history
        # (and again when the event log changed), so the two stages rank with one version of it.
        self.tables = watch_snapshots(cfg.artifacts_uri, cfg.collection, cfg.kind, cfg.artifacts_check_s)  # re-embeds

    @property
    def table(self) -> ItemTable:  # vectors and fields of the latest snapshot
        return self.tables.value

    @property
    def ranker(self) -> Ranker | None:
        return self.published.value if self.published is not None else self._pinned

    def ready(self) -> dict:
        ranker = self.ranker
        return {"ranker": ranker.identity if ranker else "none"}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _predict(self, work: list[tuple[Ranker, np.ndarray]]) -> list[np.ndarray]:
        """Scores of each request's feature block, by the ranker that built it (a newer one may have been swapped
        in since): one model call per ranker in the batch."""
        out: list[np.ndarray | None] = [None] * len(work)
        for ranker in {id(r): r for r, _ in work}.values():
            mine = [i for i, (r, _) in enumerate(work) if r is ranker]
            blocks = [work[i][1] for i in mine]
            sizes = [len(b) for b in blocks]
            scores = ranker.score(np.concatenate(blocks)) if sum(sizes) else np.zeros(0, np.float32)
            for i, part in zip(mine, np.split(scores, np.cumsum(sizes)[:-1])):
                out[i] = part
        return out

    async def rank(self, found: Retrieval, k: int | None = None) -> Ranking:
        """All candidates, best first (the business filter cuts to ``k`` after its rules). Diversity (MMR) picks
        the head of the list, ``max(DIVERSE_HEAD, 3 k)`` items (all when ``k`` is None); the rest follow by score."""
        cands = found.candidates
        out = Ranking(found.strategy, [], seen=found.seen, segment=found.segment, pinned_fields=found.pinned_fields)
        if not cands:
            return out
        for c in cands:
            if c.vector is None:
                c.vector = self.table.vector(c.item_id)
        if found.strategy in PERSONAL:
            ranker = self.ranker
            if ranker is not None:
                stats = found.stats
                if stats is None:  # from a retriever that predates stats in the message (during a rolling update)
                    log.warning("a personal retrieval came without item stats: popularity and recency count as 0")
                    stats = ItemStats({}, {})
                scores = await self._predict((ranker, feature_matrix(cands, found.context, stats,
                                                                     features=ranker.features)))
                model = ranker.identity
            else:
                scores, model = _summed(cands), "summed-scores"
            lam = self.cfg.diversity
        else:
            sources = PRIMARY[found.strategy]
            scores = np.array([max(c.scores.get(s, -np.inf) for s in sources) for c in cands], dtype=np.float32)
            model, lam = None, 1.0
        vectors = np.stack([c.vector for c in cands]) if all(c.vector is not None for c in cands) else None
        top = None if k is None else max(DIVERSE_HEAD, 3 * int(k))
        order = mmr(np.asarray(scores, dtype=np.float32), vectors, k=len(cands), lam=lam, top=top)
        for i in order:
            c = cands[int(i)]
            reasons = list(c.reasons)
            if model:
                reasons.append({"source": "ranker", "model": model, "score": round(float(scores[i]), 4)})
            out.items.append(Ranked(c.item_id, float(scores[i]), dict(c.fields), reasons))
        return out


def _summed(cands) -> np.ndarray:
    """Per-source min-max scores summed (the documented fallback when no ranker is configured)."""
    sources = sorted({s for c in cands for s in c.scores})
    total = np.zeros(len(cands), dtype=np.float32)
    for s in sources:
        col = np.array([c.scores.get(s, np.nan) for c in cands], dtype=np.float32)
        lo, hi = np.nanmin(col), np.nanmax(col)
        total += np.nan_to_num((col - lo) / (hi - lo) if hi > lo else np.ones_like(col), nan=0.0)
    return total
