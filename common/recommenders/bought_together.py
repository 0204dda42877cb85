"""The mined bought-together rules (with their co-occurrence and popularity fallback) as a harness model."""
from __future__ import annotations

import numpy as np

from common.interactions import TrainData, build_interactions, last_basket_split
from common.rules import BoughtTogether, RulesConfig, baskets_from_events, mine_rules


class RulesRecommender:
    """Mines FP-Growth rules from the training baskets; ranks rules, then co-occurrence, then popularity."""

    def __init__(self, cfg: RulesConfig | None = None, max_neighbours: int = 200):
        self.cfg = cfg or RulesConfig()  # mining thresholds and memory bounds
        self.max_neighbours = max_neighbours  # co-occurrence neighbours kept per item for the fallback
        self.name = "rules"

    def fit(self, data: TrainData) -> RulesRecommender:
        baskets = baskets_from_events(data.events, self.cfg.basket_source)
        mined = mine_rules(baskets, self.cfg)
        self.model = BoughtTogether.from_baskets(baskets, mined.rules, self.max_neighbours)
        self.items = data.interactions.items
        return self

    def item_scores(self, items: np.ndarray) -> np.ndarray:
        return self.model.scores(self.items[items], self.items).astype(np.float32)


class BuyAgain:
    """The shopper's own purchase history (how often they liked each item), popularity breaking ties.

    A personal model: its scores ignore the query item. On grocery data (Instacart) reorders dominate baskets,
    so this is the baseline a basket-completion model has to be held against.
    """

    personal = True

    def __init__(self) -> None:
        self.name = "buy-again"

    def fit(self, data: TrainData) -> BuyAgain:
        self.history = data.interactions.positives.multiply(data.interactions.matrix).tocsr()
        pop = data.interactions.item_popularity()
        self.tiebreak = (pop / (pop.max() + 1) * 1e-3).astype(np.float32)
        return self

    def item_scores(self, items: np.ndarray, users: np.ndarray) -> np.ndarray:
        h = self.history[users].toarray().astype(np.float32)
        return h / (h.max(axis=1, keepdims=True) + 1e-9) + self.tiebreak


class BasketCompletion:
    """Bought-together rules plus the shopper's own history: ``rules + alpha * buy_again``.

    ``alpha`` is chosen by NDCG@10 on a validation split of the training events only (each user's last training order
    against the query protocol), from ``grid``; then both parts are refitted on all training events.
    """

    personal = True

    def __init__(self, grid: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0), cfg: RulesConfig | None = None):
        self.grid, self.cfg = grid, cfg  # alpha candidates; rule-mining settings
        self.name = "rules+history"

    def fit(self, data: TrainData) -> BasketCompletion:
        from common.evaluation import basket_queries  # lazy: common.evaluation imports the recommenders' base
        from common.metrics import rank_metrics
        from common.recommenders.base import top_k

        inter = data.interactions
        inner_train, inner_val = last_basket_split(data.events)
        inner = TrainData(build_interactions(inner_train, None, inter.users, inter.items), inner_train)
        queries = basket_queries(inner_val, inner.interactions)
        rules, again = RulesRecommender(self.cfg).fit(inner), BuyAgain().fit(inner)
        r, h = rules.item_scores(queries.query), again.item_scores(queries.query, queries.users)
        r[np.arange(len(r)), queries.query] = -np.inf
        ndcg = {a: rank_metrics(top_k(r + a * h, 10), queries.truth, (10,))["ndcg@10"] for a in self.grid}
        self.alpha = max(self.grid, key=lambda a: (ndcg[a], -a))
        self.validation_ndcg = ndcg[self.alpha]
        self.rules, self.again = RulesRecommender(self.cfg).fit(data), BuyAgain().fit(data)
        return self

    def item_scores(self, items: np.ndarray, users: np.ndarray) -> np.ndarray:
        return self.rules.item_scores(items) + self.alpha * self.again.item_scores(items, users)
