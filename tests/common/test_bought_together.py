"""Harness adapters for bought-together: rules from training baskets, buy-again, and their tuned blend."""
from __future__ import annotations

import numpy as np
import pandas as pd

from common.events import validate_events
from common.interactions import TrainData, build_interactions
from common.recommenders.base import top_k
from common.recommenders.bought_together import BasketCompletion, BuyAgain, RulesRecommender
from common.rules import RulesConfig


def _orders(rows) -> TrainData:
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "order_id"]).assign(event="purchase")
    ev = validate_events(df).valid
    return TrainData(build_interactions(ev), ev)


def _pairs_and_habits() -> list[tuple]:
    """Every order holds a complementary pair (a, a+1) and the shopper's habitual item h_u."""
    rng = np.random.default_rng(0)
    rows, t = [], 0
    for u in range(12):
        for o in range(5):
            a = int(rng.integers(0, 6)) * 2
            for item in (f"p{a}", f"p{a + 1}", f"h{u}"):
                rows.append((f"u{u}", item, t, f"o{u}-{o}"))
                t += 1
    return rows


def test_rules_rank_the_partner_of_a_pair_first():
    data = _orders(_pairs_and_habits())
    rec = RulesRecommender(RulesConfig(min_support=0.05, min_confidence=0.5)).fit(data)
    idx = data.interactions.item_index
    s = rec.item_scores(np.array([idx["p4"]]))
    assert top_k(s, 1)[0, 0] == idx["p5"] and s[0, idx["p4"]] == -1.0


def test_buy_again_ranks_the_shoppers_own_items():
    data = _orders(_pairs_and_habits())
    idx = data.interactions.item_index
    again = BuyAgain().fit(data)
    s = again.item_scores(np.array([idx["p0"]]), users=np.array([data.interactions.user_index["u3"]]))
    assert top_k(s, 1)[0, 0] == idx["h3"]


def test_basket_completion_learns_to_weigh_history_on_validation_only():
    data = _orders(_pairs_and_habits())
    model = BasketCompletion(grid=(0.0, 1.0), cfg=RulesConfig(min_support=0.05, min_confidence=0.5)).fit(data)
    assert model.alpha == 1.0  # the habit item joins the partner at the top only with history weighed in
    idx, users = data.interactions.item_index, data.interactions.user_index
    top = top_k(model.item_scores(np.array([idx["p2"]]), users=np.array([users["u5"]])), 2)[0]
    assert set(top) == {idx["p3"], idx["h5"]}
