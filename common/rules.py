"""Frequently-bought-together: baskets from events, bounded FP-Growth rule mining, and the BoughtTogether scorer.

Mining uses mlxtend (``fpgrowth`` + ``association_rules``) behind guards against its known blow-ups:

* rare items are pruned before the basket table is built. Items bought in fewer than ``min_support * baskets``
  baskets cannot be in a frequent itemset, so that much pruning never changes the rules; ``min_item_count``
  may prune more (which can change them);
* the table is sparse (``pd.DataFrame.sparse.from_spmatrix``), but mlxtend 0.25's ``fpgrowth`` still makes one
  dense bool copy of it (``df.values`` in ``setup_fptree``; rasbt/mlxtend #837): its size, baskets x items
  bytes, is checked against ``max_table_cells`` *before* anything is built;
* ``max_len`` caps itemset length and ``max_basket_len`` caps basket length (long baskets make FP-Growth
  enumerate every subset of a long path, #909); capped baskets are counted.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from fsspec.core import url_to_fs

from common.errors import ConfigError
from common.events import EventWeights

log = logging.getLogger(__name__)

BASKET_SOURCES = ("auto", "orders", "session_bag", "session_positive")
LONG_BASKETS = ("truncate", "skip")
ON_OVERSIZE = ("raise", "prune")
RULE_COLUMNS = ("antecedents", "consequents", "support", "confidence", "lift")
RULES_FILE, POPULARITY_FILE, COOCCURRENCE_FILE = "rules.parquet", "popularity.parquet", "cooccurrence.parquet"


class BasketTableTooLargeError(ConfigError):
    """The one-hot basket table would exceed the configured memory bound (the message names what to change)."""


@dataclass(frozen=True)
class RulesConfig:
    """What counts as a basket and a rule, and the bounds that keep mining inside memory."""

    min_support: float = 0.001  # itemsets in at least this share of baskets, in (0, 1]
    min_confidence: float = 0.1  # P(consequent | antecedent), in [0, 1]
    min_lift: float = 1.0  # confidence / P(consequent), >= 0; 1 = no better than chance
    max_len: int = 3  # longest itemset mined (antecedent + consequent), >= 2
    min_item_count: int = 2  # items in fewer baskets are dropped before the table is built, >= 1
    max_basket_len: int = 50  # longer baskets are truncated or skipped (see long_baskets), >= 2
    long_baskets: str = "truncate"  # "truncate" (keep the first max_basket_len items in event order) or "skip"
    max_table_cells: int = 200_000_000  # baskets x items bound (= bytes of mlxtend's dense bool copy), >= 1
    on_oversize: str = "raise"  # over max_table_cells: "raise", or "prune" (raise min_item_count, logged)
    basket_source: str = "auto"  # "orders", "session_bag", "session_positive"; auto: orders if the data has any

    def __post_init__(self) -> None:
        if not 0 < self.min_support <= 1:
            raise ConfigError(f"min_support must be in (0, 1]. Got {self.min_support!r}")
        if not 0 <= self.min_confidence <= 1:
            raise ConfigError(f"min_confidence must be in [0, 1]. Got {self.min_confidence!r}")
        if not self.min_lift >= 0:
            raise ConfigError(f"min_lift must be >= 0. Got {self.min_lift!r}")
        for name, low in (("max_len", 2), ("min_item_count", 1), ("max_basket_len", 2), ("max_table_cells", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}. Got {value!r}")
        for name, valid in (("long_baskets", LONG_BASKETS), ("on_oversize", ON_OVERSIZE),
                            ("basket_source", BASKET_SOURCES)):
            if getattr(self, name) not in valid:
                raise ConfigError(f"{name} must be one of {', '.join(valid)}. Got {getattr(self, name)!r}")


# ---------------------------------------------------------------------------------------------- baskets

def resolve_basket_source(events: pd.DataFrame, source: str = "auto") -> str:
    """``auto`` -> ``orders`` when any purchase carries an ``order_id``, else ``session_bag``."""
    if source not in BASKET_SOURCES:
        raise ConfigError(f"basket_source must be one of {', '.join(BASKET_SOURCES)}. Got {source!r}")
    if source != "auto":
        return source
    has_orders = bool(((events["event"] == "purchase") & events["order_id"].notna()).any())
    return "orders" if has_orders else "session_bag"


def baskets_from_events(events: pd.DataFrame, source: str = "auto") -> list[list[str]]:
    """Baskets (item ids, each once, in event order) from validated events (``common.events`` schema).

    ``orders``: purchases grouped by ``order_id``; ``session_bag``: add_to_bag and purchase events grouped by
    ``session_id``; ``session_positive``: every event with a positive default weight (views, hearts, bags,
    purchases, ratings; "not interested" clicks excluded) grouped by session. Baskets come sorted by their key.
    """
    source = resolve_basket_source(events, source)
    if source == "orders":
        rows, key = events[(events["event"] == "purchase") & events["order_id"].notna()], "order_id"
    elif source == "session_bag":
        rows, key = events[events["event"].isin(["add_to_bag", "purchase"])], "session_id"
    else:
        rows, key = events[EventWeights().weigh(events) > 0], "session_id"
    rows = rows[rows[key].notna()].sort_values([key, "ts"], kind="stable").drop_duplicates([key, "item_id"])
    return [list(g) for _, g in rows.groupby(key, sort=True)["item_id"]]


def cap_baskets(baskets: Sequence[Sequence[str]], max_len: int, mode: str = "truncate",
                ) -> tuple[list[list[str]], int, int]:
    """(baskets deduplicated and capped at ``max_len`` items, how many were truncated, how many skipped)."""
    out, truncated, skipped = [], 0, 0
    for basket in baskets:
        items = list(dict.fromkeys(str(i) for i in basket))
        if len(items) > max_len:
            if mode == "skip":
                skipped += 1
                continue
            items, truncated = items[:max_len], truncated + 1
        out.append(items)
    return out, truncated, skipped


def support_count(min_support: float, n_baskets: int) -> int:
    """The fewest baskets ``c`` with ``c / n_baskets >= min_support`` (Apriori's float test, done exactly)."""
    c = max(1, math.ceil(min_support * n_baskets))
    while c > 1 and (c - 1) / n_baskets >= min_support:
        c -= 1
    while c / n_baskets < min_support:
        c += 1
    return c


def basket_matrix(baskets: Sequence[Sequence[str]], items: Sequence[str]) -> sp.csr_matrix:
    """Baskets x ``items`` bool CSR matrix; ids not in ``items`` are ignored."""
    index = {item: j for j, item in enumerate(items)}
    cols = [[index[i] for i in b if i in index] for b in baskets]
    indptr = np.cumsum([0] + [len(c) for c in cols])
    indices = np.fromiter((j for c in cols for j in c), dtype=np.int64, count=int(indptr[-1]))
    data = np.ones(len(indices), dtype=bool)
    return sp.csr_matrix((data, indices, indptr), shape=(len(baskets), len(items)))


def one_hot(matrix: sp.csr_matrix, items: Sequence[str], sparse: bool = True) -> pd.DataFrame:
    """The bool DataFrame mlxtend takes: Sparse[bool] columns (``sparse``) or a dense one."""
    columns = [str(i) for i in items]
    if sparse:
        return pd.DataFrame.sparse.from_spmatrix(matrix, columns=columns)
    return pd.DataFrame(matrix.toarray(), columns=columns)


# ---------------------------------------------------------------------------------------------- mining

@dataclass(frozen=True)
class RulesMining:
    """Rules (RULE_COLUMNS, antecedents/consequents as sorted lists of str) and what mining counted."""

    rules: pd.DataFrame
    baskets: int  # baskets mined (after skipping long ones): the support denominator
    table_rows: int  # baskets with at least one kept item (the rows of the one-hot table)
    items_kept: int
    items_pruned: int
    baskets_truncated: int
    baskets_skipped: int
    itemsets: int  # frequent itemsets found (all lengths)
    min_count: int  # the item count threshold applied (min_item_count, raised by min_support or by "prune")


def _items_for_count(counts: Counter, threshold: int) -> list[str]:
    return sorted(i for i, c in counts.items() if c >= threshold)


def _fit_threshold(counts: Counter, threshold: int, rows: int, max_cells: int) -> int:
    """The smallest item-count threshold >= ``threshold`` whose table (at most ``rows`` rows) fits ``max_cells``."""
    for t in sorted({c for c in counts.values() if c >= threshold}) + [max(counts.values(), default=0) + 1]:
        if rows * sum(1 for c in counts.values() if c >= t) <= max_cells:
            return t
    return threshold


def _check_size(cfg: RulesConfig, counts: Counter, threshold: int, rows: int, n_items: int) -> int:
    """Enforce ``max_table_cells`` before building the table; returns the (maybe raised) item threshold."""
    cells = rows * n_items
    if cells <= cfg.max_table_cells:
        return threshold
    fit = _fit_threshold(counts, threshold, rows, cfg.max_table_cells)
    if cfg.on_oversize == "raise":
        raise BasketTableTooLargeError(
            f"basket table of {rows:,} baskets x {n_items:,} items = {cells:,} cells exceeds max_table_cells="
            f"{cfg.max_table_cells:,} (mlxtend makes a dense bool copy: ~{cells / 2**20:,.0f} MiB); raise "
            f"min_item_count to {fit} (or min_support), or raise max_table_cells, or set on_oversize='prune'")
    log.warning("RULES: basket table %d x %d = %d cells exceeds max_table_cells=%d; on_oversize='prune' raises "
                "the item threshold from %d to %d baskets: rules about rarer items are LOST",
                rows, n_items, cells, cfg.max_table_cells, threshold, fit)
    return fit


def empty_rules() -> pd.DataFrame:
    return pd.DataFrame({"antecedents": pd.Series([], dtype=object), "consequents": pd.Series([], dtype=object),
                         "support": pd.Series([], dtype=float), "confidence": pd.Series([], dtype=float),
                         "lift": pd.Series([], dtype=float)})


def _tidy_rules(rules: pd.DataFrame) -> pd.DataFrame:
    """RULE_COLUMNS with sorted lists of str, in a deterministic order (confidence, lift, then names)."""
    if rules.empty:
        return empty_rules()
    out = pd.DataFrame({"antecedents": [sorted(map(str, a)) for a in rules["antecedents"]],
                        "consequents": [sorted(map(str, c)) for c in rules["consequents"]],
                        "support": rules["support"].to_numpy(float), "confidence": rules["confidence"].to_numpy(float),
                        "lift": rules["lift"].to_numpy(float)})
    key = out["antecedents"].map("\x1f".join) + "\x1e" + out["consequents"].map("\x1f".join)
    order = np.lexsort((key.to_numpy(), -out["lift"].to_numpy(), -out["confidence"].to_numpy()))
    return out.iloc[order].reset_index(drop=True)


def mine_rules(baskets: Sequence[Sequence[str]], cfg: RulesConfig, sparse: bool = True) -> RulesMining:
    """Association rules over ``baskets`` with the bounds of ``cfg`` (see the module docstring)."""
    from mlxtend.frequent_patterns import association_rules, fpgrowth

    capped, truncated, skipped = cap_baskets(baskets, cfg.max_basket_len, cfg.long_baskets)
    n = len(capped)
    counts = Counter(i for b in capped for i in b)
    min_count = support_count(cfg.min_support, n) if n else 1
    threshold = max(cfg.min_item_count, min_count)
    kept = set(_items_for_count(counts, threshold))
    rows = sum(1 for b in capped if any(i in kept for i in b))
    threshold = _check_size(cfg, counts, threshold, rows, len(kept))
    items = _items_for_count(counts, threshold)
    kept = set(items)
    table = [[i for i in b if i in kept] for b in capped]
    table = [b for b in table if b]  # empty rows only dilute support: their count is put back below

    def result(rules: pd.DataFrame, itemsets: int) -> RulesMining:
        return RulesMining(rules=rules, baskets=n, table_rows=len(table), items_kept=len(items),
                           items_pruned=len(counts) - len(items), baskets_truncated=truncated,
                           baskets_skipped=skipped, itemsets=itemsets, min_count=threshold)

    if not table or min_count > len(table):
        return result(empty_rules(), 0)
    df = one_hot(basket_matrix(table, items), items, sparse)
    # mlxtend keeps itemsets with count >= ceil(s * rows): (min_count - 0.5) / rows makes that min_count exactly.
    found = fpgrowth(df, min_support=(min_count - 0.5) / len(table), use_colnames=True, max_len=cfg.max_len)
    found["support"] = np.rint(found["support"].to_numpy() * len(table)) / n  # counts over every basket
    log.info("fpgrowth: %d baskets (%d in the table) x %d items -> %d frequent itemsets",
             n, len(table), len(items), len(found))
    if not (found["itemsets"].map(len) > 1).any():
        return result(empty_rules(), len(found))
    with np.errstate(divide="ignore", invalid="ignore"):  # metrics we drop (certainty) divide by zero at lift 1
        rules = association_rules(found, num_itemsets=n, metric="confidence", min_threshold=cfg.min_confidence)
    rules = rules[rules["lift"] >= cfg.min_lift]
    return result(_tidy_rules(rules), len(found))


# ---------------------------------------------------------------------------------------------- fallbacks

def basket_stats(baskets: Sequence[Sequence[str]], max_neighbours: int = 100) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(popularity: item_id, baskets; co-occurrence: item_id, other_id, baskets — the ``max_neighbours`` most
    frequent partners of each item), over every item. Pass capped baskets: a basket of L items adds L^2 pairs."""
    items = sorted({str(i) for b in baskets for i in b})
    x = basket_matrix([[str(i) for i in b] for b in baskets], items).astype(np.int32)
    pop = pd.DataFrame({"item_id": items, "baskets": np.asarray(x.sum(axis=0)).ravel().astype(np.int64)})
    co = (x.T @ x).tocoo()
    off = co.row != co.col
    pairs = pd.DataFrame({"a": co.row[off], "b": co.col[off], "baskets": co.data[off].astype(np.int64)})
    pairs = pairs.sort_values(["a", "baskets", "b"], ascending=[True, False, True], kind="stable")
    pairs = pairs.groupby("a", sort=False).head(max_neighbours)
    names = np.asarray(items, dtype=object)
    cooc = pd.DataFrame({"item_id": names[pairs["a"].to_numpy()], "other_id": names[pairs["b"].to_numpy()],
                         "baskets": pairs["baskets"].to_numpy()}).reset_index(drop=True)
    return pop, cooc


# ---------------------------------------------------------------------------------------------- the scorer

RULES_SCHEMA = pa.schema([("antecedents", pa.list_(pa.string())), ("consequents", pa.list_(pa.string())),
                          ("support", pa.float64()), ("confidence", pa.float64()), ("lift", pa.float64())])


class Recommendation(NamedTuple):
    item_id: str
    score: float  # rules in (2, 3), co-occurrence in [1, 2), popularity in [0, 1): higher = better
    reason: str  # the rule (with its confidence and lift) or the fallback that put the item here
    lift: float | None = None  # the rule's lift (None for the co-occurrence and popularity fallbacks)
    because: tuple[str, ...] = ()  # the query items the rule or co-occurrence starts from


class BoughtTogether:
    """Items to buy with a basket: association rules first (by confidence, then lift), then item co-occurrence,
    then popularity. One object serves requests (``recommend``) and the evaluation harness (``scores``)."""

    def __init__(self, rules: pd.DataFrame, popularity: pd.DataFrame, cooccurrence: pd.DataFrame) -> None:
        self.rules = _tidy_rules(rules) if len(rules) else empty_rules()
        self.popularity = popularity.sort_values(["baskets", "item_id"], ascending=[False, True]).reset_index(drop=True)
        self.cooccurrence = cooccurrence.reset_index(drop=True)
        keys = sorted(set(zip(self.rules["confidence"], self.rules["lift"])))
        rank = {key: r for r, key in enumerate(keys, start=1)}
        self._rule_score = [2.0 + rank[(c, l)] / (len(keys) + 1)
                            for c, l in zip(self.rules["confidence"], self.rules["lift"])]
        self._by_item: dict[str, list[int]] = {}
        for r, antecedent in enumerate(self.rules["antecedents"]):
            for item in antecedent:
                self._by_item.setdefault(item, []).append(r)
        self._pop = dict(zip(self.popularity["item_id"], self.popularity["baskets"].astype(int)))
        self._pop_max = max(self._pop.values(), default=0)
        self._co: dict[str, dict[str, int]] = {}
        for a, b, c in zip(self.cooccurrence["item_id"], self.cooccurrence["other_id"], self.cooccurrence["baskets"]):
            self._co.setdefault(a, {})[b] = int(c)
        self._co_max = int(self.cooccurrence["baskets"].max()) if len(self.cooccurrence) else 0

    @classmethod
    def from_baskets(cls, baskets: Sequence[Sequence[str]], rules: pd.DataFrame,
                     max_neighbours: int = 100) -> BoughtTogether:
        pop, cooc = basket_stats(baskets, max_neighbours)
        return cls(rules, pop, cooc)

    @classmethod
    def load(cls, folder: str) -> BoughtTogether:
        """From a folder (path or URI) written by ``save`` (the ``mine_rules`` job's version folder)."""
        base = folder.rstrip("/")
        rules = pd.read_parquet(f"{base}/{RULES_FILE}")
        for column in ("antecedents", "consequents"):
            rules[column] = rules[column].map(list)
        return cls(rules, pd.read_parquet(f"{base}/{POPULARITY_FILE}"), pd.read_parquet(f"{base}/{COOCCURRENCE_FILE}"))

    def save(self, folder: str) -> dict[str, str]:
        """Write the three tables as Parquet into ``folder``; returns their URIs."""
        fs, path = url_to_fs(folder)
        fs.makedirs(path, exist_ok=True)
        rules = pa.Table.from_pydict({c: self.rules[c].tolist() for c in RULE_COLUMNS}, schema=RULES_SCHEMA)
        tables = {RULES_FILE: rules, POPULARITY_FILE: pa.Table.from_pandas(self.popularity, preserve_index=False),
                  COOCCURRENCE_FILE: pa.Table.from_pandas(self.cooccurrence, preserve_index=False)}
        for name, table in tables.items():
            pq.write_table(table, f"{path}/{name}", filesystem=fs)
        return {name: f"{folder.rstrip('/')}/{name}" for name in tables}

    def _pop_score(self, item: str) -> float:
        return self._pop.get(item, 0) / (self._pop_max + 1)

    def recommend(self, items: Sequence[str], k: int, exclude: Sequence[str] = ()) -> list[Recommendation]:
        """The ``k`` best items to add to a basket holding ``items``, never one of ``items`` or ``exclude``."""
        if k < 1:
            raise ConfigError(f"k must be >= 1. Got {k!r}")
        query = {str(i) for i in items}
        banned = query | {str(i) for i in exclude}
        best: dict[str, Recommendation] = {}
        for r in sorted({r for q in query for r in self._by_item.get(q, ())}):
            antecedent, consequent = self.rules.at[r, "antecedents"], self.rules.at[r, "consequents"]
            if not set(antecedent) <= query:
                continue
            reason = (f"rule {' + '.join(antecedent)} -> {' + '.join(consequent)} (confidence "
                      f"{self.rules.at[r, 'confidence']:.3f}, lift {self.rules.at[r, 'lift']:.2f})")
            for item in consequent:
                if item not in banned and (item not in best or best[item].score < self._rule_score[r]):
                    best[item] = Recommendation(item, self._rule_score[r], reason,
                                                float(self.rules.at[r, "lift"]), tuple(antecedent))
        together: Counter = Counter()
        partners: dict[str, list[str]] = {}
        for q in sorted(query):
            fresh = {o: c for o, c in self._co.get(q, {}).items() if o not in banned and o not in best}
            together.update(fresh)
            for o in fresh:
                partners.setdefault(o, []).append(q)
        scale = len(query) * self._co_max + 1
        for item, c in together.items():
            best[item] = Recommendation(item, 1.0 + c / scale, f"co-occurrence: in {c} basket(s) with the query",
                                        None, tuple(partners[item]))
        ranked = sorted(best.values(), key=lambda r: (-r.score, r.item_id))[:k]
        for item in self.popularity["item_id"]:
            if len(ranked) >= k:
                break
            if item not in banned and item not in best:
                ranked.append(Recommendation(item, self._pop_score(item),
                                             f"popularity: in {self._pop[item]} basket(s)"))
        return ranked

    def scores(self, query_items: Sequence[str], items: Sequence[str]) -> np.ndarray:
        """[len(query_items), len(items)] float scores of each item for a one-item query (higher = better):
        rules (2, 3) > co-occurrence [1, 2) > popularity [0, 1); the query item itself scores -1."""
        col = {str(i): j for j, i in enumerate(items)}
        base = np.array([self._pop_score(str(i)) for i in items], dtype=np.float64)
        out = np.empty((len(query_items), len(items)), dtype=np.float64)
        for row, q in enumerate(map(str, query_items)):
            out[row] = base
            for other, c in self._co.get(q, {}).items():
                if other in col:
                    out[row, col[other]] = 1.0 + c / (self._co_max + 1)
            for r in self._by_item.get(q, ()):
                if len(self.rules.at[r, "antecedents"]) == 1:
                    for item in self.rules.at[r, "consequents"]:
                        if item in col:
                            out[row, col[item]] = max(out[row, col[item]], self._rule_score[r])
            if q in col:
                out[row, col[q]] = -1.0
        return out
