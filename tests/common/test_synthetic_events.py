"""Tests for common/synthetic_events.py: determinism, schema, funnel, planted tastes and co-purchase structure."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import ConfigError, SchemaError
from common.synthetic_events import (
    COMPLEMENTARY_PAIRS, EVENTS_SCHEMA, SIMULATED_EVENTS, PRICE_BANDS, USERS_SCHEMA, ShopperModel, generate_events,
    price_bands, read_events, write_events, write_users,
)

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"
CATEGORIES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
BRANDS = ("A", "B", "C", "D", "E", "F")


def tiny_catalog(per_category: int = 12) -> pa.Table:
    """10 categories x ``per_category`` items; brands cycle; prices rise with the index inside a category."""
    rows = [{"item_id": f"i{c:02d}{k:02d}", "category": name, "brand": BRANDS[(c + k) % len(BRANDS)],
             "price": 10.0 * (c + 1) + k, "in_stock": k % 7 != 6}
            for c, name in enumerate(CATEGORIES) for k in range(per_category)]
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="module")
def generated() -> tuple[pd.DataFrame, pd.DataFrame]:
    return generate_events(tiny_catalog(), n_users=80, days=20, seed=7)


@pytest.fixture(scope="module")
def enriched(generated: tuple[pd.DataFrame, pd.DataFrame]) -> pd.DataFrame:
    """Events joined with the item's category/brand and whether they match the user's planted tastes."""
    events, users = generated
    items = tiny_catalog().to_pandas().set_index("item_id")
    tastes = users.set_index("user_id")
    df = events.assign(category=events["item_id"].map(items["category"]), brand=events["item_id"].map(items["brand"]))
    df["in_taste"] = [c in tastes.at[u, "taste_categories"] for u, c in zip(df["user_id"], df["category"])]
    df["taste_brand"] = [b in tastes.at[u, "taste_brands"] for u, b in zip(df["user_id"], df["brand"])]
    return df


def test_same_seed_same_frames_and_other_seed_differs(generated: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    events, users = generate_events(tiny_catalog(), n_users=80, days=20, seed=7)
    pd.testing.assert_frame_equal(events, generated[0])
    pd.testing.assert_frame_equal(users, generated[1])
    other, _ = generate_events(tiny_catalog(), n_users=80, days=20, seed=8)
    assert not other["item_id"].head(50).equals(events["item_id"].head(50))


def test_a_dataframe_catalogue_gives_the_same_result(generated: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    events, _ = generate_events(tiny_catalog().to_pandas(), n_users=80, days=20, seed=7)
    pd.testing.assert_frame_equal(events, generated[0])


def test_schema_and_dtypes(generated: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    events, users = generated
    assert list(events.columns) == EVENTS_SCHEMA.names
    assert str(events["ts"].dt.tz) == "UTC"
    assert events["value"].dtype == np.float64
    assert set(events["event"]) == set(SIMULATED_EVENTS)
    assert events["user_id"].str.fullmatch(r"u-\d{4}").all()
    assert events["ts"].is_monotonic_increasing
    assert events.groupby("session_id")["ts"].apply(lambda ts: ts.diff().dropna().gt(pd.Timedelta(0)).all()).all()
    assert events["item_id"].isin(tiny_catalog().column("item_id").to_pylist()).all()
    assert events.loc[events["event"] == "wishlist", "button"].eq("heart").all()
    assert events.loc[events["event"] == "view", "button"].isna().all()
    assert list(users.columns) == USERS_SCHEMA.names and len(users) == 80
    assert users["taste_categories"].map(len).between(1, 3).all()
    assert users["taste_brands"].map(len).between(1, 2).all()
    assert set(users["price_band"]) <= set(PRICE_BANDS) and users["age"].between(18, 75).all()


def test_funnel_order(generated: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    counts = generated[0]["event"].value_counts()
    assert counts["view"] > 4 * counts["add_to_bag"]
    assert counts["view"] > 4 * counts["wishlist"]
    assert counts["add_to_bag"] > counts["purchase"] > counts["return"]
    assert counts["view"] > counts["purchase"] > 0 and counts["dislike"] > 0


def test_planted_tastes_hold(enriched: pd.DataFrame) -> None:
    per_user = enriched.groupby("user_id")["in_taste"].mean()
    assert enriched["in_taste"].mean() >= 0.7
    assert per_user.median() >= 0.7
    # Taste brands: each user has 1-2 of 6 brands, so chance alone would give about 0.25.
    assert enriched["taste_brand"].mean() > 0.4
    dislikes = enriched[enriched["event"] == "dislike"]
    assert dislikes["in_taste"].mean() < enriched["in_taste"].mean()


def test_price_band_is_planted(generated: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    events, users = generated
    catalog = tiny_catalog().to_pandas()
    band = dict(zip(catalog["item_id"], price_bands(catalog)))
    preferred = users.set_index("user_id")["price_band"]
    hits = [band[i] == preferred[u] for u, i in zip(events["user_id"], events["item_id"])]
    assert np.mean(hits) > 0.45  # chance: 1/3


def test_orders_hold_complementary_pairs(enriched: pd.DataFrame) -> None:
    purchases = enriched[enriched["event"] == "purchase"]
    orders = purchases.groupby("order_id")["category"].agg(set)
    with_pair = orders.map(lambda cats: any(a in cats and b in cats for a, b in COMPLEMENTARY_PAIRS))
    assert with_pair.sum() >= 10
    for a, b in COMPLEMENTARY_PAIRS:
        has_a, has_b = orders.map(lambda c: a in c), orders.map(lambda c: b in c)
        assert (has_a & has_b).mean() > 1.5 * has_a.mean() * has_b.mean(), (a, b)


def test_purchases_have_value_and_order(generated: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    events = generated[0]
    prices = tiny_catalog().to_pandas().set_index("item_id")["price"]
    paid = events[events["event"] == "purchase"]
    assert paid["order_id"].notna().all() and paid["value"].gt(0).all()
    assert (paid["value"] <= paid["item_id"].map(prices) + 1e-9).all()
    assert paid.groupby("order_id")["session_id"].nunique().eq(1).all()
    others = events[~events["event"].isin(["purchase", "return"])]
    assert others["order_id"].isna().all() and others["value"].isna().all()
    returns = events[events["event"] == "return"]
    assert returns["order_id"].isin(set(paid["order_id"])).all()


@pytest.mark.parametrize("name", ["e.parquet", "e.csv", "e.jsonl"])
def test_write_and_read_events_round_trip(tmp_path: Path, name: str,
                                          generated: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    events = generated[0].head(300)
    write_events(events, str(tmp_path / name))
    pd.testing.assert_frame_equal(read_events(str(tmp_path / name)), events.reset_index(drop=True))


def test_write_users_parquet_and_csv(tmp_path: Path, generated: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    users = generated[1]
    write_users(users, str(tmp_path / "u.parquet"))
    write_users(users, str(tmp_path / "u.csv"))
    assert pq.read_table(tmp_path / "u.parquet").schema.equals(USERS_SCHEMA)
    first = (tmp_path / "u.csv").read_text().splitlines()[1]
    assert "|".join(users["taste_categories"].iloc[0]) in first


def test_bad_inputs_are_rejected_with_the_value() -> None:
    with pytest.raises(ConfigError, match="n_users.*Got 0"):
        generate_events(tiny_catalog(), n_users=0)
    with pytest.raises(ConfigError, match="bag_rate.*Got 2"):
        ShopperModel(bag_rate=2)
    with pytest.raises(SchemaError, match="category"):
        generate_events(tiny_catalog().drop_columns(["category"]))
    with pytest.raises(SchemaError, match="unknown file format"):
        write_events(generate_events(tiny_catalog(), n_users=2, days=2)[0], "events.xlsx")


def test_shipped_events_are_reproducible_and_small() -> None:
    catalog = pq.read_table(SAMPLE / "catalog.parquet")
    events, users = generate_events(catalog, n_users=500, days=30, seed=0)
    pd.testing.assert_frame_equal(read_events(str(SAMPLE / "events.parquet")), events)
    pd.testing.assert_frame_equal(pd.read_parquet(SAMPLE / "users.parquet"), users, check_dtype=False)
    assert (SAMPLE / "events.parquet").stat().st_size < 3_000_000
    assert users["user_id"].nunique() == 500
