"""Business rules on recommendations: hard filters, boosts, diversity caps and pinned items, as pure functions.

The hard filters (stock, price band, categories) are also rendered as a Milvus expression (``milvus_filter``) so
retrieval only returns admissible items; ``apply_rules`` applies them again after reranking (results from other
sources, stale fields) and adds what a store filter cannot express: seen items, boosts, per-category and per-brand
caps, pinned items.

Missing fields are judged like Milvus judges them: an item whose ``in_stock`` or ``price`` is unknown fails
``in_stock_only`` or a price bound; an item without a category fails an allow-list and passes a deny-list; caps
do not count items without a category (brand).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.errors import ConfigError

log = logging.getLogger(__name__)

BOOST_KINDS = ("brand", "category", "item")  # what a boost key may name: "brand:Acme", "category:Bag", "item:fm-1"
_TUPLES = ("allow_categories", "deny_categories", "pinned")


@dataclass(frozen=True)
class BusinessRules:
    """The merchandising rules of one surface (from YAML/JSON config), optionally narrowed per request."""

    in_stock_only: bool = True  # drop items with in_stock false (or unknown)
    exclude_seen: bool = True  # drop items the user already interacted with / bought
    price_min: float | None = None  # lowest admissible price (inclusive); None: no bound
    price_max: float | None = None  # highest admissible price (inclusive); None: no bound
    allow_categories: tuple[str, ...] = ()  # only these categories; empty = all
    deny_categories: tuple[str, ...] = ()  # never these categories (wins over allow_categories)
    max_per_category: int | None = None  # at most N results per category; None: no cap
    max_per_brand: int | None = None  # at most N results per brand; None: no cap
    pinned: tuple[str, ...] = ()  # item ids placed first, in this order, when they pass the hard filters, unseen
    boosts: Mapping[str, float] = field(default_factory=dict)  # "brand:Acme" / "category:Bag" / "item:x" -> factor > 0

    def __post_init__(self) -> None:
        for name in ("in_stock_only", "exclude_seen"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false. Got {getattr(self, name)!r}")
        for name in ("price_min", "price_max"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ConfigError(f"{name} must be a finite number >= 0 (or null for no bound). Got {value!r}")
        if self.price_min is not None and self.price_max is not None and self.price_min > self.price_max:
            raise ConfigError(f"price_min must not exceed price_max. Got price_min={self.price_min!r}, "
                              f"price_max={self.price_max!r}")
        for name in _TUPLES:
            object.__setattr__(self, name, _names(name, getattr(self, name)))
        for name in ("max_per_category", "max_per_brand"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an integer >= 1 (or null for no cap). Got {value!r}")
        object.__setattr__(self, "boosts", _boosts(self.boosts))

    def __hash__(self) -> int:  # boosts is a dict: hash its items so rules can key a cache
        values = [getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "boosts"]
        return hash((*values, tuple(sorted(self.boosts.items()))))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> BusinessRules:
        """From a YAML/JSON mapping (a Serve ``user_config``); unknown keys are a ConfigError naming them."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ConfigError(f"business rules must be a mapping of setting -> value. Got {type(data).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in data if k not in valid)
        if unknown:
            raise ConfigError(f"unknown business rule(s) {unknown}; valid: {', '.join(valid)}")
        return cls(**dict(data))

    def merged(self, overrides: Mapping[str, Any] | None) -> BusinessRules:
        """These rules narrowed by a request's ``overrides`` (same keys as ``from_mapping``, validated the same way).

        A request can only narrow: price bands and allow-lists intersect, deny-lists and pinned ids add up (the
        request's pins first), caps take the smaller, ``in_stock_only``/``exclude_seen`` hold if either asks,
        boosts are overlaid key by key. An empty intersection (price band or categories) is a ConfigError.
        """
        if not overrides:
            return self
        asked = BusinessRules.from_mapping(overrides)
        given = set(overrides)

        def pick(name: str, combine: Any) -> Any:
            mine, theirs = getattr(self, name), getattr(asked, name)
            if name not in given:
                return mine
            return combine(mine, theirs)

        def tighter(fn: Any) -> Any:
            return lambda a, b: b if a is None else a if b is None else fn(a, b)

        allow = pick("allow_categories", _intersect_allow)
        if self.allow_categories and asked.allow_categories and not allow:
            raise ConfigError(f"allow_categories {list(asked.allow_categories)} share nothing with the configured "
                              f"{list(self.allow_categories)}")
        price_min, price_max = pick("price_min", tighter(max)), pick("price_max", tighter(min))
        if price_min is not None and price_max is not None and price_min > price_max:
            raise ConfigError(f"the requested price band leaves nothing: price_min={price_min!r} > "
                              f"price_max={price_max!r} (configured {self.price_min!r}..{self.price_max!r})")
        return BusinessRules(
            in_stock_only=pick("in_stock_only", lambda a, b: a or b),
            exclude_seen=pick("exclude_seen", lambda a, b: a or b),
            price_min=price_min,
            price_max=price_max,
            allow_categories=allow,
            deny_categories=pick("deny_categories", lambda a, b: tuple(dict.fromkeys((*a, *b)))),
            max_per_category=pick("max_per_category", tighter(min)),
            max_per_brand=pick("max_per_brand", tighter(min)),
            pinned=pick("pinned", lambda a, b: tuple(dict.fromkeys((*b, *a)))),
            boosts=pick("boosts", lambda a, b: {**a, **b}),
        )

    def milvus_filter(self) -> str | None:
        """The hard filters (stock, price band, categories) as a Milvus expression over the catalogue's fields
        ``in_stock``, ``price`` and ``category``; None when there is no hard filter. Strings are JSON-quoted,
        which Milvus parses (quotes and backslashes escaped)."""
        parts = []
        if self.in_stock_only:
            parts.append("in_stock == true")
        if self.price_min is not None:
            parts.append(f"price >= {_number(self.price_min)}")
        if self.price_max is not None:
            parts.append(f"price <= {_number(self.price_max)}")
        if self.allow_categories:
            parts.append(f"category in {_quoted(self.allow_categories)}")
        if self.deny_categories:
            parts.append(f"category not in {_quoted(self.deny_categories)}")
        return " and ".join(parts) or None

    def admits(self, fields: Mapping[str, Any]) -> bool:
        """Whether an item with these fields passes the hard filters (the same test as ``milvus_filter``)."""
        if self.in_stock_only and not _true(fields.get("in_stock")):
            return False
        price = fields.get("price")
        if self.price_min is not None and (price is None or price < self.price_min):
            return False
        if self.price_max is not None and (price is None or price > self.price_max):
            return False
        category = fields.get("category")
        if self.allow_categories and category not in self.allow_categories:
            return False
        return category not in self.deny_categories


