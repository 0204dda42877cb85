"""The durable event log: validated interaction events appended as immutable Parquet parts under any fsspec URI.

Layout under the log's URI::

    date=YYYY-MM-DD/part-<utc stamp>-<uuid8>.parquet              accepted events (EVENTS_SCHEMA)
    quarantine/date=YYYY-MM-DD/part-<utc stamp>-<uuid8>.parquet   rejected rows (as text) with a ``reason``

``date`` is the day (UTC) the batch was *received*, not the events' day: a day folder stops growing once the day is
over, which is what lets ``compact`` merge past days while appends go on.

Durability: every part is written under a hidden temporary name (``.part-....tmp``), flushed and fsync'd, then
renamed into place, and on a local filesystem the folder is fsync'd too, all before ``append`` returns: an
acknowledged event survives a crash, and a crash mid-write leaves only a temporary file that ``read`` ignores.
Several processes may append at once: each append writes its own uniquely named part (no file is ever appended to).

Idempotence: an event may carry ``event_id``, the client's id for it (a UUID, or any string unique per user). A
client that timed out and sends the batch again cannot know what was written; the log keeps one event per
``(user_id, event_id)``. ``append`` skips the events whose key is in ``seen`` (the caller's memory of recent keys:
the event sink's, ``recent_keys`` fills it at start-up) or earlier in the same batch, and reports them as
duplicates; ``read`` keeps the first of any that got through (two appenders without a shared memory), so every
reader sees an event once. Events without ``event_id`` are never deduplicated: two identical clicks are two clicks.

Compaction merges parts into one whose Parquet metadata lists every part it replaces (those of earlier merges
included): a finished day's parts into one, and with ``older_than_s`` today's appended parts older than that into
one per run. ``read`` skips every part so listed, so a reader racing a compaction (or a compaction that crashed
before deleting) never sees an event twice. Run one compaction at a time (the first event sink, or a scheduled
``vitrine events compact``; a lock file keeps a second one out of a local log), beside any number of appenders
and readers.
"""
from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from common.artifacts import write_atomic
from common.catalog import ids_as_str
from common.errors import ConfigError, SchemaError
from common.events import (EVENT_ID, EVENTS_SCHEMA, RECORDS_MAX, REQUIRED_COLUMNS, is_missing, load_events,
                           rows_as_text, validate_events, validate_records)

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"  # sub-folder of rejected rows
REPLACES_KEY = b"vitrine.replaces"  # Parquet metadata of a compacted part: JSON list of the part names it replaces
_ROW = "__batch_row"  # position of each row in the appended batch, carried through validation
_READ_ATTEMPTS = 5  # a part deleted by a concurrent compaction between listing and reading: list again

LOG_SCHEMA = EVENTS_SCHEMA.append(pa.field(EVENT_ID, pa.string()))  # a part's columns (older parts lack event_id)

KnownItems = Callable[[Sequence[str]], set[str]] | set[str] | frozenset[str] | None
Key = tuple[str, str]  # (user_id, event_id): one event of the log


