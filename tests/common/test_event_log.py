"""The durable event log: round trip, quarantine with reasons, concurrent appenders, crash leftovers, compaction."""
from __future__ import annotations

import json
import multiprocessing as mp
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from common.errors import ConfigError
from common.event_log import LOG_SCHEMA, EventLog

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def _events(n: int, user: str = "u1", start: int = 0) -> list[dict]:
    return [{"user_id": user, "item_id": f"i{(start + k) % 7}", "event": "view",
             "ts": (T0 + timedelta(seconds=start + k)).isoformat()} for k in range(n)]


def _parts(root: Path, quarantine: bool = False) -> list[Path]:
    base = root / "quarantine" if quarantine else root
    return sorted(base.glob("date=*/part-*.parquet"))


def test_append_then_read_round_trip(tmp_path):
    log = EventLog(str(tmp_path / "log"))
    first = log.append(_events(3, "u2", start=10))
    second = log.append(pd.DataFrame(_events(2, "u1")))
    assert (first.accepted, first.rejected, second.accepted) == (3, [], 2)
    assert Path(first.part).exists() and "date=" in first.part
    out = log.read()
    assert list(out.columns) == LOG_SCHEMA.names
    assert len(out) == 5
    assert out["ts"].is_monotonic_increasing  # time order, across parts
    assert list(out["user_id"]) == ["u1", "u1", "u2", "u2", "u2"]
    assert out["session_id"].notna().all()
    assert len(log.read(since=(T0 + timedelta(seconds=11)).isoformat())) == 2


def test_any_fsspec_uri(tmp_path):
    log = EventLog(f"memory://vitrine-test/{tmp_path.name}/log")
    res = log.append(_events(3))
    assert res.part.startswith("memory://") and res.accepted == 3
    assert len(log.read()) == 3


def test_rejected_rows_land_in_quarantine_with_reasons(tmp_path):
    log = EventLog(str(tmp_path / "log"), known_items={"i0", "i1"})
    batch = [
        {"user_id": "u1", "item_id": "i0", "event": "view", "ts": T0.isoformat()},
        {"user_id": "", "item_id": "i0", "event": "view", "ts": T0.isoformat()},
        {"user_id": "u1", "item_id": "i1", "event": "teleport", "ts": T0.isoformat()},
        {"user_id": "u1", "item_id": "i9", "event": "view", "ts": T0.isoformat()},
        {"user_id": "u1", "item_id": "i1", "event": "view", "ts": "not a time"},
    ]
    res = log.append(batch)
    assert res.accepted == 1
    assert res.rejected == [
        {"index": 1, "reason": "missing user_id"},
        {"index": 2, "reason": "unknown event 'teleport'"},
        {"index": 3, "reason": "unknown item 'i9'"},
        {"index": 4, "reason": "bad ts 'not a time'"},
    ]
    (qpart,) = _parts(tmp_path / "log", quarantine=True)
    q = pq.read_table(qpart).to_pandas()
    assert list(q["batch_index"]) == [1, 2, 3, 4]
    assert list(q["reason"]) == [r["reason"] for r in res.rejected]
    assert list(q["item_id"]) == ["i0", "i1", "i9", "i1"]  # the row as sent, nothing lost
    assert len(log.read()) == 1  # quarantine is not part of the log


def test_known_items_callable_gets_the_batch_ids(tmp_path):
    asked: list[list[str]] = []

    def known(ids):
        asked.append(list(ids))
        return {"i1"}

    res = EventLog(str(tmp_path / "log"), known_items=known).append(_events(3))  # items i0, i1, i2
    assert asked == [["i0", "i1", "i2"]]
    assert res.accepted == 1 and [r["index"] for r in res.rejected] == [0, 2]


def test_missing_ts_is_filled_with_now(tmp_path):
    log = EventLog(str(tmp_path / "log"), clock=lambda: T0)
    res = log.append([{"user_id": "u1", "item_id": "i1", "event": "view"},
                      {"user_id": "u1", "item_id": "i2", "event": "view", "ts": None},
                      {"user_id": "u1", "item_id": "i3", "event": "view", "ts": "2024-04-30T00:00:00Z"}])
    assert res.accepted == 3
    out = log.read()
    assert list(out["ts"]) == [pd.Timestamp("2024-04-30T00:00:00Z"), pd.Timestamp(T0), pd.Timestamp(T0)]
    assert Path(res.part).parent.name == "date=2024-05-01"  # the receiving day
    # A batch without any ts column at all.
    assert log.append(pd.DataFrame({"user_id": ["u2"], "item_id": ["i1"], "event": ["view"]})).accepted == 1