@dataclass
class Ranked:
    """One reranked result."""

    item_id: str  # the item
    score: float  # higher is better (after boosts, the boosted score)
    fields: dict  # title, category, brand, price, in_stock, color
    reasons: list[dict]  # why it is here: retrieval sources, model scores, rules applied


def apply_rules(ranked: Sequence[Ranked], rules: BusinessRules, k: int, seen: Collection[str] = (),
                pinned_fields: Mapping[str, dict] | None = None) -> list[Ranked]:
    """The final ``k`` results: hard filters and seen items dropped, boosts applied and the rest re-sorted by score
    (stable), pinned items first, then the others greedily in score order within the caps.

    Inputs are not modified (results are copies). A repeated item id keeps its first occurrence. A pinned item not
    among ``ranked`` needs its fields in ``pinned_fields`` (else it is skipped) and scores 0 before boosts; every
    placed pinned item gains the reason ``{"source": "pinned"}``. Pinned items are placed whatever the caps, but
    count towards them.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ConfigError(f"k must be an integer >= 1. Got {k!r}")
    k = int(k)
    excluded = set(seen) if rules.exclude_seen else set()
    candidates: dict[str, Ranked] = {}
    for r in ranked:
        if r.item_id not in candidates and r.item_id not in excluded and rules.admits(r.fields):
            candidates[r.item_id] = _boosted(r, rules)
    placed: list[Ranked] = []
    for item_id in rules.pinned:
        if item_id in excluded:
            continue
        pin = candidates.pop(item_id, None)
        if pin is None:
            extra = (pinned_fields or {}).get(item_id)
            if extra is None or not rules.admits(extra) or any(r.item_id == item_id for r in ranked):
                log.debug("pinned item %s skipped (filtered out, or no fields given)", item_id)
                continue
            pin = _boosted(Ranked(item_id=item_id, score=0.0, fields=dict(extra), reasons=[]), rules)
        pin.reasons.append({"source": "pinned"})
        placed.append(pin)
    per_category = Counter(r.fields.get("category") for r in placed)
    per_brand = Counter(r.fields.get("brand") for r in placed)
    for r in sorted(candidates.values(), key=lambda r: -r.score):  # sorted() is stable: ties keep their order
        if len(placed) >= k:
            break
        category, brand = r.fields.get("category"), r.fields.get("brand")
        if _capped(category, per_category, rules.max_per_category) or _capped(brand, per_brand, rules.max_per_brand):
            continue
        placed.append(r)
        per_category[category] += 1
        per_brand[brand] += 1
    return placed[:k]


# ----------------------------------------------------------------------------------------------- helpers


def _capped(key: Any, counts: Counter, cap: int | None) -> bool:
    return cap is not None and key is not None and counts[key] >= cap


def _boosted(r: Ranked, rules: BusinessRules) -> Ranked:
    """A copy of ``r`` with its score times every matching boost, each recorded in its reasons."""
    score, reasons = float(r.score), list(r.reasons)
    for kind, value in (("item", r.item_id), ("brand", r.fields.get("brand")), ("category", r.fields.get("category"))):
        key = f"{kind}:{value}"
        if value is not None and key in rules.boosts:
            factor = rules.boosts[key]
            score *= factor
            reasons.append({"rule": "boost", "key": key, "factor": factor})
    return Ranked(item_id=r.item_id, score=score, fields=dict(r.fields), reasons=reasons)


def _true(value: Any) -> bool:
    return value is not None and bool(value) is True


def _intersect_allow(mine: tuple[str, ...], theirs: tuple[str, ...]) -> tuple[str, ...]:
    if not mine:
        return theirs
    if not theirs:
        return mine
    return tuple(c for c in theirs if c in mine)


def _names(name: str, value: Any) -> tuple[str, ...]:
    """A list of non-empty strings as a tuple without repeats; ConfigError echoing anything else."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name} must be a list of strings. Got {value!r}")
    bad = [v for v in value if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ConfigError(f"{name} must hold non-empty strings. Got {bad[0]!r} in {list(value)!r}")
    return tuple(dict.fromkeys(value))


def _boosts(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"boosts must be a mapping like {{'brand:Acme': 1.5}}. Got {value!r}")
    out: dict[str, float] = {}
    for key, factor in value.items():
        kind, _, name = key.partition(":") if isinstance(key, str) else ("", "", "")
        if kind not in BOOST_KINDS or not name:
            raise ConfigError(f"boost key must be one of {', '.join(k + ':<name>' for k in BOOST_KINDS)}. Got {key!r}")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) \
                or factor <= 0:
            raise ConfigError(f"boost {key!r} must be a finite factor > 0. Got {factor!r}")
        out[key] = float(factor)
    return out


def _number(x: float) -> str:
    text = repr(float(x))
    return text if "e" not in text else f"{x:.12f}".rstrip("0").rstrip(".")


def _quoted(names: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(n, ensure_ascii=False) for n in names) + "]"