@dataclass(frozen=True)
class AppendResult:
    """What one ``append`` did."""

    accepted: int  # valid events written
    rejected: list[dict]  # {"index": row position in the batch, "reason": str} for each invalid row
    part: str | None  # URI of the part file written (None when nothing valid)
    events: pd.DataFrame | None = field(default=None, repr=False, compare=False)  # what the part holds, as written
    duplicates: list[int] = field(default_factory=list)  # batch positions of events already logged (not written)

    def keys(self) -> list[Key]:
        """``(user_id, event_id)`` of the events written with an id (what an appender adds to its ``seen``)."""
        if self.events is None:
            return []
        ids = self.events[self.events[EVENT_ID].notna()]
        return list(zip(ids["user_id"], ids[EVENT_ID]))


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class EventLog:
    """An append-only log of interaction events at ``uri`` (a local folder or any fsspec URI, e.g. ``s3://b/events``).

    ``known_items`` (optional) is the catalogue: a set of item ids, or a callable that takes a batch's item ids and
    returns the known ones; events on other items are rejected with ``unknown item 'x'``. ``clock`` returns the
    current UTC time (tests pass a fixed one); it dates the parts and fills missing ``ts``.
    """

    def __init__(self, uri: str, known_items: KnownItems = None, *,
                 clock: Callable[[], datetime] = _utc_now) -> None:
        if not isinstance(uri, str) or not uri.strip():
            raise ConfigError(f"event log URI must be a non-empty path or URI. Got {uri!r}")
        if known_items is not None and not callable(known_items) and not isinstance(known_items, (set, frozenset)):
            raise ConfigError(f"known_items must be a set of item ids or a callable. Got {type(known_items).__name__}")
        self.uri = uri.rstrip("/")
        self._known = known_items
        self._clock = clock

    def __repr__(self) -> str:
        return f"EventLog({self.uri!r})"

    # ------------------------------------------------------------------------------------------ append

    def append(self, events: pd.DataFrame | list[dict], known_items: KnownItems = None,
               seen: Collection[Key] = frozenset()) -> AppendResult:
        """Validate a batch; write its valid rows as one new part and its invalid rows to quarantine, durably.
        ``known_items`` overrides the log's own for this batch (the event sink fetches the items' vectors with it).
        Events whose ``(user_id, event_id)`` is in ``seen`` or earlier in the batch are not written: their batch
        positions come back as ``duplicates``.

        A small batch of plain records takes ``validate_records`` (row by row); when any of its rows is invalid,
        or the batch is a frame, large or unusual, ``validate_events`` checks it (vectorised) and quarantines."""
        known_items = self._known if known_items is None else known_items
        now = self._clock().astimezone(timezone.utc)
        if not isinstance(events, (pd.DataFrame, list, tuple)):
            raise SchemaError(f"events must be a DataFrame or a list of dicts. Got {type(events).__name__}")
        duplicates = _duplicates(events, seen)
        kept = None
        if duplicates:  # validate the rest; rejections are then mapped back to the batch's positions
            drop = set(duplicates)
            kept = [i for i in range(len(events)) if i not in drop]
            events = events.iloc[kept] if isinstance(events, pd.DataFrame) else [events[i] for i in kept]
        checked, known = None, None
        if isinstance(events, (list, tuple)) and 0 < len(events) <= RECORDS_MAX \
                and all(isinstance(e, dict) and isinstance(e.get("item_id"), str) for e in events):
            known = _resolve(known_items, sorted({e["item_id"] for e in events if e["item_id"]}))
            checked = validate_records(events, known, default_ts=now, with_ids=True)
        if checked is not None:
            rejected: list[dict] = []
        else:
            frame = _as_frame(events)
            if frame.empty:
                return AppendResult(accepted=0, rejected=[], part=None, duplicates=duplicates)
            table = _prepared(frame, now)
            if known is None:
                known = _resolve(known_items, _item_ids(table))
            checked = validate_events(table, known, with_ids=True)
            rejected = [{"index": int(i) if kept is None else kept[int(i)], "reason": str(r)}
                        for i, r in zip(checked.quarantine[_ROW], checked.quarantine["reason"])]
            rejected.sort(key=lambda r: r["index"])
            if kept is not None:  # the quarantine file names the rows' positions in the batch as sent
                checked = type(checked)(valid=checked.valid, quarantine=checked.quarantine.assign(
                    **{_ROW: [kept[int(i)] for i in checked.quarantine[_ROW]]}))
        fs, base = url_to_fs(self.uri)
        day, name = now.strftime("%Y-%m-%d"), _part_name(now)
        if len(checked.quarantine):
            _write_durable(fs, _quarantine_table(checked.quarantine), f"{base}/{QUARANTINE}/date={day}/{name}")
        part, valid = None, None
        if len(checked.valid):
            valid = checked.valid.assign(ts=checked.valid["ts"].dt.floor("us"))
            data = pa.Table.from_pandas(valid, schema=LOG_SCHEMA, preserve_index=False)
            _write_durable(fs, data.replace_schema_metadata(None), f"{base}/date={day}/{name}")
            part = f"{self.uri}/date={day}/{name}"
        log.debug("event log %s: %d accepted, %d rejected", self.uri, len(checked.valid), len(rejected))
        return AppendResult(accepted=len(checked.valid), rejected=rejected, part=part, events=valid,
                            duplicates=duplicates)

    # ------------------------------------------------------------------------------------------ read

    def read(self, since: str | None = None) -> pd.DataFrame:
        """Every accepted event (LOG_SCHEMA columns: EVENTS_SCHEMA's and ``event_id``) with ``ts >= since`` (ISO
        time, UTC when naive), in time order (ties keep append order), each ``(user_id, event_id)`` once (the first
        appended); an empty frame with those columns when there is none."""
        return self._frame([t for _, t in self._live_parts()], since)

    def _frame(self, tables: list[pa.Table], since: str | None = None) -> pd.DataFrame:
        """``read``'s answer from the live parts' tables."""
        start = parse_since(since)
        if not tables:
            return LOG_SCHEMA.empty_table().to_pandas()
        frame = pa.concat_tables(tables).to_pandas()
        again = frame[EVENT_ID].notna() & frame.duplicated(["user_id", EVENT_ID])
        if again.any():  # appended twice by appenders that did not share their memory of recent keys
            log.info("event log %s: %d event(s) logged again under the same event_id, read once", self.uri,
                     int(again.sum()))
            frame = frame[~again]
        if start is not None:
            frame = frame[frame["ts"] >= start]
        return frame.sort_values("ts", kind="stable").reset_index(drop=True)

    def stats(self) -> dict[str, Any]:
        """What the log holds: events (each ``event_id`` once), users, items, the time span, events per day
        received, event types, how many carry an ``event_id``, and quarantined rows by reason."""
        parts = self._live_parts()  # one listing and read serves both the events and the parts per day
        frame = self._frame([t for _, t in parts])
        days: dict[str, int] = {}
        for path, table in parts:
            day = path.rsplit("date=", 1)[1].split("/", 1)[0]
            days[day] = days.get(day, 0) + len(table)
        fs, base = url_to_fs(self.uri)
        reasons: dict[str, int] = {}
        for path in sorted(fs.glob(f"{base}/{QUARANTINE}/date=*/part-*.parquet")):
            with fs.open(path, "rb") as f:
                for reason in pq.read_table(f, columns=["reason"])["reason"].to_pylist():
                    key = str(reason).split(" '")[0]
                    reasons[key] = reasons.get(key, 0) + 1
        return {"uri": self.uri, "events": len(frame), "users": int(frame["user_id"].nunique()),
                "items": int(frame["item_id"].nunique()), "with_event_id": int(frame[EVENT_ID].notna().sum()),
                "first_ts": frame["ts"].min().isoformat() if len(frame) else None,
                "last_ts": frame["ts"].max().isoformat() if len(frame) else None,
                "event_types": {k: int(v) for k, v in frame["event"].value_counts().sort_index().items()},
                "received_per_day": days, "quarantined": sum(reasons.values()), "quarantine_reasons": reasons}

    def signature(self) -> tuple[str, ...]:
        """The names of every part now: it changes when events are appended or a day is compacted (a cheap
        listing that tells a reader of the whole log when to read it again)."""
        fs, base = url_to_fs(self.uri)
        return tuple(sorted(_name(p) for p in fs.glob(f"{base}/date=*/part-*.parquet")))

    def recent_keys(self, limit: int) -> list[Key]:
        """The ``(user_id, event_id)`` of the last ``limit`` events appended with an id, oldest first (what an
        appender remembers at start-up, so that a batch sent again after its restart is still caught)."""
        if limit <= 0:
            return []
        fs, base = url_to_fs(self.uri)
        days = _days(fs, base)[::-1]
        keys: list[Key] = []
        for day in days:  # newest day first, newest part first, until ``limit`` keys
            for _, table in reversed(self._live_parts(day, columns=["user_id", EVENT_ID])):
                ids = table.filter(pc.is_valid(table[EVENT_ID]))
                keys += reversed(list(zip(ids["user_id"].to_pylist(), ids[EVENT_ID].to_pylist())))
                if len(keys) >= limit:
                    return keys[:limit][::-1]
        return keys[::-1]

    def _live_parts(self, day: str | None = None,
                    columns: Sequence[str] | None = None) -> list[tuple[str, pa.Table]]:
        """(path, table) of the parts not replaced by a compacted part, in name order (day, then time); the tables
        hold LOG_SCHEMA's ``columns`` (default: all), read from the files alone."""
        for _ in range(_READ_ATTEMPTS):
            try:
                return self._list_live(day, columns)
            except FileNotFoundError:  # a compaction removed a listed part after writing its replacement
                continue
        raise SchemaError(f"event log {self.uri}: parts kept disappearing while reading; is a compaction looping?")

    def _list_live(self, day: str | None, columns: Sequence[str] | None) -> list[tuple[str, pa.Table]]:
        fs, base = url_to_fs(self.uri)
        pattern = f"{base}/date={day or '*'}/part-*.parquet"
        parts: list[tuple[str, pa.Table]] = []
        replaced: set[str] = set()
        for path in sorted(fs.glob(pattern)):
            with fs.open(path, "rb") as f:
                file = pq.ParquetFile(f)
                meta = file.schema_arrow.metadata or {}
                present = set(file.schema_arrow.names)
                table = file.read(columns=None if columns is None else [c for c in columns if c in present])
            if REPLACES_KEY in meta:
                replaced.update(json.loads(meta[REPLACES_KEY]))
            parts.append((path, _conformed(table, path, columns)))
        return [(p, t) for p, t in parts if _name(p) not in replaced]

    # ------------------------------------------------------------------------------------------ compact

    def compact(self, older_than_s: float | None = None) -> int:
        """Merge the parts of each past day (UTC) into one part; returns how many parts were removed.

        With ``older_than_s``, today's appended parts written at least that long ago are merged too, into one new
        part per compaction (a busy service writes a part per ``POST /events``: compacting every few minutes keeps
        the count of files readers list and open small, and each event is rewritten at most twice: into one of
        today's merged parts, then into its day's part). Appends go on beside a compaction: it merges only the
        parts it listed. A merged part lists every part it replaces, those of the merged parts it merged included,
        so no crash between writing it and deleting them can show an event twice."""
        if older_than_s is not None and (isinstance(older_than_s, bool) or not older_than_s >= 0):
            raise ConfigError(f"older_than_s must be a number of seconds >= 0. Got {older_than_s!r}")
        fs, base = url_to_fs(self.uri)
        with _compaction_lock(fs, base) as held:
            if not held:
                log.info("event log %s: another compaction is running; skipped", self.uri)
                return 0
            return self._compact(fs, base, older_than_s)

    def _compact(self, fs: fsspec.AbstractFileSystem, base: str, older_than_s: float | None) -> int:
        now = self._clock().astimezone(timezone.utc)
        today = now.strftime("%Y-%m-%d")
        cutoff = None if older_than_s is None else (now - timedelta(seconds=older_than_s)).strftime("%Y%m%dT%H%M%S%fZ")
        days = _days(fs, base)
        removed = 0
        for day in (d for d in days if d < today or (cutoff is not None and d == today)):
            parts = _catalogue(fs, f"{base}/date={day}")
            replaced = {r for _, rs in parts for r in rs}
            live = [(p, rs) for p, rs in parts if _name(p) not in replaced]
            stale = [p for p, _ in parts if _name(p) in replaced]  # replaced but not yet deleted
            if day == today:  # appended parts old enough (younger ones are still arriving; today's merged parts
                live = [(p, rs) for p, rs in live if not rs and _stamp(p) <= cutoff]  # wait for the day's end)
            if len(live) > 1:
                tables = []
                for path, _ in live:
                    with fs.open(path, "rb") as f:
                        tables.append(_conformed(pq.read_table(f), path))
                merged = pa.concat_tables(tables)
                merged = merged.take(pc.sort_indices(merged, sort_keys=[("ts", "ascending")]))  # stable
                replaces = sorted({_name(p) for p, _ in live} | {r for _, rs in live for r in rs})
                merged = merged.replace_schema_metadata({REPLACES_KEY: json.dumps(replaces).encode()})
                _write_durable(fs, merged, f"{base}/date={day}/{_part_name(now)}")
                stale += [p for p, _ in live]
            for path in stale:
                fs.rm(path)
            removed += len(stale)
            if stale:
                log.info("event log %s: compacted %s (%d part(s) removed)", self.uri, day, len(stale))
        return removed