def test_missing_required_column_quarantines_rows_instead_of_failing(tmp_path):
    log = EventLog(str(tmp_path / "log"))
    res = log.append([{"user_id": "u1", "event": "view", "ts": T0.isoformat()}])
    assert res.accepted == 0 and res.part is None
    assert res.rejected == [{"index": 0, "reason": "missing item_id"}]


def test_empty_batch_writes_nothing(tmp_path):
    log = EventLog(str(tmp_path / "log"))
    assert log.append([]).accepted == 0
    res = log.append(pd.DataFrame(columns=["user_id", "item_id", "event", "ts"]))
    assert (res.accepted, res.rejected, res.part) == (0, [], None)
    assert not (tmp_path / "log").exists()
    out = log.read()
    assert out.empty and list(out.columns) == LOG_SCHEMA.names


def test_a_temp_file_left_by_a_crash_is_ignored(tmp_path):
    log = EventLog(str(tmp_path / "log"))
    res = log.append(_events(2))
    folder = Path(res.part).parent
    (folder / ".part-20240501T120000000000Z-deadbeef.parquet.tmp").write_bytes(b"PAR1 half a file")
    assert len(log.read()) == 2
    assert log.append(_events(1)).accepted == 1  # and appends go on
    assert len(log.read()) == 3


def _append_many(uri: str, worker: int, batches: int) -> None:
    log = EventLog(uri)
    for b in range(batches):
        log.append(_events(5, f"w{worker}", start=b * 5))


def test_concurrent_appenders_lose_nothing(tmp_path):
    uri = str(tmp_path / "log")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(uri, w, 10)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    out = EventLog(uri).read()
    assert len(out) == 2 * 10 * 5
    assert out.groupby("user_id").size().to_dict() == {"w0": 50, "w1": 50}
    assert len(_parts(tmp_path / "log")) == 20  # one part per append, none overwritten


def test_compact_merges_past_days_only_and_read_is_unchanged(tmp_path):
    now = {"t": T0}
    log = EventLog(str(tmp_path / "log"), clock=lambda: now["t"])
    for k in range(3):
        log.append(_events(2, start=2 * k))
    now["t"] = T0 + timedelta(days=1)
    log.append(_events(2, "u2"))
    before = log.read()
    assert log.compact() == 3  # three parts of the past day merged; today's single part left alone
    assert len(_parts(tmp_path / "log")) == 2
    pd.testing.assert_frame_equal(log.read(), before)
    assert log.compact() == 0  # idempotent


def test_compacting_today_merges_only_parts_old_enough_and_again_later(tmp_path):
    now = {"t": T0}
    log = EventLog(str(tmp_path / "log"), clock=lambda: now["t"])
    for k in range(4):  # parts written at T0, T0 + 1 min, ...
        now["t"] = T0 + timedelta(minutes=k)
        log.append(_with_ids(_events(2, start=2 * k), prefix=f"p{k}-"))
    before = log.read()
    now["t"] = T0 + timedelta(minutes=3, seconds=30)
    assert log.compact() == 0  # today is left alone by default
    assert log.compact(older_than_s=60) == 3  # the parts of T0 .. T0 + 2 min; the one of T0 + 3 min stays
    assert len(_parts(tmp_path / "log")) == 2
    pd.testing.assert_frame_equal(log.read(), before)
    now["t"] = T0 + timedelta(minutes=10)
    log.append(_with_ids(_events(2, start=20), prefix="late-"))
    now["t"] = T0 + timedelta(minutes=20)
    first = {p.name for p in _parts(tmp_path / "log")}
    assert log.compact(older_than_s=60) == 2  # the T0 + 3 min part and the late one; today's merged part waits
    assert len(_parts(tmp_path / "log")) == 2
    now["t"] = T0 + timedelta(days=1)
    assert log.compact() == 2  # the day is over: its two merged parts become one
    [final] = _parts(tmp_path / "log")
    replaces = set(json.loads(pq.read_schema(final).metadata[b"vitrine.replaces"]))
    assert len(replaces) == 7 and {n for n in first if n in replaces}  # 5 appended + 2 merged parts, all listed
    pd.testing.assert_frame_equal(log.read().iloc[:len(before)], before)
    assert len(log.read()) == len(before) + 2
    with pytest.raises(ConfigError, match="older_than_s"):
        log.compact(older_than_s=-1)


