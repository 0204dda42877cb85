"""Business rules: each rule alone, combinations, caps against a brute-force oracle, the Milvus filter (escaping,
and accepted by a real store with the same answer as the Python filter)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from common.business_rules import BusinessRules, Ranked, apply_rules
from common.errors import ConfigError
from common.vector_store import CollectionSpec, open_store

CATS = ("Bag", "Shirt", "Coat")
BRANDS = ("Acme", "Zeta")


def item(n: int, score: float, category="Bag", brand="Acme", price=20.0, in_stock=True) -> Ranked:
    return Ranked(item_id=f"i{n}", score=score, fields={"title": f"t{n}", "category": category, "brand": brand,
                                                        "price": price, "in_stock": in_stock, "color": "red"},
                  reasons=[{"source": "ann"}])


def ids(results) -> list[str]:
    return [r.item_id for r in results]


@pytest.fixture
def catalogue() -> list[Ranked]:
    return [item(0, 0.9, "Bag", "Acme", 10.0), item(1, 0.8, "Shirt", "Zeta", 30.0, in_stock=False),
            item(2, 0.7, "Coat", "Acme", 80.0), item(3, 0.6, "Bag", "Zeta", 50.0), item(4, 0.5, "Shirt", "Acme", 5.0)]


# --------------------------------------------------------------------------------------------- each rule alone


def test_defaults_drop_out_of_stock_and_seen(catalogue):
    out = apply_rules(catalogue, BusinessRules(), k=10, seen={"i2"})
    assert ids(out) == ["i0", "i3", "i4"]
    loose = BusinessRules(in_stock_only=False, exclude_seen=False)
    assert ids(apply_rules(catalogue, loose, k=10, seen={"i2"})) == ["i0", "i1", "i2", "i3", "i4"]


def test_price_band_is_inclusive(catalogue):
    rules = BusinessRules(in_stock_only=False, price_min=10, price_max=50)
    assert ids(apply_rules(catalogue, rules, k=10)) == ["i0", "i1", "i3"]
    no_price = [Ranked("x", 1.0, {"in_stock": True, "price": None}, [])]
    assert apply_rules(no_price, BusinessRules(price_max=100), k=5) == []  # unknown price fails a bound


def test_allow_and_deny_categories(catalogue):
    assert ids(apply_rules(catalogue, BusinessRules(allow_categories=("Bag", "Coat")), k=10)) == ["i0", "i2", "i3"]
    assert ids(apply_rules(catalogue, BusinessRules(deny_categories=("Bag",)), k=10)) == ["i2", "i4"]
    both = BusinessRules(allow_categories=("Bag", "Coat"), deny_categories=("Bag",))
    assert ids(apply_rules(catalogue, both, k=10)) == ["i2"]


def test_boost_multiplies_resorts_and_explains(catalogue):
    rules = BusinessRules(boosts={"brand:Zeta": 2.0, "item:i4": 1.5, "category:Shirt": 1.1})
    out = apply_rules(catalogue, rules, k=10)
    assert ids(out) == ["i3", "i0", "i4", "i2"]  # i3: 0.6*2 = 1.2; i4: 0.5*1.5*1.1 = 0.825 > i2's 0.7
    i4 = out[2]
    assert i4.score == pytest.approx(0.825)
    assert i4.reasons == [{"source": "ann"}, {"rule": "boost", "key": "item:i4", "factor": 1.5},
                          {"rule": "boost", "key": "category:Shirt", "factor": 1.1}]
    assert out[1].reasons == [{"source": "ann"}]  # not boosted, nothing added
    assert catalogue[3].score == 0.6 and catalogue[3].reasons == [{"source": "ann"}]  # inputs untouched


def test_boost_ties_keep_the_input_order():
    ranked = [item(k, 1.0) for k in range(5)]
    assert ids(apply_rules(ranked, BusinessRules(boosts={"brand:Zeta": 3.0}), k=5)) == ["i0", "i1", "i2", "i3", "i4"]


def test_caps_per_category_and_brand(catalogue):
    assert ids(apply_rules(catalogue, BusinessRules(in_stock_only=False, max_per_category=1), k=10)) == \
        ["i0", "i1", "i2"]
    assert ids(apply_rules(catalogue, BusinessRules(in_stock_only=False, max_per_brand=1), k=10)) == ["i0", "i1"]


def test_pinned_first_in_order_when_admissible(catalogue):
    extra = {"p1": {"category": "Coat", "brand": "Zeta", "price": 15.0, "in_stock": True},
             "p2": {"category": "Coat", "brand": "Zeta", "price": 15.0, "in_stock": False}}
    rules = BusinessRules(pinned=("i3", "p2", "p1", "i1", "i2", "p3"))
    out = apply_rules(catalogue, rules, k=4, seen={"i2"}, pinned_fields=extra)
    # i3 (ranked), p1 (from pinned_fields); p2 and i1 are out of stock, i2 is seen, p3 has no fields.
    assert ids(out) == ["i3", "p1", "i0", "i4"]
    assert out[0].reasons[-1] == {"source": "pinned"} and out[0].score == 0.6
    assert out[1].score == 0.0 and out[1].reasons == [{"source": "pinned"}]
    assert ids(apply_rules(catalogue, rules, k=1, pinned_fields=extra)) == ["i3"]


def test_pinned_items_count_towards_caps(catalogue):
    rules = BusinessRules(pinned=("i3",), max_per_category=1)
    assert ids(apply_rules(catalogue, rules, k=10)) == ["i3", "i2", "i4"]  # i0 (Bag) is capped by the pinned i3


def test_cut_to_k_and_duplicates(catalogue):
    assert ids(apply_rules(catalogue + [item(0, 5.0)], BusinessRules(), k=2)) == ["i0", "i2"]  # i0 once
    with pytest.raises(ConfigError, match="0"):
        apply_rules(catalogue, BusinessRules(), k=0)


# --------------------------------------------------------------------------------------------- combinations


def test_combined_rules(catalogue):
    rules = BusinessRules(price_max=60, deny_categories=("Coat",), boosts={"category:Shirt": 3.0}, max_per_brand=1)
    # admissible: i0 (Acme 0.9), i3 (Zeta 0.6), i4 (Acme, boosted to 1.5); one per brand: i4 then i3.
    assert ids(apply_rules(catalogue, rules, k=10, seen={"i9"})) == ["i4", "i3"]


def _oracle(ranked, rules, k, seen):
    """Brute force: keep admissible unseen items; repeatedly take the best remaining item that fits both caps."""
    pool = []
    for r in ranked:
        f = r.fields
        ok = (not rules.in_stock_only or f["in_stock"]) and r.item_id not in seen
        ok = ok and (rules.price_min is None or f["price"] >= rules.price_min)
        ok = ok and (rules.price_max is None or f["price"] <= rules.price_max)
        ok = ok and (not rules.allow_categories or f["category"] in rules.allow_categories)
        ok = ok and f["category"] not in rules.deny_categories
        if ok:
            factor = 1.0
            for key in (f"item:{r.item_id}", f"brand:{f['brand']}", f"category:{f['category']}"):
                factor *= rules.boosts.get(key, 1.0)
            pool.append((r.score * factor, len(pool), r.item_id, f["category"], f["brand"]))
    out: list[tuple] = []
    while len(out) < k:
        fits = [p for p in pool if p not in out
                and (rules.max_per_category is None or sum(o[3] == p[3] for o in out) < rules.max_per_category)
                and (rules.max_per_brand is None or sum(o[4] == p[4] for o in out) < rules.max_per_brand)]
        if not fits:
            break
        out.append(max(fits, key=lambda p: (p[0], -p[1])))
    return [p[2] for p in out]


@pytest.mark.parametrize("seed", range(30))
def test_against_brute_force(seed):
    rng = random.Random(seed)
    ranked = [item(n, round(rng.random(), 2), rng.choice(CATS), rng.choice(BRANDS), float(rng.randint(0, 100)),
                   rng.random() > 0.2) for n in range(rng.randint(0, 40))]
    rules = BusinessRules(
        in_stock_only=rng.random() > 0.3, price_min=rng.choice([None, 20.0]), price_max=rng.choice([None, 70.0]),
        allow_categories=rng.choice([(), ("Bag", "Coat")]), deny_categories=rng.choice([(), ("Coat",)]),
        max_per_category=rng.choice([None, 1, 2, 3]), max_per_brand=rng.choice([None, 2, 4]),
        boosts=rng.choice([{}, {"brand:Zeta": 1.7, "category:Bag": 0.5, "item:i3": 4.0}]))
    seen = {f"i{n}" for n in range(0, 40, 7)}
    k = rng.randint(1, 12)
    assert ids(apply_rules(ranked, rules, k, seen)) == _oracle(ranked, rules, k, seen)


# --------------------------------------------------------------------------------------------- config


def test_from_mapping_and_validation():
    rules = BusinessRules.from_mapping({"price_min": 5, "allow_categories": ["Bag"], "boosts": {"brand:Acme": 2}})
    assert rules.allow_categories == ("Bag",) and rules.boosts == {"brand:Acme": 2.0}
    assert BusinessRules.from_mapping(None) == BusinessRules()
    assert hash(rules) == hash(BusinessRules.from_mapping({"price_min": 5.0, "allow_categories": ("Bag",),
                                                           "boosts": {"brand:Acme": 2.0}}))
    for bad, match in [({"colour": "red", "in_stok": 1}, r"\['colour', 'in_stok'\]"),
                       ({"price_min": -1}, "-1"), ({"price_min": 50, "price_max": 10}, "price_min=50"),
                       ({"boosts": {"brand:Acme": 0}}, "0"), ({"boosts": {"brand:Acme": -2}}, "-2"),
                       ({"boosts": {"colour:red": 2}}, "colour:red"), ({"max_per_brand": 0}, "0"),
                       ({"max_per_category": 1.5}, "1.5"), ({"allow_categories": "Bag"}, "'Bag'"),
                       ({"pinned": ["a", ""]}, "''"), ({"in_stock_only": "yes"}, "'yes'")]:
        with pytest.raises(ConfigError, match=match):
            BusinessRules.from_mapping(bad)


def test_merged_narrows():
    base = BusinessRules(in_stock_only=False, price_min=10, price_max=100, allow_categories=("Bag", "Coat"),
                         deny_categories=("Hat",), max_per_brand=3, pinned=("a",), boosts={"brand:Acme": 2.0})
    req = base.merged({"price_min": 5, "price_max": 50, "allow_categories": ["Coat", "Shoe"],
                       "deny_categories": ["Scarf"], "max_per_brand": 5, "max_per_category": 2,
                       "in_stock_only": True, "pinned": ["b"], "boosts": {"brand:Acme": 1.5, "item:x": 2}})
    assert (req.price_min, req.price_max) == (10, 50)
    assert req.allow_categories == ("Coat",) and req.deny_categories == ("Hat", "Scarf")
    assert (req.max_per_brand, req.max_per_category, req.in_stock_only) == (3, 2, True)
    assert req.pinned == ("b", "a") and req.boosts == {"brand:Acme": 1.5, "item:x": 2.0}
    assert base.merged({}) is base and base.merged({"exclude_seen": False}).exclude_seen is True
    with pytest.raises(ConfigError, match="price_min=150"):
        base.merged({"price_min": 150})
    with pytest.raises(ConfigError, match="Shoe"):
        base.merged({"allow_categories": ["Shoe"]})
    with pytest.raises(ConfigError, match="-3"):
        base.merged({"price_max": -3})
    with pytest.raises(ConfigError, match="colour"):
        base.merged({"colour": "red"})


# --------------------------------------------------------------------------------------------- milvus filter


def test_milvus_filter_text_and_escaping():
    assert BusinessRules(in_stock_only=False).milvus_filter() is None
    rules = BusinessRules(price_min=10, price_max=50.5, allow_categories=("Bag", "Shirt"), deny_categories=("Coat",))
    assert rules.milvus_filter() == ('in_stock == true and price >= 10.0 and price <= 50.5 and '
                                     'category in ["Bag", "Shirt"] and category not in ["Coat"]')
    tricky = BusinessRules(in_stock_only=False, allow_categories=('Bag "Pro"', "O'Neil\\x"))
    assert tricky.milvus_filter() == 'category in ["Bag \\"Pro\\"", "O\'Neil\\\\x"]'
    assert BusinessRules(in_stock_only=False, price_min=0.00001).milvus_filter() == "price >= 0.00001"


_ROW_CATS = ("Bag", 'Bag "Pro"', "O'Neil\\x", "Café", "Coat")


@pytest.fixture(scope="module")
def item_store(store_dir):
    store = open_store(store_dir)
    spec = CollectionSpec("rules_items", dim=4, model="test",
                          fields={"category": "str", "brand": "str", "price": "float", "in_stock": "bool"})
    store.drop_collection(spec.name)
    store.ensure_collection(spec)
    rng = np.random.default_rng(1)
    rows = [{"item_id": f"i{n}", "vector": rng.standard_normal(4), "category": _ROW_CATS[n % 5],
             "brand": BRANDS[n % 2], "price": float(n * 3 % 97), "in_stock": n % 4 != 0} for n in range(60)]
    store.upsert(spec.name, rows)
    yield store, rows
    store.drop_collection(spec.name)
    store.close()


@pytest.mark.parametrize("rules", [
    BusinessRules(),
    BusinessRules(price_min=10, price_max=50),
    BusinessRules(allow_categories=('Bag "Pro"', "O'Neil\\x")),
    BusinessRules(in_stock_only=False, deny_categories=('Bag "Pro"', "Café")),
    BusinessRules(price_max=60, allow_categories=("Bag", "O'Neil\\x", "Coat"), deny_categories=("Coat",)),
])
def test_milvus_filter_matches_admits_in_a_real_store(item_store, rules):
    store, rows = item_store
    hits = store.search("rules_items", np.ones(4, dtype=np.float32), k=len(rows), filter=rules.milvus_filter())[0]
    expected = {r["item_id"] for r in rows if rules.admits(r)}
    assert expected  # each case keeps something, so an empty answer would fail
    assert {h.item_id for h in hits} == expected