# ----------------------------------------------------------------------------------------------- helpers


def _resolve(known: KnownItems, ids: list[str]) -> set[str] | None:
    """The known ones among ``ids`` (None: every item is known)."""
    if known is None:
        return None
    if isinstance(known, (set, frozenset)):
        return set(known)
    return set(known(ids)) if ids else set()


def _item_ids(table: pa.Table) -> list[str]:
    return sorted({i for i in ids_as_str(table["item_id"]).to_pylist() if i}) if "item_id" in table.column_names else []


def _duplicates(events: pd.DataFrame | list[dict], seen: Collection[Key]) -> list[int]:
    """Batch positions of the events whose ``(user_id, event_id)`` is in ``seen`` or earlier in the batch."""
    if isinstance(events, pd.DataFrame):
        if EVENT_ID not in events.columns or "user_id" not in events.columns:
            return []
        pairs = zip(events["user_id"].tolist(), events[EVENT_ID].tolist())
    else:
        pairs = ((e.get("user_id"), e.get(EVENT_ID)) if isinstance(e, dict) else (None, None) for e in events)
    out, batch = [], set()
    for i, (user, event_id) in enumerate(pairs):
        key = _key(user, event_id)
        if key is None:
            continue
        if key in seen or key in batch:
            out.append(i)
        batch.add(key)
    return out