def test_a_crash_after_merging_merged_parts_never_shows_an_event_twice(tmp_path):
    now = {"t": T0}
    log = EventLog(str(tmp_path / "log"), clock=lambda: now["t"])
    originals = []
    for k in range(2):
        now["t"] = T0 + timedelta(minutes=k)
        originals.append(Path(log.append(_events(2, start=2 * k)).part))
    saved = {p: p.read_bytes() for p in originals}
    now["t"] = T0 + timedelta(minutes=5)
    log.compact(older_than_s=60)
    now["t"] = T0 + timedelta(minutes=6)
    log.append(_events(1, start=9))
    first_merge = next(p for p in _parts(tmp_path / "log") if p not in originals and p.stat().st_size and
                       b"vitrine.replaces" in (pq.read_schema(p).metadata or {}))
    first_bytes = first_merge.read_bytes()
    now["t"] = T0 + timedelta(days=1)
    log.compact()  # the day's merged part and its last appended part become one
    # as if that compaction died after writing, before deleting: its inputs and the originals are back
    for p, data in {**saved, first_merge: first_bytes}.items():
        p.write_bytes(data)
    assert len(log.read()) == 5
    first_merge.unlink()  # even once the first merge is deleted, the originals it replaced stay hidden
    assert len(log.read()) == 5


def test_read_skips_parts_a_crashed_compaction_replaced(tmp_path):
    now = {"t": T0}
    log = EventLog(str(tmp_path / "log"), clock=lambda: now["t"])
    parts = [Path(log.append(_events(2, start=2 * k)).part) for k in range(2)]
    saved = {p: p.read_bytes() for p in parts}
    now["t"] = T0 + timedelta(days=1)
    log.compact()
    for p, data in saved.items():  # as if the compaction died before deleting the parts it merged
        p.write_bytes(data)
    assert len(log.read()) == 4  # not 8
    assert log.compact() == 2  # the leftovers are removed
    assert len(log.read()) == 4


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="''"):
        EventLog("")
    with pytest.raises(ConfigError, match="list"):
        EventLog(str(tmp_path), known_items=["i1"])
    with pytest.raises(ConfigError, match="yesterday"):
        EventLog(str(tmp_path)).read(since="yesterday")


# ------------------------------------------------------------------------------------------ idempotence


def _with_ids(events: list[dict], prefix: str = "e") -> list[dict]:
    return [{**e, "event_id": f"{prefix}{k}"} for k, e in enumerate(events)]


@pytest.mark.parametrize("as_frame", [False, True], ids=["records", "frame"])
def test_an_event_sent_again_under_its_id_is_a_duplicate_not_a_second_event(tmp_path, as_frame):
    log = EventLog(str(tmp_path / "log"), clock=lambda: T0)
    batch = _with_ids(_events(3))
    first = log.append(pd.DataFrame(batch) if as_frame else batch)
    assert (first.accepted, first.duplicates) == (3, [])
    assert first.keys() == [("u1", "e0"), ("u1", "e1"), ("u1", "e2")]
    retry = batch[1:] + _with_ids(_events(1, start=9), prefix="new")  # two sent again, one new
    second = log.append(pd.DataFrame(retry) if as_frame else retry, seen=set(first.keys()))
    assert (second.accepted, second.duplicates, second.keys()) == (1, [0, 1], [("u1", "new0")])
    out = log.read()
    assert len(out) == 4 and out["event_id"].tolist() == ["e0", "e1", "e2", "new0"]


def test_repeats_within_one_batch_and_rejections_keep_their_batch_positions(tmp_path):
    log = EventLog(str(tmp_path / "log"), clock=lambda: T0)
    good = _with_ids(_events(2))
    bad = {"user_id": "u1", "item_id": "i1", "event": "teleport", "event_id": "x"}
    batch = [good[0], good[0], bad, good[1], {**good[1]}]  # positions 1 and 4 repeat 0 and 3
    result = log.append(batch)
    assert (result.accepted, result.duplicates) == (2, [1, 4])
    assert result.rejected == [{"index": 2, "reason": "unknown event 'teleport'"}]
    [quarantined] = _parts(tmp_path / "log", quarantine=True)
    assert pq.read_table(quarantined)["batch_index"].to_pylist() == [2]


