"""Interaction events: the documented schema, validation with quarantine, and the event -> weight mapping.

An events file (Parquet, CSV or JSON Lines) has one row per interaction:

* ``user_id``, ``item_id`` (strings; integers are converted), ``event`` (one of ``EVENT_TYPES``), ``ts``
  (a timestamp, an ISO-8601 string or epoch seconds) are required;
* ``session_id`` is optional: missing sessions are cut at ``SESSION_GAP`` of inactivity per user;
* ``order_id`` (a checkout: purchases that share it form one basket), ``button`` (the UI element, which can
  refine the weight) and ``value`` (price paid, amount refunded, or the stars of a ``rating``) are optional;
* ``event_id`` is optional: the client's id for the event, which makes sending it again harmless (the event log
  keeps one event per user and ``event_id``: ``common/event_log.py``). The validators carry it when asked
  (``with_ids``); the training schema, ``EVENTS_SCHEMA``, does not hold it.

Rows that cannot be used are returned apart with a ``reason`` column (quarantine), never dropped silently.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from common.catalog import ids_as_str, read_table
from common.errors import ConfigError, SchemaError

log = logging.getLogger(__name__)

#: Positive feedback in funnel order, explicit ratings, then the two negative kinds.
EVENT_TYPES: tuple[str, ...] = ("view", "wishlist", "add_to_bag", "purchase", "rating", "dislike", "return")
EVENTS_SCHEMA = pa.schema([
    ("user_id", pa.string()),  # "u-0001"
    ("item_id", pa.string()),
    ("event", pa.string()),  # one of EVENT_TYPES
    ("ts", pa.timestamp("us", tz="UTC")),
    ("session_id", pa.string()),  # one visit; derived from SESSION_GAP when the file has none
    ("order_id", pa.string()),  # purchases (and their returns) only; shared by one checkout
    ("button", pa.string()),  # UI element: "heart", "add_to_bag", "quick_add", "not_interested", "checkout"
    ("value", pa.float64()),  # purchase: price paid; return: amount refunded; rating: the stars; else null
])
REQUIRED_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "event", "ts")
EVENT_ID = "event_id"  # optional client id of an event (idempotent appends), after the EVENTS_SCHEMA columns
SESSION_GAP = pd.Timedelta(minutes=30)  # a pause this long starts a new session when the file names none
AGE_GROUPS: tuple[tuple[int, str], ...] = ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"),
                                           (55, "45-54"), (200, "55+"))

_DEFAULT_WEIGHTS = MappingProxyType({"view": 1.0, "wishlist": 2.0, "add_to_bag": 3.0, "purchase": 4.0,
                                     "rating": 1.0, "dislike": -2.0, "return": -3.0})
_DEFAULT_BUTTONS = MappingProxyType({"not_interested": -2.0})


@dataclass(frozen=True)
class EventWeights:
    """How much each event says about a shopper's taste (negative = dislike), as in the source projects."""

    events: Mapping[str, float] = field(default_factory=lambda: dict(_DEFAULT_WEIGHTS))  # event -> weight
    buttons: Mapping[str, float] = field(default_factory=lambda: dict(_DEFAULT_BUTTONS))  # button -> overriding weight
    rating_center: float | None = None  # a rating weighs (stars - center) when set, else events["rating"]

    def __post_init__(self) -> None:
        unknown = sorted(set(self.events) - set(EVENT_TYPES))
        if unknown:
            raise ConfigError(f"event weights name unknown event(s) {unknown}: use {', '.join(EVENT_TYPES)}")
        for name, w in {**self.events, **self.buttons}.items():
            if not isinstance(w, (int, float)) or not np.isfinite(w):
                raise ConfigError(f"event weight for {name!r} must be a finite number. Got {w!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> EventWeights:
        """From config: ``{"events": {...}, "buttons": {...}, "rating_center": 3}``; missing events keep defaults."""
        data = dict(data or {})
        extra = sorted(set(data) - {"events", "buttons", "rating_center"})
        if extra:
            raise ConfigError(f"unknown event-weight setting(s) {extra}: use events, buttons, rating_center")
        return cls(events={**_DEFAULT_WEIGHTS, **(data.get("events") or {})},
                   buttons={**_DEFAULT_BUTTONS, **(data.get("buttons") or {})},
                   rating_center=data.get("rating_center"))

    def weigh(self, events: pd.DataFrame) -> np.ndarray:
        """One float32 weight per event row; a known ``button`` overrides its event's weight."""
        w = np.array(events["event"].map(dict(self.events)).fillna(0.0), dtype=np.float64)
        if self.rating_center is not None and "value" in events:
            is_rating = (events["event"] == "rating").to_numpy() & events["value"].notna().to_numpy()
            w[is_rating] = events["value"].to_numpy(np.float64)[is_rating] - self.rating_center
        if "button" in events and self.buttons:
            by_button = events["button"].map(dict(self.buttons)).to_numpy(np.float64)
            has = ~np.isnan(by_button)
            w[has] = by_button[has]
        return w.astype(np.float32)


@dataclass(frozen=True)
class EventsValidation:
    """Usable events (EVENTS_SCHEMA columns, sorted by user and time) and quarantined rows with a reason."""

    valid: pd.DataFrame
    quarantine: pd.DataFrame

    def summary(self) -> str:
        if self.quarantine.empty:
            return f"{len(self.valid)} events, none quarantined"
        reasons = self.quarantine["reason"].str.split(":").str[0].value_counts().to_dict()
        return f"{len(self.valid)} events, {len(self.quarantine)} quarantined {reasons}"


def _parse_ts(values: pd.Series) -> pd.Series:
    """Timestamps, ISO strings or epoch seconds -> UTC datetimes (NaT where unparseable)."""
    if pd.api.types.is_datetime64_any_dtype(values):
        return pd.to_datetime(values, utc=True)
    numeric = pd.to_numeric(values, errors="coerce")
    as_epoch = pd.to_datetime(numeric, unit="s", utc=True, errors="coerce")
    as_text = pd.to_datetime(values.where(numeric.isna()).astype("string"), utc=True, errors="coerce",
                             format="ISO8601")
    return as_epoch.fillna(as_text)


def _sessions(df: pd.DataFrame) -> pd.Series:
    """``user_id + '/' + n``: a new session after SESSION_GAP of inactivity (df sorted by user, ts)."""
    new_user = df["user_id"].ne(df["user_id"].shift())
    gap = df["ts"].diff().gt(SESSION_GAP)
    n = (new_user | gap).cumsum()
    return df["user_id"] + "/" + n.astype(str)


def _blank(values: pd.Series) -> pd.Series:
    return values.isna() | values.astype("string").str.strip().eq("")


def validate_events(frame: pd.DataFrame | pa.Table, known_items: set[str] | None = None,
                    with_ids: bool = False) -> EventsValidation:
    """Check every row; return usable events in EVENTS_SCHEMA and the rest with their reason.

    Reasons: ``missing user_id``, ``missing item_id``, ``unknown event 'x'``, ``bad ts 'x'``, ``bad value 'x'``,
    and ``unknown item 'x'`` when ``known_items`` (the catalogue's ids) is given. ``with_ids``: the valid events
    carry ``event_id`` too (a string, None where absent or blank).
    """
    if isinstance(frame, pd.DataFrame):  # mixed-type object columns (ids, times) become strings first
        mixed = {c: "string" for c in frame.columns if frame[c].dtype == object}
        frame = pa.Table.from_pandas(frame.astype(mixed), preserve_index=False)
    table = frame
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise SchemaError(f"events lack column(s) {', '.join(missing)}; the schema is {', '.join(EVENTS_SCHEMA.names)}")
    df = pd.DataFrame({c: ids_as_str(table[c]).to_pandas() for c in ("user_id", "item_id")})
    for c in ("session_id", "order_id", "button") + ((EVENT_ID,) if with_ids else ()):
        df[c] = (ids_as_str(table[c]).to_pandas() if c in table.column_names else pd.Series([None] * len(df)))
        df[c] = df[c].where(~_blank(df[c]), None)
    df["event"] = table["event"].to_pandas().astype("string").str.strip().str.lower()
    raw_ts = table["ts"].to_pandas()
    df["ts"] = _parse_ts(raw_ts)
    raw_value = table["value"].to_pandas() if "value" in table.column_names else pd.Series([None] * len(df))
    df["value"] = pd.to_numeric(raw_value, errors="coerce")
    reason = pd.Series(pd.NA, index=df.index, dtype="string")

    def flag(mask: pd.Series, text: pd.Series | str) -> None:
        nonlocal reason
        reason = reason.mask(mask & reason.isna(), text)

    flag(_blank(df["user_id"]), "missing user_id")
    flag(_blank(df["item_id"]), "missing item_id")
    flag(~df["event"].isin(EVENT_TYPES), "unknown event '" + df["event"].fillna("") + "'")
    flag(df["ts"].isna(), "bad ts '" + raw_ts.astype("string").fillna("") + "'")
    flag(df["value"].isna() & ~_blank(raw_value.astype("string")), "bad value '" + raw_value.astype("string") + "'")
    if known_items is not None:
        flag(~df["item_id"].isin(known_items), "unknown item '" + df["item_id"].fillna("") + "'")
    bad = reason.notna()
    quarantine = table.to_pandas()[bad.to_numpy()].assign(reason=reason[bad].to_numpy())
    valid = df[~bad].sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)
    if valid["session_id"].isna().any():
        valid["session_id"] = valid["session_id"].fillna(_sessions(valid))
    valid = valid[EVENTS_SCHEMA.names + ([EVENT_ID] if with_ids else [])]
    if len(quarantine):
        log.warning("events: %d row(s) quarantined (%s)", len(quarantine),
                    quarantine["reason"].str.split(" '").str[0].value_counts().to_dict())
    return EventsValidation(valid=valid, quarantine=quarantine.reset_index(drop=True))


