"""Served events back into training: one events file from offline files and the service's event log.

The learning jobs read one events file (``--events``; an event-log folder works too, ``common.events.load_events``).
``export_events`` writes the file they retrain on: the offline history (validated; invalid rows quarantined beside
the output with their reason, never dropped silently) plus what ``POST /events`` appended (each ``event_id`` once),
optionally only since a time, in time order. The output is written whole or not at all, so re-running an export
replaces it and a crash leaves the previous file.
"""
from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from common.artifacts import write_atomic
from common.errors import ConfigError
from common.event_log import EventLog, is_event_log, parse_since
from common.events import EVENT_ID, EVENTS_SCHEMA, load_events, rows_as_text
from common.synthetic_events import write_events

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    """What one export wrote."""

    out: str  # the events file written
    events: int  # rows in it
    from_files: int  # of which from the offline files
    from_log: int  # of which from the event log
    quarantined: int  # invalid rows of the offline files, written to ``quarantine``
    quarantine: str | None  # the quarantine file (None when there was nothing to quarantine)

    def summary(self) -> str:
        q = f", {self.quarantined} quarantined to {self.quarantine}" if self.quarantined else ", none quarantined"
        return (f"exported {self.events} events ({self.from_files} from files, {self.from_log} from the event log)"
                f"{q} -> {self.out}")


def quarantine_path(out: str) -> str:
    """Where the invalid rows of an export go: beside ``out``, named after it."""
    folder, _, name = out.rstrip("/").rpartition("/")
    stem = name.rsplit(".", 1)[0]
    return f"{folder}/{stem}.quarantine.parquet" if folder else f"{stem}.quarantine.parquet"


def export_events(out: str, log_uri: str | None = None, files: Sequence[str] = (),
                  since: str | None = None, log_optional: bool = False) -> ExportResult:
    """Write offline ``files`` and the event log at ``log_uri`` (either may be absent, not both) as one events file
    (EVENTS_SCHEMA; Parquet, CSV or JSON Lines by ``out``'s extension), events at or after ``since`` only.
    ``log_optional``: a log that holds no parts yet (a scheduled pipeline's first run, before any traffic) is
    exported as empty, with a warning, instead of refused."""
    if not files and not log_uri:
        raise ConfigError("nothing to export: name an event log (--log) and/or events files (--events)")
    if log_uri and not is_event_log(log_uri):
        if not log_optional or not files:
            raise ConfigError(f"{log_uri} holds no event log parts (date=*/part-*.parquet); is it the service's "
                              f"event_log?")
        log.warning("%s holds no event log parts yet: exporting the files only", log_uri)
        log_uri = None
    start = parse_since(since)
    frames, quarantined = [], []
    for uri in files:
        checked = load_events(uri)
        frames.append(checked.valid)
        if len(checked.quarantine):
            quarantined.append(checked.quarantine.assign(source=uri))
    n_files = sum(len(f) for f in frames)
    logged = EventLog(log_uri).read().drop(columns=[EVENT_ID]) if log_uri else EVENTS_SCHEMA.empty_table().to_pandas()
    merged = pd.concat([*frames, logged], ignore_index=True) if frames else logged
    if start is not None:
        keep = merged["ts"] >= start
        n_files -= int((~keep.to_numpy()[:n_files]).sum())
        merged = merged[keep]
    merged = merged.sort_values("ts", kind="stable").reset_index(drop=True)
    write_events(merged, out)
    qpath = None
    if quarantined:  # as text (a stable schema whatever the files held), with the reason and the source file
        qpath = quarantine_path(out)
        buf = io.BytesIO()
        pq.write_table(rows_as_text(pd.concat(quarantined, ignore_index=True)), buf)
        fs, path = url_to_fs(qpath)
        write_atomic(fs, path, buf.getvalue())
    result = ExportResult(out=out, events=len(merged), from_files=n_files, from_log=len(merged) - n_files,
                          quarantined=sum(len(q) for q in quarantined), quarantine=qpath)
    log.info("%s", result.summary())
    return result