def test_ids_are_per_user_and_events_without_an_id_are_never_deduplicated(tmp_path):
    log = EventLog(str(tmp_path / "log"), clock=lambda: T0)
    same_id = [{**_events(1, "u1")[0], "event_id": "e"}, {**_events(1, "u2")[0], "event_id": "e"}]
    clicks = _events(1) * 2 + [{**_events(1)[0], "event_id": " "}]  # identical clicks; a blank id is no id
    result = log.append(same_id + clicks, seen={("u3", "e")})
    assert (result.accepted, result.duplicates) == (5, [])
    assert log.read()["event_id"].isna().sum() == 3


def test_read_keeps_the_first_of_events_two_appenders_both_wrote(tmp_path):
    now = {"t": T0}
    log = EventLog(str(tmp_path / "log"), clock=lambda: now["t"])  # parts are named by the time they are written
    batch = _with_ids(_events(2))
    log.append(batch)
    now["t"] = T0 + timedelta(seconds=1)
    log.append([{**batch[1], "value": 9.0}] + _with_ids(_events(1, start=5), prefix="z"))  # no shared memory
    out = log.read()
    assert out["event_id"].tolist() == ["e0", "e1", "z0"] and out["value"].isna().all()  # the first e1 kept


def test_parts_written_before_event_ids_read_as_events_without_one(tmp_path):
    log = EventLog(str(tmp_path / "log"), clock=lambda: T0)
    part = Path(log.append(_with_ids(_events(2))).part)
    table = pq.read_table(part)
    pq.write_table(table.drop_columns(["event_id"]), part)  # the layout of earlier versions
    out = log.read()
    assert len(out) == 2 and out["event_id"].isna().all()
    assert log.recent_keys(10) == []


def test_recent_keys_are_the_newest_ids_oldest_first_across_days_and_compaction(tmp_path):
    now = {"t": T0}
    log = EventLog(str(tmp_path / "log"), clock=lambda: now["t"])
    for day in range(3):
        for k in range(2):
            now["t"] = T0 + timedelta(days=day, seconds=k)
            log.append(_with_ids(_events(2, start=10 * day + 2 * k), prefix=f"d{day}p{k}-"))
    everything = [("u1", f"d{d}p{k}-{j}") for d in range(3) for k in range(2) for j in range(2)]
    assert log.recent_keys(100) == everything
    assert log.recent_keys(5) == everything[-5:]
    assert log.compact() == 4  # the two past days merged (ts order = append order here)
    assert log.recent_keys(100) == everything and log.recent_keys(0) == []


def test_a_second_compaction_at_the_same_time_is_skipped(tmp_path):
    import fcntl

    now = {"t": T0}
    log = EventLog(str(tmp_path / "log"), clock=lambda: now["t"])
    for k in range(2):
        log.append(_events(1, start=k))
    now["t"] = T0 + timedelta(days=1)
    with open(tmp_path / "log" / ".compact.lock", "a") as held:  # another process is compacting
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert log.compact() == 0 and len(_parts(tmp_path / "log")) == 2
    assert log.compact() == 2


def test_history_validates_the_offline_file_once_and_reads_the_log_each_time(tmp_path, monkeypatch):
    import os

    import common.event_log as event_log
    from common.event_log import History

    offline = tmp_path / "events.csv"
    pd.DataFrame({"user_id": ["u9"], "item_id": ["i1"], "event": ["view"], "ts": ["2024-04-01T00:00:00Z"]}).to_csv(
        offline, index=False)
    calls = []
    monkeypatch.setattr(event_log, "load_events", lambda uri: calls.append(uri) or event_log.validate_events(
        pd.read_csv(uri)))
    history = History(str(offline), str(tmp_path / "log"))
    assert history.read()["user_id"].tolist() == ["u9"] and history.signature() == history.signature()
    before = history.signature()
    EventLog(str(tmp_path / "log"), clock=lambda: T0).append(_events(2))
    assert history.signature() != before
    assert history.read()["user_id"].tolist() == ["u9", "u1", "u1"] and len(calls) == 1  # the file once
    pd.DataFrame({"user_id": ["u8"], "item_id": ["i2"], "event": ["view"], "ts": ["2024-04-02T00:00:00Z"]}).to_csv(
        offline, index=False)
    os.utime(offline, (1e9, 1e9))  # a replaced file: another size or time
    assert history.read()["user_id"].tolist() == ["u8", "u1", "u1"] and len(calls) == 2
    assert History(None, str(tmp_path / "none")).read() is None