#: validate_records handles batches up to this size; bigger ones are cheaper through validate_events.
RECORDS_MAX = 256
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?)?(?:Z|[+-]\d{2}:\d{2})?")
_OPTIONAL_TEXT = ("session_id", "order_id", "button")
_FIELDS = frozenset(EVENTS_SCHEMA.names) | {EVENT_ID}


def validate_records(records: Sequence[Mapping[str, Any]], known_items: set[str] | None = None,
                     default_ts: datetime | None = None, with_ids: bool = False) -> EventsValidation | None:
    """``validate_events`` for a small batch of plain records (what ``POST /events`` sends), row by row in Python.

    The same checks and the same events come out (``tests/common/test_events.py`` holds it to validate_events),
    without pandas' fixed cost per operation, which on a one-event batch was ~25 ms of CPU. Returns None, and
    the caller runs ``validate_events`` (which quarantines with reasons), when any record is invalid or outside
    the plain form: keys of EVENTS_SCHEMA only, str ids and event, ``ts`` None or an ISO-8601 string (at most
    microseconds), ``value`` a float or None, ``event_id`` a str or None. ``default_ts`` is the time given to
    records without ``ts`` (naive = UTC). ``with_ids``: the valid events carry ``event_id`` too.
    """
    if not 0 < len(records) <= RECORDS_MAX:
        return None
    rows = []
    for position, r in enumerate(records):
        if not isinstance(r, Mapping) or not _FIELDS.issuperset(r):
            return None
        user, item, event = r.get("user_id"), r.get("item_id"), r.get("event")
        if not (isinstance(user, str) and isinstance(item, str) and isinstance(event, str)) \
                or not user.strip() or not item.strip():
            return None
        event = event.strip().lower()
        if event not in EVENT_TYPES or (known_items is not None and item not in known_items):
            return None
        ts = _iso_time(r.get("ts"), default_ts)
        value = r.get("value")
        if ts is None or not (value is None or type(value) is float):
            return None
        text = [r.get(c) for c in _OPTIONAL_TEXT + (EVENT_ID,)]
        if not all(t is None or isinstance(t, str) for t in text):
            return None
        text = [t if t is not None and t.strip() else None for t in text]
        rows.append((user, ts, position, item, event, *text, value))
    rows.sort(key=lambda row: row[:3])  # by user and time, ties in batch order (validate_events' stable sort)
    sessions, n, previous = [], 0, None
    for user, ts, *_ in rows:  # validate_events' _sessions: one counter over the batch
        if previous is None or user != previous[0] or ts - previous[1] > SESSION_GAP:
            n += 1
        sessions.append(f"{user}/{n}")
        previous = (user, ts)
    columns = list(zip(*rows))
    valid = pa.table({
        "user_id": pa.array(columns[0], pa.string()), "item_id": pa.array(columns[3], pa.string()),
        "event": pa.array(columns[4], pa.string()), "ts": pa.array(columns[1], pa.timestamp("us", tz="UTC")),
        "session_id": pa.array([s if s is not None else d for s, d in zip(columns[5], sessions)], pa.string()),
        "order_id": pa.array(columns[6], pa.string()), "button": pa.array(columns[7], pa.string()),
        "value": pa.array(columns[9], pa.float64()),
    }, schema=EVENTS_SCHEMA)
    if with_ids:
        valid = valid.append_column(EVENT_ID, pa.array(columns[8], pa.string()))
    return EventsValidation(valid=valid.to_pandas(), quarantine=pd.DataFrame({"reason": pd.Series([], dtype=str)}))


