"""Rules mining against mlxtend's Apriori, the bounds (pruning, caps, memory), and the BoughtTogether scorer."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from mlxtend.frequent_patterns import apriori, association_rules

from common.errors import ConfigError
from common.events import validate_events
from common.rules import (
    BasketTableTooLargeError,
    BoughtTogether,
    RulesConfig,
    basket_matrix,
    baskets_from_events,
    mine_rules,
    one_hot,
    support_count,
)


def random_baskets(seed: int, n: int = 160, n_items: int = 14) -> list[list[str]]:
    """Skewed item popularity plus two planted pairs, so there are frequent pairs and triples."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(n_items) * 0.7)
    baskets = []
    for _ in range(n):
        size = int(rng.integers(1, 6))
        basket = list(rng.choice([f"i{j:02d}" for j in range(n_items)], size=size, replace=False, p=p))
        if rng.random() < 0.3:
            basket += ["p1", "p2"]
        baskets.append(basket)
    return baskets


def as_dict(rules: pd.DataFrame) -> dict:
    return {(frozenset(a), frozenset(c)): (s, conf, lift) for a, c, s, conf, lift in
            zip(rules["antecedents"], rules["consequents"], rules["support"], rules["confidence"], rules["lift"])}


def apriori_rules(baskets, min_support, min_confidence, min_lift, max_len) -> dict:
    """The naive reference: Apriori on the dense table of every item, no pruning, no caps."""
    items = sorted({i for b in baskets for i in b})
    df = one_hot(basket_matrix(baskets, items), items, sparse=False)
    found = apriori(df, min_support=min_support, use_colnames=True, max_len=max_len)
    rules = association_rules(found, num_itemsets=len(baskets), metric="confidence", min_threshold=min_confidence)
    return as_dict(rules[rules["lift"] >= min_lift])