def _key(user: object, event_id: object) -> Key | None:
    """``(user_id, event_id)`` as the log stores them (ids as text), or None when either is missing or blank."""
    if is_missing(user) or is_missing(event_id):
        return None
    user, event_id = _text(user), _text(event_id)
    return (user, event_id) if user.strip() and event_id.strip() else None


def _text(v: object) -> str:
    """An id as ``ids_as_str`` writes it: integral floats without their ``.0``."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _as_frame(events: pd.DataFrame | list[dict]) -> pd.DataFrame:
    if isinstance(events, pd.DataFrame):
        return events.reset_index(drop=True)
    if isinstance(events, (list, tuple)):
        bad = [i for i, e in enumerate(events) if not isinstance(e, dict)]
        if bad:
            raise SchemaError(f"events must be dicts; row {bad[0]} is {type(events[bad[0]]).__name__}")
        return pd.DataFrame.from_records(list(events))
    raise SchemaError(f"events must be a DataFrame or a list of dicts. Got {type(events).__name__}")


def _prepared(frame: pd.DataFrame, now: datetime) -> pa.Table:
    """The batch as an Arrow table ready for validate_events: absent required columns added as nulls (so each row
    is quarantined with its reason instead of the batch failing), blank ``ts`` filled with ``now``, row positions."""
    frame = frame.copy()
    for col in REQUIRED_COLUMNS:
        if col not in frame.columns:
            frame[col] = None
    ts = frame["ts"]
    blank = ts.isna().to_numpy() | ts.astype("string").str.strip().eq("").fillna(False).to_numpy()
    if blank.any():
        if pd.api.types.is_datetime64_any_dtype(ts):
            stamp = pd.Timestamp(now) if ts.dt.tz is not None else pd.Timestamp(now).tz_localize(None)
            frame["ts"] = ts.where(~blank, stamp)
        elif pd.api.types.is_numeric_dtype(ts) and not pd.api.types.is_bool_dtype(ts):
            frame["ts"] = ts.where(~blank, now.timestamp())
        else:
            frame["ts"] = ts.astype(object).where(~blank, now.isoformat())
    frame[_ROW] = np.arange(len(frame), dtype=np.int64)
    mixed = {c: "string" for c in frame.columns if frame[c].dtype == object}
    return pa.Table.from_pandas(frame.astype(mixed), preserve_index=False)


def _quarantine_table(rows: pd.DataFrame) -> pa.Table:
    """Rejected rows as text (a stable schema whatever the client sent), their batch position and reason."""
    table = rows_as_text(rows.drop(columns=[_ROW, "reason"]))
    table = table.append_column("batch_index", pa.array(rows[_ROW].to_numpy(np.int64)))
    return table.append_column("reason", pa.array(rows["reason"].astype(str).tolist(), pa.string()))


def _conformed(table: pa.Table, path: str, columns: Sequence[str] | None = None) -> pa.Table:
    """``table`` with LOG_SCHEMA's ``columns`` (default: all) in their types; ``event_id`` null in parts written
    before events had ids."""
    names = list(columns) if columns is not None else LOG_SCHEMA.names
    missing = [c for c in names if c not in table.column_names and c != EVENT_ID]
    if missing:
        raise SchemaError(f"event log part {path} lacks column(s) {missing}; was it written by another tool?")
    if EVENT_ID in names and EVENT_ID not in table.column_names:  # written before events had ids
        table = table.append_column(EVENT_ID, pa.nulls(len(table), pa.string()))
    schema = pa.schema([LOG_SCHEMA.field(c) for c in names])
    return table.select(names).cast(schema).replace_schema_metadata(None)


@contextmanager
def _compaction_lock(fs: fsspec.AbstractFileSystem, base: str) -> Iterator[bool]:
    """Yields whether this process may compact: on a local log an exclusive lock file (two compactions at once
    would each merge the same parts and show their events twice); on an object store, True (one scheduled
    compactor: the first event sink, or `vitrine events compact`)."""
    if not isinstance(fs, LocalFileSystem):
        yield True
        return
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, ".compact.lock"), "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _days(fs: fsspec.AbstractFileSystem, base: str) -> list[str]:
    """The day folders of the log (``date=YYYY-MM-DD``), oldest first."""
    return sorted(p.rsplit("date=", 1)[1] for p in fs.glob(f"{base}/date=*") if fs.isdir(p))


def _stamp(path: str) -> str:
    """The UTC time a part was written, as in its name (``part-<stamp>-<uuid8>.parquet``)."""
    return _name(path).split("-")[1]


def _catalogue(fs: fsspec.AbstractFileSystem, folder: str) -> list[tuple[str, list[str]]]:
    """(path, the part names it replaces) of every part in ``folder``, in name order: a metadata read per part."""
    out = []
    for path in sorted(fs.glob(f"{folder}/part-*.parquet")):
        with fs.open(path, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
        out.append((path, json.loads(meta[REPLACES_KEY]) if REPLACES_KEY in meta else []))
    return out


def _part_name(now: datetime) -> str:
    return f"part-{now.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:8]}.parquet"


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def parse_since(since: str | None) -> pd.Timestamp | None:
    if since is None:
        return None
    try:
        t = pd.Timestamp(since)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"since must be an ISO-8601 time such as 2024-05-01T12:00:00Z. Got {since!r}") from e
    if t is pd.NaT:
        raise ConfigError(f"since must be an ISO-8601 time such as 2024-05-01T12:00:00Z. Got {since!r}")
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def _write_durable(fs: fsspec.AbstractFileSystem, table: pa.Table, path: str) -> None:
    """Write ``table`` to ``path`` atomically: locally a hidden temporary file, fsync'd, then renamed."""
    if isinstance(fs, LocalFileSystem):
        folder, name = path.rsplit("/", 1)
        tmp = f"{folder}/.{name}.tmp"
        created = not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
        if created:  # the new day folder's own entry must reach the disk too
            _fsync_dir(os.path.dirname(folder))
            _fsync_dir(os.path.dirname(os.path.dirname(folder)))
        return
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_atomic(fs, path, buf.getvalue())  # one upload: the part appears whole or not at all


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_event_log(uri: str) -> bool:
    """True when ``uri`` is a folder holding event-log parts (``date=*/part-*.parquet``)."""
    try:
        fs, base = url_to_fs(uri.rstrip("/"))
        return fs.isdir(base) and bool(fs.glob(f"{base}/date=*/part-*.parquet"))
    except (OSError, ValueError, ImportError):  # not a folder we can list: read as a file, which names the problem
        return False


