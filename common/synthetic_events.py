"""Synthetic shoppers with PLANTED tastes, and the interaction-events schema they write (for tests and demos)."""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass, fields

import fsspec
from fsspec.core import url_to_fs
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from common.artifacts import write_atomic
from common.catalog import file_format, ids_as_str, pyarrow_filesystem, read_table
from common.errors import ConfigError, SchemaError
from common.events import EVENT_TYPES, EVENTS_SCHEMA

log = logging.getLogger(__name__)

#: The event kinds the simulation emits (all of EVENT_TYPES but explicit ratings).
SIMULATED_EVENTS: tuple[str, ...] = tuple(e for e in EVENT_TYPES if e != "rating")
USERS_SCHEMA = pa.schema([
    ("user_id", pa.string()),
    ("taste_categories", pa.list_(pa.string())),  # 1-3 planted favourite categories
    ("taste_brands", pa.list_(pa.string())),  # 1-2 planted favourite brands
    ("price_band", pa.string()),  # one of PRICE_BANDS: the preferred within-category price tercile
    ("age", pa.int64()),
    ("region", pa.string()),
])
PRICE_BANDS: tuple[str, ...] = ("budget", "mid", "premium")
REGIONS: tuple[str, ...] = ("DE", "FR", "NL", "UK", "PL", "SE", "IT", "ES")
#: Categories bought together: adding one to the bag often leads to the other (frequently-bought-together rules).
COMPLEMENTARY_PAIRS: tuple[tuple[str, str], ...] = (
    ("Sneaker", "T-shirt"), ("Coat", "Ankle boot"), ("Bag", "Dress"), ("Shirt", "Trouser"),
)
DEFAULT_START = "2025-03-03"  # first day of the simulated window (UTC)
_HOUR_WEIGHTS = np.array([1, 1, 1, 1, 1, 1, 2, 3, 4, 4, 4, 5, 6, 6, 5, 5, 5, 6, 8, 10, 11, 10, 7, 3], dtype=float)


@dataclass(frozen=True)
class ShopperModel:
    """Behaviour rates of the synthetic shoppers; the defaults produced the shipped data/sample events."""

    in_taste: float = 0.88  # chance a session (and a drifting view) targets one of the user's taste categories
    sessions_per_month: float = 8.0  # mean sessions per user per 30 days (activity varies lognormally)
    views_per_session: float = 7.0  # mean product views per session
    stay_in_intent: float = 0.8  # chance the next view stays in the session's category
    brand_boost: float = 4.0  # sampling weight multiplier for items of a taste brand
    band_boost: float = 3.0  # sampling weight multiplier for items in the user's price band
    wishlist_rate: float = 0.08  # chance a view of a matching item ends in a wishlist "heart"
    bag_rate: float = 0.09  # chance a view of a matching, in-stock item ends in add_to_bag
    checkout_rate: float = 0.6  # chance a session with a non-empty bag checks out
    keep_in_order: float = 0.85  # chance a bagged item is kept at checkout
    complement_rate: float = 0.45  # chance bagging an item leads to viewing an item of its complement
    complement_bag_rate: float = 0.65  # chance that complement view ends in add_to_bag
    dislike_in_taste: float = 0.01  # chance a view in the user's tastes ends in "not interested"
    dislike_out_of_taste: float = 0.08  # same, out of the user's tastes
    return_rate: float = 0.06  # chance a purchased item is returned (doubled outside taste or price band)
    discount_rate: float = 0.15  # chance a purchase is paid at 10-30% off

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            limit = None if f.name in ("sessions_per_month", "views_per_session", "brand_boost", "band_boost") else 1
            if not (value > 0 if limit is None else 0 <= value <= limit):
                valid = "a positive number" if limit is None else "a probability in [0, 1]"
                raise ConfigError(f"ShopperModel.{f.name} must be {valid}. Got {value!r}")


@dataclass
class _Items:
    """The catalogue as arrays the simulation samples from."""

    ids: np.ndarray  # item_id (str)
    category: np.ndarray  # category code
    categories: list[str]
    brand: np.ndarray  # brand code
    brands: list[str]
    band: np.ndarray  # price-band code (index into PRICE_BANDS)
    price: np.ndarray
    in_stock: np.ndarray
    popularity: np.ndarray  # intrinsic appeal, shared by all users
    by_category: list[np.ndarray]  # item positions per category code