def _iso_time(value: Any, default: datetime | None) -> pd.Timestamp | None:
    """An ISO-8601 string (naive = UTC) or a blank -> UTC time; None for anything validate_records leaves alone."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if default is None:
            return None
        t = pd.Timestamp(default)
        return (t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")).floor("us")
    if not isinstance(value, str) or not _ISO.fullmatch(value):
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    return pd.Timestamp(t if t.tzinfo else t.replace(tzinfo=timezone.utc)).tz_convert("UTC")


def rows_as_text(rows: pd.DataFrame) -> pa.Table:
    """Rows as text columns (None where a value is missing): the stable schema a quarantine file keeps whatever
    types the rejected rows held (a bad row's column may mix numbers, strings and times)."""
    return pa.table({c: pa.array([None if is_missing(v) else str(v) for v in rows[c]], pa.string())
                     for c in rows.columns})


def is_missing(v: object) -> bool:
    """None, pandas' NA or NaT, or a float NaN."""
    return v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and v != v)


def load_events(uri: str, known_items: set[str] | None = None) -> EventsValidation:
    """Read an events file (Parquet, CSV or JSON Lines; local path or URI), or the event log the service appends to
    (a folder of ``date=*/part-*.parquet``, each ``event_id`` once: ``common.event_log``), and validate it."""
    from common.event_log import EventLog, is_event_log  # the log builds on this module

    if is_event_log(uri):
        return validate_events(EventLog(uri).read(), known_items)
    return validate_events(read_table(uri), known_items)


def age_group(age: Any) -> str:
    """An age in years -> its group label ("unknown" when missing or implausible)."""
    try:
        a = float(age)
    except (TypeError, ValueError):
        return "unknown"
    if not 0 < a < 120:
        return "unknown"
    return next(label for bound, label in AGE_GROUPS if a < bound)


def user_segments(users: pd.DataFrame) -> pd.Series:
    """``user_id -> "age_group|region"`` from optional user features (``age``, ``region``), for popularity by segment."""
    age = users["age"].map(age_group) if "age" in users else pd.Series("unknown", index=users.index)
    region = users["region"].fillna("unknown").astype(str) if "region" in users else "unknown"
    return pd.Series((age + "|" + region).to_numpy(), index=users["user_id"].astype(str).to_numpy())
