"""Reranker deployment: the learned ranking model over the retriever's candidates, then diversity (MMR).

Personal recommendations (strategies personal, session, popular) are ordered by the model that
``vitrine train ranker`` published (``common.ranking.Ranker``), scored in batches across concurrent requests;
item and query endpoints keep their own source's order (similarity, rule lift, text match). Every result keeps
the reasons the retriever gave and gains its model score.
"""
from __future__ import annotations

import logging

import numpy as np
from ray import serve

from common.business_rules import Ranked
from common.event_log import read_history
from common.item_table import ItemTable
from common.ranking import ItemStats, feature_matrix, load_latest_ranker, mmr
from serve.config import ServeConfig
from serve.messages import Ranking, Retrieval

log = logging.getLogger(__name__)

PERSONAL = ("personal", "session", "popular")
DIVERSE_HEAD = 30  # at least this many results are picked by MMR, however small k (the filter may drop some)
PRIMARY = {"similar": ("item", "learned"), "bought_together": ("rules",), "search": ("text",)}


@serve.deployment
class Reranker:
    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        if cfg.ranker == "none":
            log.warning("ranker=none: personal recommendations are ordered by summed source scores, not a model")
            self.ranker = None
        else:
            self.ranker = load_latest_ranker(cfg.artifacts_uri, cfg.collection,
                                             None if cfg.ranker == "latest" else cfg.ranker)
        events = read_history(cfg.events, cfg.event_log)  # the retriever's popularity source too
        self.stats = ItemStats.from_events(events) if events is not None else ItemStats({}, {})
        self.table = ItemTable.load(cfg.artifacts_uri, cfg.collection, cfg.kind)  # vectors for MMR and features

    def ready(self) -> dict:
        return {"ranker": self.ranker.identity if self.ranker else "none"}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _predict(self, blocks: list[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(b) for b in blocks]
        scores = self.ranker.score(np.concatenate(blocks)) if sum(sizes) else np.zeros(0, np.float32)
        return list(np.split(scores, np.cumsum(sizes)[:-1]))

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
            if self.ranker is not None:
                scores = await self._predict(feature_matrix(cands, found.context, self.stats,
                                                            features=self.ranker.features))
                model = self.ranker.identity
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