@dataclass
class _Shopper:
    """One user's planted tastes and the item sampling tables derived from them."""

    user_id: str
    categories: np.ndarray  # taste category codes
    brands: np.ndarray  # taste brand codes
    band: int
    cumulative: list[np.ndarray]  # per category: cumulative sampling weights over by_category items


def price_bands(catalog: pa.Table | pd.DataFrame) -> pd.Series:
    """Each item's price band: its price tercile *within its category* ("budget", "mid", "premium")."""
    df = catalog.to_pandas() if isinstance(catalog, pa.Table) else catalog
    pct = df.groupby("category")["price"].rank(pct=True, method="first")
    codes = np.clip(np.ceil(pct.to_numpy() * 3).astype(int) - 1, 0, 2)
    return pd.Series(np.array(PRICE_BANDS)[codes], index=df.index, name="price_band")


def _items(catalog: pa.Table | pd.DataFrame, rng: np.random.Generator) -> _Items:
    df = catalog.to_pandas() if isinstance(catalog, pa.Table) else catalog.reset_index(drop=True)
    missing = [c for c in ("item_id", "category", "price") if c not in df.columns]
    if missing or df.empty:
        raise SchemaError(f"events need a non-empty catalogue with item_id, category and price; missing {missing}")
    category, categories = pd.factorize(df["category"].astype(str), sort=True)
    brand_names = df["brand"].fillna("").astype(str) if "brand" in df else pd.Series([""] * len(df))
    brand, brands = pd.factorize(brand_names, sort=True)
    band = price_bands(df).map({b: i for i, b in enumerate(PRICE_BANDS)}).to_numpy()
    stock = df["in_stock"].fillna(True).astype(bool).to_numpy() if "in_stock" in df else np.ones(len(df), bool)
    return _Items(
        ids=np.asarray(ids_as_str(pa.array(df["item_id"].tolist())).to_pylist(), dtype=object),
        category=category, categories=list(categories), brand=brand, brands=list(brands), band=band,
        price=df["price"].astype(float).to_numpy(), in_stock=stock,
        popularity=rng.lognormal(0.0, 0.8, len(df)),
        by_category=[np.flatnonzero(category == c) for c in range(len(categories))],
    )


def _complements(items: _Items) -> dict[int, int]:
    code = {name: i for i, name in enumerate(items.categories)}
    pairs = [(code[a], code[b]) for a, b in COMPLEMENTARY_PAIRS if a in code and b in code]
    return {**{a: b for a, b in pairs}, **{b: a for a, b in pairs}}


def _make_shopper(user_id: str, items: _Items, model: ShopperModel, rng: np.random.Generator,
                  age: int) -> _Shopper:
    n_cat = len(items.categories)
    k = min(int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25])), n_cat)
    first = int(rng.integers(n_cat))
    chosen = [first]
    partner = _complements(items).get(first)
    if partner is not None and k >= 2 and rng.random() < 0.6:  # complements tend to be liked together
        chosen.append(partner)
    rest = [c for c in rng.permutation(n_cat) if c not in chosen]
    chosen += [int(c) for c in rest[: k - len(chosen)]]
    brands = rng.choice(len(items.brands), size=min(int(rng.integers(1, 3)), len(items.brands)), replace=False)
    premium = min(0.15 + 0.01 * (age - 18), 0.6)  # older shoppers lean premium: a planted demographic signal
    band = int(rng.choice(3, p=[(1 - premium) * 0.5, (1 - premium) * 0.5, premium]))
    weight = items.popularity * np.where(np.isin(items.brand, brands), model.brand_boost, 1.0)
    weight = weight * np.where(items.band == band, model.band_boost, 1.0)
    cumulative = [np.cumsum(weight[pos]) for pos in items.by_category]
    return _Shopper(user_id, np.array(sorted(chosen)), np.sort(brands), band, cumulative)