def assert_same_rules(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, values in want.items():
        np.testing.assert_allclose(got[key], values, rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("min_support,max_len", [(0.03, 3), (0.06, 2), (0.02, 4)])
def test_fpgrowth_rules_equal_apriori_rules(seed, sparse, min_support, max_len):
    baskets = random_baskets(seed)
    cfg = RulesConfig(min_support=min_support, min_confidence=0.2, min_lift=0.0, max_len=max_len, min_item_count=1)
    want = apriori_rules(baskets, min_support, 0.2, 0.0, max_len)
    assert len(want) >= 10  # the comparison has rules to compare
    assert_same_rules(as_dict(mine_rules(baskets, cfg, sparse=sparse).rules), want)


def test_sparse_and_dense_paths_give_identical_rules_with_every_bound_active():
    baskets = random_baskets(7, n=300)
    cfg = RulesConfig(min_support=0.02, min_confidence=0.1, min_lift=1.2, max_len=3, min_item_count=12,
                      max_basket_len=4)
    sparse, dense = mine_rules(baskets, cfg, sparse=True), mine_rules(baskets, cfg, sparse=False)
    assert len(sparse.rules) > 0
    pd.testing.assert_frame_equal(sparse.rules, dense.rules)
    assert (sparse.items_kept, sparse.items_pruned, sparse.baskets_truncated) == \
        (dense.items_kept, dense.items_pruned, dense.baskets_truncated)


def test_support_count_matches_aprioris_float_test_where_ceil_does_not():
    assert np.ceil(0.28 * 25) == 8  # the naive count threshold would miss itemsets in exactly 7 of 25 baskets
    assert 7 / 25 >= 0.28 and support_count(0.28, 25) == 7
    assert support_count(0.25, 10) == 3
    assert support_count(1.0, 7) == 7


def test_pruning_at_the_support_count_is_lossless_and_counted():
    baskets = random_baskets(3)
    loose = mine_rules(baskets, RulesConfig(min_support=0.05, min_confidence=0.2, min_item_count=1))
    items = {i for b in baskets for i in b}
    counts = pd.Series([i for b in baskets for i in set(b)]).value_counts()
    rare = int((counts < support_count(0.05, len(baskets))).sum())
    assert rare > 0
    assert loose.items_pruned == rare and loose.items_kept == len(items) - rare
    assert_same_rules(as_dict(loose.rules), apriori_rules(baskets, 0.05, 0.2, 1.0, 3))


def test_min_item_count_above_the_support_count_drops_rules_about_rarer_items():
    baskets = [["a", "b"]] * 3 + [["c", "d"]] * 6 + [["e"]] * 11
    mined = mine_rules(baskets, RulesConfig(min_support=0.1, min_confidence=0.5, min_item_count=4))
    assert as_dict(mined.rules).keys() == {(frozenset("c"), frozenset("d")), (frozenset("d"), frozenset("c"))}
    assert (mined.items_pruned, mined.items_kept, mined.min_count) == (2, 3, 4)
    assert mined.baskets == 20  # pruned items' baskets still count in the support denominator
    assert as_dict(mined.rules)[(frozenset("c"), frozenset("d"))][0] == pytest.approx(6 / 20)


def test_max_len_bounds_rule_length():
    baskets = [["a", "b", "c", "d"]] * 5 + [["a"]] * 5
    for max_len in (2, 3, 4):
        rules = mine_rules(baskets, RulesConfig(min_support=0.2, max_len=max_len)).rules
        sizes = {len(a) + len(c) for a, c in zip(rules["antecedents"], rules["consequents"])}
        assert max(sizes) == max_len


def test_long_baskets_are_truncated_in_event_order_or_skipped_and_counted():
    long = [f"x{j}" for j in range(10)]
    baskets = [long] * 4 + [["x0", "x9"]] * 2 + [["y"]] * 4
    truncated = mine_rules(baskets, RulesConfig(min_support=0.3, max_basket_len=3, long_baskets="truncate"))
    assert (truncated.baskets_truncated, truncated.baskets_skipped, truncated.baskets) == (4, 0, 10)
    kept = {i for a, c in zip(truncated.rules["antecedents"], truncated.rules["consequents"]) for i in a + c}
    assert kept == {"x0", "x1", "x2"}  # the first three of each long basket; x9 was cut from them
    skipped = mine_rules(baskets, RulesConfig(min_support=0.3, max_basket_len=3, long_baskets="skip"))
    assert (skipped.baskets_truncated, skipped.baskets_skipped, skipped.baskets) == (0, 4, 6)
    assert as_dict(skipped.rules)[(frozenset({"x0"}), frozenset({"x9"}))][0] == pytest.approx(2 / 6)


def test_the_memory_bound_raises_before_building_and_names_the_settings():
    baskets = [[f"i{j}", f"i{j + 1}"] for j in range(100)] * 3  # 300 baskets x 101 items
    with pytest.raises(BasketTableTooLargeError) as err:
        mine_rules(baskets, RulesConfig(min_support=0.001, max_table_cells=1000))
    message = str(err.value)
    assert "max_table_cells=1,000" in message and "min_item_count" in message and "on_oversize" in message
    assert isinstance(err.value, ConfigError)


def test_on_oversize_prune_raises_the_item_threshold_loudly(caplog):
    baskets = [["a", "b"]] * 30 + [[f"r{j}", "a"] for j in range(40)]  # a: 70, b: 30, r*: 1 each
    cfg = RulesConfig(min_support=0.001, min_item_count=1, max_table_cells=70 * 2, on_oversize="prune")
    with caplog.at_level(logging.WARNING, logger="common.rules"):
        mined = mine_rules(baskets, cfg)
    assert (mined.items_kept, mined.items_pruned, mined.min_count) == (2, 40, 30)
    rules = as_dict(mined.rules)  # a is in every basket: both rules have lift exactly 1 (min_lift=1 keeps them)
    assert rules.keys() == {(frozenset("b"), frozenset("a")), (frozenset("a"), frozenset("b"))}
    assert rules[(frozenset("a"), frozenset("b"))] == pytest.approx((30 / 70, 30 / 70, 1.0))
    assert any("LOST" in r.message for r in caplog.records)


@pytest.mark.parametrize("field,value", [("min_support", 0.0), ("min_support", 1.5), ("max_len", 1),
                                         ("min_item_count", 0), ("long_baskets", "drop"),
                                         ("basket_source", "carts"), ("max_table_cells", 0)])
def test_config_rejects_bad_values_and_echoes_them(field, value):
    with pytest.raises(ConfigError, match=field) as err:
        RulesConfig(**{field: value})
    assert repr(value) in str(err.value)


def events_frame() -> pd.DataFrame:
    rows = [("u1", "a", "purchase", 100, "s1", "o1"), ("u1", "b", "purchase", 101, "s1", "o1"),
            ("u1", "c", "add_to_bag", 102, "s1", None), ("u1", "d", "view", 103, "s1", None),
            ("u2", "a", "purchase", 200, "s2", "o2"), ("u2", "a", "purchase", 201, "s2", "o2"),
            ("u2", "e", "dislike", 202, "s2", None), ("u2", "f", "wishlist", 203, "s2", None)]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event", "ts", "session_id", "order_id"])


def test_baskets_from_orders_and_from_sessions():
    events = validate_events(events_frame()).valid
    assert baskets_from_events(events, "auto") == [["a", "b"], ["a"]]  # orders exist; duplicates removed
    assert baskets_from_events(events, "session_bag") == [["a", "b", "c"], ["a"]]
    assert baskets_from_events(events, "session_positive") == [["a", "b", "c", "d"], ["a", "f"]]
    no_orders = validate_events(events_frame().assign(order_id=None)).valid
    assert baskets_from_events(no_orders, "auto") == [["a", "b", "c"], ["a"]]


@pytest.fixture()
def scorer() -> BoughtTogether:
    """shoe -> sock is a rule (lift 2.5); hat is only ever bought with scarf, once; pop is popular alone."""
    baskets = [["shoe", "sock"]] * 4 + [["shoe"]] + [["pop"]] * 6 + [["hat", "scarf"]] + [["sock", "pop"]]
    rules = mine_rules(baskets, RulesConfig(min_support=0.2, min_confidence=0.5)).rules
    assert as_dict(rules).keys() == {(frozenset({"shoe"}), frozenset({"sock"})),
                                     (frozenset({"sock"}), frozenset({"shoe"}))}
    return BoughtTogether.from_baskets(baskets, rules)


def test_bought_together_puts_the_rules_consequent_first_with_its_lift(scorer):
    top = scorer.recommend(["shoe"], k=3)
    assert top[0].item_id == "sock"
    # 13 baskets, shoe and sock in 5 each, together in 4: confidence 4/5, lift 0.8 / (5/13) = 2.08
    assert "shoe -> sock" in top[0].reason and "confidence 0.800, lift 2.08" in top[0].reason
    assert [r.item_id for r in top[1:]] == ["pop", "hat"]  # no more partners: popularity, then id order
    assert all(r.reason.startswith("popularity") for r in top[1:])


def test_bought_together_falls_back_to_cooccurrence_then_popularity(scorer):
    top = scorer.recommend(["hat"], k=2)
    assert top[0].item_id == "scarf" and top[0].reason.startswith("co-occurrence")
    assert top[1].item_id == "pop" and top[1].reason.startswith("popularity")
    assert [r.item_id for r in scorer.recommend(["unknown"], k=2)] == ["pop", "shoe"]


def test_bought_together_never_returns_the_query_or_excluded_items(scorer):
    top = scorer.recommend(["shoe"], k=10, exclude=["sock", "pop"])
    assert {r.item_id for r in top} == {"hat", "scarf"}
    assert [r.score for r in top] == sorted((r.score for r in top), reverse=True)


def test_scores_rank_rules_over_cooccurrence_over_popularity(scorer):
    items = ["sock", "pop", "shoe", "scarf", "hat", "never-sold"]
    s = scorer.scores(["shoe", "hat"], items)
    assert s.shape == (2, 6)
    assert list(np.argsort(-s[0], kind="stable")) == [0, 1, 3, 4, 5, 2]  # rule, popularity..., query last
    assert s[0, 2] == -1.0 and s[0, 5] == 0.0
    assert s[1].argmax() == 3 and 1.0 <= s[1, 3] < 2.0 and s[0, 0] > 2.0
    for q, row in zip(["shoe", "hat"], s):  # scores() and recommend() give one-item queries the same scores
        for rec in scorer.recommend([q], k=5):
            assert rec.score == pytest.approx(row[items.index(rec.item_id)])
