"""Served events back into training: the event log read as an events source, exported with offline files, and the
`vitrine events` commands (stats, compact, export) as a user runs them."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pandas as pd
import pyarrow.parquet as pq
import pytest

from common.errors import ConfigError
from common.event_export import export_events, quarantine_path
from common.event_log import EventLog, is_event_log
from common.events import EVENTS_SCHEMA, load_events
from vitrine.cli import main

T0 = datetime(2025, 6, 1, 9, 0, tzinfo=timezone.utc)


def _log(tmp_path) -> EventLog:
    now = {"t": T0}
    log = EventLog(str(tmp_path / "log"), clock=lambda: now["t"])
    log.append([{"user_id": "u1", "item_id": "a", "event": "view", "event_id": "e1"},
                {"user_id": "u1", "item_id": "b", "event": "purchase", "order_id": "o1", "value": 9.5,
                 "event_id": "e2"},
                {"user_id": "u2", "item_id": "c", "event": "teleport"}])  # quarantined by the log
    now["t"] = T0 + timedelta(days=1)
    log.append([{"user_id": "u1", "item_id": "b", "event": "purchase", "order_id": "o1", "value": 9.5,
                 "event_id": "e2"},  # appended twice (no shared memory): read once
                {"user_id": "u3", "item_id": "a", "event": "wishlist"}])
    return log


def _offline(tmp_path) -> str:
    path = str(tmp_path / "offline.csv")
    pd.DataFrame({"user_id": ["u9", "u9", ""], "item_id": ["a", "c", "b"], "event": ["view", "view", "view"],
                  "ts": ["2025-05-01T10:00:00Z", "2025-05-31T10:00:00Z", "2025-05-02T00:00:00Z"]}).to_csv(path,
                                                                                                      index=False)
    return path


def test_the_event_log_is_an_events_source_with_each_event_id_once(tmp_path):
    log = _log(tmp_path)
    assert is_event_log(log.uri) and not is_event_log(str(tmp_path)) and not is_event_log(str(tmp_path / "no"))
    checked = load_events(log.uri, known_items={"a", "b"})
    assert list(checked.valid.columns) == EVENTS_SCHEMA.names
    assert sorted(checked.valid["user_id"]) == ["u1", "u1", "u3"]  # e2 once; nothing of u2 (quarantined)
    assert checked.quarantine.empty


def test_export_merges_files_and_log_in_time_order_and_quarantines_bad_file_rows(tmp_path):
    log = _log(tmp_path)
    out = str(tmp_path / "out" / "events.parquet")
    result = export_events(out, log.uri, [_offline(tmp_path)])
    assert (result.events, result.from_files, result.from_log, result.quarantined) == (5, 2, 3, 1)
    assert result.quarantine == quarantine_path(out) == str(tmp_path / "out" / "events.quarantine.parquet")
    assert load_events(out).quarantine.empty
    written = pd.read_parquet(out)  # as stored: in time order
    assert written["ts"].is_monotonic_increasing and written["user_id"].tolist() == ["u9", "u9", "u1", "u1", "u3"]
    assert written.loc[written["event"] == "purchase", "value"].tolist() == [9.5]
    q = pq.read_table(result.quarantine).to_pandas()
    assert q["reason"].tolist() == ["missing user_id"] and q["source"].tolist() == [_offline(tmp_path)]


def test_export_since_a_time_and_to_csv(tmp_path):
    log = _log(tmp_path)
    out = str(tmp_path / "recent.csv")
    result = export_events(out, log.uri, [_offline(tmp_path)], since="2025-05-15")
    assert (result.events, result.from_files, result.from_log, result.quarantine) == (4, 1, 3, str(
        tmp_path / "recent.quarantine.parquet"))
    assert sorted(load_events(out).valid["user_id"]) == ["u1", "u1", "u3", "u9"]
    again = export_events(out, log.uri, [_offline(tmp_path)], since="2025-05-15")  # a rerun replaces the file
    assert again == result and len(load_events(out).valid) == 4


def test_export_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ConfigError, match="nothing to export"):
        export_events(str(tmp_path / "x.parquet"))
    with pytest.raises(ConfigError, match="no event log parts"):
        export_events(str(tmp_path / "x.parquet"), str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no event log parts"):  # optional, but then there must be files
        export_events(str(tmp_path / "x.parquet"), str(tmp_path / "missing"), log_optional=True)
    only_files = export_events(str(tmp_path / "x.parquet"), str(tmp_path / "missing"), [_offline(tmp_path)],
                               log_optional=True)  # a pipeline's first run, before any traffic
    assert (only_files.from_files, only_files.from_log) == (2, 0)
    with pytest.raises(ConfigError, match="since"):
        export_events(str(tmp_path / "x.parquet"), _log(tmp_path).uri, since="last week")


def test_the_events_commands(tmp_path, capsys):
    log = _log(tmp_path)
    assert main(["events", "stats", "--log", log.uri]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["events"], stats["users"], stats["with_event_id"], stats["quarantined"]) == (3, 2, 2, 1)
    assert stats["received_per_day"] == {"2025-06-01": 2, "2025-06-02": 2}  # parts as stored (e2 in both)
    assert stats["quarantine_reasons"] == {"unknown event": 1}
    assert stats["event_types"] == {"purchase": 1, "view": 1, "wishlist": 1}
    out = str(tmp_path / "all.jsonl")
    assert main(["events", "export", "--log", log.uri, "--events", _offline(tmp_path), "--out", out]) == 0
    assert "exported 5 events (2 from files, 3 from the event log), 1 quarantined" in capsys.readouterr().out
    assert len(load_events(out).valid) == 5
    assert main(["events", "export", "--log", log.uri, "--out", out, "--no-log", "--events",
                 _offline(tmp_path)]) == 0
    assert "exported 2 events (2 from files, 0 from the event log)" in capsys.readouterr().out
    day2 = EventLog(log.uri, clock=lambda: T0 + timedelta(days=1, seconds=1))
    day2.append([{"user_id": "u4", "item_id": "a", "event": "view"}])  # a second part on 2025-06-02
    assert main(["events", "compact", "--log", log.uri]) == 0  # today both days are past; one has two parts
    assert json.loads(capsys.readouterr().out)["parts_removed"] == 2
    assert len(log.read()) == 4
    assert main(["events", "export", "--log", log.uri]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["events", "stats", "--log", str(tmp_path / "nothing")]) == 2
    assert "no event log parts" in capsys.readouterr().err


def test_a_learning_job_reads_the_event_log_directly(tmp_path):
    from common.rules import RulesConfig
    from jobs.mine_rules import MineRulesConfig, run

    now = {"t": T0}
    log = EventLog(str(tmp_path / "log"), clock=lambda: now["t"])
    baskets = [["a", "b"], ["a", "b"], ["a", "b", "c"], ["c"], ["a", "b"]]
    rows = [{"user_id": f"u{n}", "item_id": i, "event": "purchase", "order_id": f"o{n}", "event_id": f"{n}-{i}"}
            for n, basket in enumerate(baskets) for i in basket]
    log.append(rows)
    log.append(rows)  # the whole batch again without shared memory: read once (events == len(rows))
    result = run(MineRulesConfig(events=log.uri, artifacts_uri=str(tmp_path / "artifacts"),
                                 rules=RulesConfig(min_support=0.5)))
    assert (result.events, result.quarantined, result.baskets, result.basket_source) == (len(rows), 0, 5, "orders")
    got = {(tuple(r["antecedents"]), tuple(r["consequents"])): r["support"]
           for r in pq.read_table(result.rules_uri).to_pylist()}
    assert got == pytest.approx({(("a",), ("b",)): 0.8, (("b",), ("a",)): 0.8})  # a and b in 4 of the 5 orders