def _users_frame(shoppers: list[_Shopper], items: _Items, ages: np.ndarray, regions: np.ndarray) -> pd.DataFrame:
    table = pa.table({
        "user_id": [s.user_id for s in shoppers],
        "taste_categories": [[items.categories[c] for c in s.categories] for s in shoppers],
        "taste_brands": [[items.brands[b] for b in s.brands] for s in shoppers],
        "price_band": [PRICE_BANDS[s.band] for s in shoppers],
        "age": ages.astype(np.int64), "region": regions.astype(str),
    }, schema=USERS_SCHEMA)
    return table.to_pandas()


class _EventLog:
    """Events as they are simulated (times in seconds from the window start), plus session and order counters."""

    def __init__(self, items: _Items) -> None:
        self.items = items
        self.rows: list[tuple] = []
        self.sessions = 0
        self.orders = 0

    def new_session(self) -> str:
        self.sessions += 1
        return f"s-{self.sessions:06d}"

    def new_order(self) -> str:
        self.orders += 1
        return f"o-{self.orders:06d}"

    def add(self, user_id: str, pos: int, event: str, t: float, session: str, order: str | None = None,
            button: str | None = None, value: float | None = None) -> None:
        self.rows.append((user_id, self.items.ids[pos], event, t, session, order, button, value, len(self.rows)))

    def frame(self, start: pd.Timestamp) -> pd.DataFrame:
        """Events sorted by time (ties keep simulation order), typed as EVENTS_SCHEMA."""
        cols = list(zip(*self.rows)) if self.rows else [[] for _ in range(9)]
        t_us = np.round(np.asarray(cols[3], dtype=float) * 1e6).astype(np.int64) + start.value // 1000
        order = np.lexsort((np.asarray(cols[8], dtype=np.int64), t_us))
        data = {name: [cols[i][j] for j in order] for i, name in enumerate(EVENTS_SCHEMA.names) if name != "ts"}
        data["ts"] = pa.array(t_us[order], pa.timestamp("us", tz="UTC"))
        return pa.table({n: data[n] for n in EVENTS_SCHEMA.names}, schema=EVENTS_SCHEMA).to_pandas()


@dataclass
class _Context:
    """What every step of the simulation needs."""

    items: _Items
    model: ShopperModel
    rng: np.random.Generator
    log: _EventLog
    complements: dict[int, int]
    end: float  # window length in seconds


def _sample_item(ctx: _Context, shopper: _Shopper, category: int) -> int:
    cumulative = shopper.cumulative[category]
    i = int(np.searchsorted(cumulative, ctx.rng.random() * cumulative[-1], side="right"))
    positions = ctx.items.by_category[category]
    return int(positions[min(i, len(positions) - 1)])


def _pick_category(ctx: _Context, shopper: _Shopper) -> int:
    others = np.setdiff1d(np.arange(len(ctx.items.categories)), shopper.categories)
    if len(others) == 0 or ctx.rng.random() < ctx.model.in_taste:
        return int(ctx.rng.choice(shopper.categories))
    return int(ctx.rng.choice(others))


def _bag_complement(ctx: _Context, shopper: _Shopper, session: str, category: int, t: float,
                    bag: list[int]) -> float:
    """After bagging an item: maybe view (and bag) an item of the complementary category."""
    partner = ctx.complements.get(category)
    if partner is None or ctx.rng.random() >= ctx.model.complement_rate:
        return t
    pos = _sample_item(ctx, shopper, partner)
    t += 5 + ctx.rng.exponential(30)
    ctx.log.add(shopper.user_id, pos, "view", t, session)
    if ctx.items.in_stock[pos] and pos not in bag and ctx.rng.random() < ctx.model.complement_bag_rate:
        t += 2 + ctx.rng.exponential(8)
        ctx.log.add(shopper.user_id, pos, "add_to_bag", t, session, button="add_to_bag")
        bag.append(pos)
    return t