class History:
    """Every event serving knows: the offline events file (validated; quarantined rows left out) and what the event
    log holds (POST /events so far, so a restarted service remembers), in time order. The file is validated once
    and again only when it changes (size or time), the log is read at every ``read``; ``signature`` changes when
    either does (what a serving replica watches to know when to read again)."""

    def __init__(self, events_uri: str | None, log_uri: str) -> None:
        self.events_uri, self.log = events_uri, EventLog(log_uri)
        self._offline: tuple[tuple, pd.DataFrame] | None = None

    def signature(self) -> tuple:
        return (_file_stamp(self.events_uri) if self.events_uri else None, self.log.signature())

    def read(self) -> pd.DataFrame | None:
        """The events in time order; None when there is neither a file nor a logged event."""
        parts = [self._offline_events()] if self.events_uri else []
        logged = self.log.read()
        if len(logged):
            parts.append(logged.drop(columns=[EVENT_ID]))
        if not parts:
            return None
        return pd.concat(parts, ignore_index=True).sort_values("ts", kind="stable") if len(parts) > 1 else parts[0]

    def _offline_events(self) -> pd.DataFrame:
        stamp = _file_stamp(self.events_uri)
        if self._offline is None or self._offline[0] != stamp:
            self._offline = (stamp, load_events(self.events_uri).valid)
        return self._offline[1]


def _file_stamp(uri: str) -> tuple:
    """What tells a changed file: its size and modification time (an object store's ETag where it has no time)."""
    fs, path = url_to_fs(uri)
    info = fs.info(path)
    return (info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""))