def _browse(ctx: _Context, shopper: _Shopper, session: str, category: int, t: float, bag: list[int]) -> float:
    """One product view in ``category`` and the reaction to it; returns the new session clock."""
    items, rng, model, user = ctx.items, ctx.rng, ctx.model, shopper.user_id
    pos = _sample_item(ctx, shopper, category)
    t += 5 + rng.exponential(35)
    ctx.log.add(user, pos, "view", t, session)
    in_taste = category in shopper.categories
    if rng.random() < (model.dislike_in_taste if in_taste else model.dislike_out_of_taste):
        ctx.log.add(user, pos, "dislike", t + 2 + rng.exponential(5), session, button="not_interested")
        return t + 8
    match = ((1.6 if items.brand[pos] in shopper.brands else 1.0) * (1.4 if items.band[pos] == shopper.band else 1.0)
             * (1.0 if in_taste else 0.4))
    if rng.random() < model.wishlist_rate * match:
        t += 2 + rng.exponential(6)
        ctx.log.add(user, pos, "wishlist", t, session, button="heart")
    if items.in_stock[pos] and pos not in bag and rng.random() < model.bag_rate * match:
        t += 2 + rng.exponential(10)
        ctx.log.add(user, pos, "add_to_bag", t, session, button=str(rng.choice(["add_to_bag", "quick_add"])))
        bag.append(pos)
        t = _bag_complement(ctx, shopper, session, category, t, bag)
    return t


def _checkout(ctx: _Context, shopper: _Shopper, session: str, t: float, bag: list[int]) -> None:
    """Buy most of the bag as one order; some purchases come back later as returns (in their own session)."""
    rng, items = ctx.rng, ctx.items
    kept = [pos for pos in bag if rng.random() < ctx.model.keep_in_order] or bag[:1]
    order = ctx.log.new_order()
    t += 30 + rng.exponential(60)
    for pos in kept:
        discount = float(rng.choice([0.1, 0.2, 0.3])) if rng.random() < ctx.model.discount_rate else 0.0
        paid = round(float(items.price[pos]) * (1 - discount), 2)
        t += 1
        ctx.log.add(shopper.user_id, pos, "purchase", t, session, order=order, button="checkout", value=paid)
        mismatch = items.category[pos] not in shopper.categories or items.band[pos] != shopper.band
        returned_at = t + rng.uniform(2, 14) * 86400
        if rng.random() < ctx.model.return_rate * (2 if mismatch else 1) and returned_at < ctx.end:
            ctx.log.add(shopper.user_id, pos, "return", returned_at, ctx.log.new_session(), order=order,
                        value=paid)


def _simulate_session(ctx: _Context, shopper: _Shopper, t: float) -> None:
    session = ctx.log.new_session()
    intent = _pick_category(ctx, shopper)
    bag: list[int] = []
    for _ in range(1 + ctx.rng.poisson(ctx.model.views_per_session - 1)):
        stay = ctx.rng.random() < ctx.model.stay_in_intent
        t = _browse(ctx, shopper, session, intent if stay else _pick_category(ctx, shopper), t, bag)
    if bag and ctx.rng.random() < ctx.model.checkout_rate:
        _checkout(ctx, shopper, session, t, bag)


def generate_events(catalog: pa.Table | pd.DataFrame, n_users: int = 500, days: int = 30, seed: int = 0,
                    start: str = DEFAULT_START, model: ShopperModel | None = None,
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Simulate ``n_users`` shoppers over ``days`` from ``start`` (UTC); deterministic for a seed.

    Returns ``(events, users)``: events follow EVENTS_SCHEMA, sorted by ``ts``; users follow USERS_SCHEMA and
    hold each shopper's PLANTED tastes (categories, brands, price band) so learners can be checked against them.
    The catalogue needs item_id, category and price (brand and in_stock are used when present).
    """
    if not isinstance(n_users, int) or n_users < 1:
        raise ConfigError(f"n_users must be a positive integer. Got {n_users!r}")
    if not isinstance(days, int) or days < 1:
        raise ConfigError(f"days must be a positive integer. Got {days!r}")
    model = model or ShopperModel()
    rng = np.random.default_rng(seed)
    items = _items(catalog, rng)
    ages = np.clip(np.round(rng.normal(35, 11, n_users)), 18, 75).astype(np.int64)
    regions = rng.choice(REGIONS, n_users)
    width = max(4, len(str(n_users)))
    shoppers = [_make_shopper(f"u-{i + 1:0{width}d}", items, model, rng, int(ages[i])) for i in range(n_users)]
    ctx = _Context(items, model, rng, _EventLog(items), _complements(items), days * 86400.0)
    for shopper in shoppers:
        activity = rng.lognormal(-0.18, 0.6)  # mean 1: some shoppers visit far more often than others
        n = max(1, int(rng.poisson(model.sessions_per_month * days / 30 * activity)))
        starts = (rng.integers(days, size=n) * 86400.0 + rng.choice(24, size=n, p=_HOUR_WEIGHTS / _HOUR_WEIGHTS.sum())
                  * 3600.0 + rng.uniform(0, 3600, n))
        for t0 in np.sort(starts):
            _simulate_session(ctx, shopper, float(t0))
    events = ctx.log.frame(pd.Timestamp(start, tz="UTC"))
    log.info("simulated %d events (%d sessions, %d orders) for %d users", len(events), ctx.log.sessions,
             ctx.log.orders, n_users)
    return events, _users_frame(shoppers, items, ages, regions)


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _write_bytes(data: bytes, uri: str) -> None:
    if _is_local(uri):  # whole or not at all: a temporary file renamed into place
        fs, path = url_to_fs(uri)
        write_atomic(fs, path, data)
        return
    try:
        with fsspec.open(uri, "wb") as f:
            f.write(data)
    except ImportError:  # no fsspec driver (s3fs, gcsfs): pyarrow ships S3 and GCS itself
        fs, path = pyarrow_filesystem(uri)
        with fs.open_output_stream(path) as f:
            f.write(data)


def _write_table(table: pa.Table, uri: str) -> None:
    fmt, buffer = file_format(uri), io.BytesIO()
    if fmt == "parquet":
        pq.write_table(table, buffer, compression="zstd")
    elif fmt == "csv":
        pacsv.write_csv(table, buffer)
    else:
        buffer.write(pd.DataFrame(table.to_pylist()).to_json(orient="records", lines=True, date_format="iso",
                                                             date_unit="us").encode("utf-8"))
    _write_bytes(buffer.getvalue(), uri)


def write_events(df: pd.DataFrame, uri: str) -> None:
    """Write events (EVENTS_SCHEMA) to a path or URI as Parquet, CSV or JSON Lines, chosen by extension."""
    missing = [name for name in EVENTS_SCHEMA.names if name not in df.columns]
    if missing:
        raise SchemaError(f"events frame lacks column(s) {', '.join(missing)}")
    _write_table(pa.Table.from_pandas(df[EVENTS_SCHEMA.names], schema=EVENTS_SCHEMA, preserve_index=False), uri)


def write_users(users: pd.DataFrame, uri: str) -> None:
    """Write the users frame (USERS_SCHEMA); in CSV the taste lists are joined with "|"."""
    table = pa.Table.from_pandas(users[USERS_SCHEMA.names], schema=USERS_SCHEMA, preserve_index=False)
    if file_format(uri) == "csv":
        for name in ("taste_categories", "taste_brands"):
            joined = pa.array(["|".join(v) for v in table[name].to_pylist()], pa.string())
            table = table.set_column(table.column_names.index(name), name, joined)
    _write_table(table, uri)


def read_events(uri: str) -> pd.DataFrame:
    """Read events written by :func:`write_events` (or any file in EVENTS_SCHEMA); ids come back as str."""
    table = read_table(uri)
    missing = [n for n in ("user_id", "item_id", "event", "ts", "session_id") if n not in table.column_names]
    if missing:
        raise SchemaError(f"events file {uri} lacks column(s) {', '.join(missing)}")
    df = pd.DataFrame({n: ids_as_str(table[n]).to_pylist() for n in ("user_id", "item_id", "session_id")})
    df["event"] = table["event"].to_pylist()
    unknown = sorted(set(df["event"]) - set(EVENT_TYPES))
    if unknown:
        raise SchemaError(f"events file {uri} has unknown event type(s) {unknown}: use {', '.join(EVENT_TYPES)}")
    df["ts"] = pd.to_datetime(table["ts"].to_pandas(), utc=True, format="ISO8601")
    for name in ("order_id", "button", "value"):
        values = table[name].to_pylist() if name in table.column_names else [None] * len(df)
        df[name] = [None if v is None or v == "" else v for v in values]
    try:
        df["value"] = pd.to_numeric(df["value"], errors="raise").astype(float)
    except (TypeError, ValueError) as e:
        raise SchemaError(f"events file {uri}: value must be numeric ({e})") from e
    return pa.Table.from_pandas(df[EVENTS_SCHEMA.names], schema=EVENTS_SCHEMA, preserve_index=False).to_pandas()
