"""Events: validation with quarantine reasons, timestamp forms, derived sessions, weights, user segments."""
from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from common.errors import ConfigError, SchemaError
from common.events import (EVENTS_SCHEMA, SESSION_GAP, EventWeights, age_group, load_events, user_segments,
                           validate_events, validate_records)


def _events(**cols) -> pd.DataFrame:
    base = {"user_id": ["u1", "u1", "u2"], "item_id": ["a", "b", "a"], "event": ["view", "purchase", "dislike"],
            "ts": ["2025-01-01T10:00:00Z", "2025-01-01T10:05:00Z", "2025-01-02T09:00:00Z"]}
    base.update(cols)
    return pd.DataFrame(base)


def test_every_bad_row_is_quarantined_with_its_reason_and_the_rest_kept():
    df = pd.DataFrame({
        "user_id": ["u1", "", "u2", "u3", "u4", "u5", "u6"],
        "item_id": ["a", "b", None, "c", "d", "e", "zzz"],
        "event": ["view", "view", "view", "like", "rating", "purchase", "view"],
        "ts": ["2025-01-01T00:00:00Z"] * 4 + ["not a time", "2025-01-01", "2025-01-01"],
        "value": [None, None, None, None, None, "ten", None],
    })
    out = validate_events(df, known_items={"a", "b", "c", "d", "e"})
    assert out.valid["user_id"].tolist() == ["u1"]
    assert out.quarantine["reason"].tolist() == ["missing user_id", "missing item_id", "unknown event 'like'",
                                                 "bad ts 'not a time'", "bad value 'ten'", "unknown item 'zzz'"]
    assert list(out.valid.columns) == EVENTS_SCHEMA.names
    assert "6 quarantined" in out.summary()


def test_missing_required_columns_is_a_schema_error_naming_them():
    with pytest.raises(SchemaError, match="event, ts"):
        validate_events(pd.DataFrame({"user_id": ["u"], "item_id": ["i"]}))


def test_epoch_seconds_iso_strings_and_integer_ids_are_accepted():
    df = pd.DataFrame({"user_id": [7, 7], "item_id": [1, 2], "event": ["rating", "RATING"],
                       "ts": [881250949, "1997-12-04T15:55:49Z"], "value": [5, 3]})
    out = validate_events(df)
    assert out.quarantine.empty
    assert out.valid["user_id"].tolist() == ["7", "7"] and out.valid["item_id"].tolist() == ["1", "2"]
    assert out.valid["ts"].iloc[0] == pd.Timestamp(881250949, unit="s", tz="UTC")


def test_sessions_are_cut_at_the_inactivity_gap_when_the_file_has_none():
    t0 = pd.Timestamp("2025-01-01T10:00:00Z")
    df = _events(user_id=["u1"] * 3, ts=[t0, t0 + SESSION_GAP / 2, t0 + SESSION_GAP * 3])
    sessions = validate_events(df).valid["session_id"].tolist()
    assert sessions[0] == sessions[1] != sessions[2]


def test_given_sessions_are_kept():
    out = validate_events(_events(session_id=["s1", "s1", "s9"])).valid
    assert out["session_id"].tolist() == ["s1", "s1", "s9"]


def test_weights_follow_events_buttons_and_rating_centre():
    df = pd.DataFrame({"event": ["view", "purchase", "dislike", "add_to_bag", "rating", "rating"],
                       "button": [None, None, None, "not_interested", None, None],
                       "value": [None, None, None, None, 5.0, 2.0]})
    w = EventWeights().weigh(df)
    assert w.tolist() == [1.0, 4.0, -2.0, -2.0, 1.0, 1.0]
    assert EventWeights.from_mapping({"rating_center": 3}).weigh(df)[-2:].tolist() == [2.0, -1.0]
    custom = EventWeights.from_mapping({"events": {"view": 0.5}, "buttons": {"quick_add": 5}})
    assert custom.events["purchase"] == 4.0 and custom.weigh(df)[0] == 0.5


@pytest.mark.parametrize("bad, match", [({"events": {"like": 1}}, "'like'"), ({"events": {"view": float("nan")}},
                                        "'view'"), ({"colours": {}}, "colours")])
def test_bad_weight_config_is_refused_naming_the_value(bad, match):
    with pytest.raises(ConfigError, match=match):
        EventWeights.from_mapping(bad)


def test_load_events_reads_csv_with_string_columns(tmp_path):
    path = tmp_path / "events.csv"
    _events().to_csv(path, index=False)
    out = load_events(str(path))
    assert len(out.valid) == 3 and out.quarantine.empty


def test_age_groups_and_segments():
    assert [age_group(a) for a in (12, 18, 30, 70, None, -1)] == ["<18", "18-24", "25-34", "55+", "unknown",
                                                                 "unknown"]
    seg = user_segments(pd.DataFrame({"user_id": [1, 2], "age": [30, np.nan], "region": ["DE", None]}))
    assert seg.to_dict() == {"1": "25-34|DE", "2": "unknown|unknown"}


# ------------------------------------------------------------------------------- validate_records (oracle)

_NOW = pd.Timestamp("2025-03-01T08:00:00.123456Z").to_pydatetime()
_POOLS = {
    "user_id": ["u1", "u2", " u3 ", "ü-7", "nan", "", "  ", "\u00a0", None, 5],
    "item_id": ["a", "b", "c", "zzz", "", None],
    "event": ["view", "VIEW ", " Purchase", "rating", "dislike", "return", "add_to_bag", "wishlist", "like", "",
              None],
    "ts": [None, "", "  ", "2025-01-01T10:00:00Z", "2025-01-01T10:31:00Z", "2025-01-01T10:00:00", "2025-01-01 10:00",
           "2025-01-01", "2025-01-01T10:00:00.123456+02:00", "2025-01-01T10:00:00.1234567Z", "1700000000",
           "not a time", "2025-13-01", "2025-01-01T25:00", "2025-01-01T12", 1700000000.0],
    "session_id": [None, "", " ", "s1"],
    "order_id": [None, "o1", ""],
    "button": [None, "heart", "not_interested", ""],
    "value": [None, 3.0, float("nan"), float("inf"), "ten", 2, True],
    "event_id": [None, "", " ", "e1", "e-ü", 7, 7.0],
}
_VALID = {"user_id": ["u1", "u2", " u3 ", "ü-7"], "item_id": ["a", "b", "c"],
          "event": ["view", "VIEW ", " Purchase", "rating", "return"],
          "ts": [None, "2025-01-01T10:00:00Z", "2025-01-01T10:31:00Z", "2025-01-01T11:30:00", "2025-01-01",
                 "2025-01-01T10:00:00.123456+02:00"],
          "session_id": [None, "", "s1"], "order_id": [None, "o1"], "button": [None, "heart", ""],
          "value": [None, 3.0], "event_id": [None, "e1", " ", "e2"]}


def _batch(rng: np.random.Generator, odd: float, n: int) -> list[dict]:
    """n records; each field from _VALID, or with probability ``odd`` from _POOLS (which holds every oddity)."""
    rows = []
    for _ in range(n):
        keys = [k for k in _POOLS if k in ("user_id", "item_id", "event") or rng.random() < 0.8]
        pools = {k: _POOLS[k] if rng.random() < odd else _VALID[k] for k in keys}
        rows.append({k: pools[k][rng.integers(len(pools[k]))] for k in keys})
    return rows


def _logged(valid: pd.DataFrame) -> pa.Table:
    """What the event log writes for these valid events."""
    from common.event_log import LOG_SCHEMA
    return pa.Table.from_pandas(valid.assign(ts=valid["ts"].dt.floor("us")), schema=LOG_SCHEMA,
                                preserve_index=False).replace_schema_metadata(None)


def _slow(rows: list[dict]):
    from common.event_log import _as_frame, _prepared
    return validate_events(_prepared(_as_frame(rows), _NOW), known_items={"a", "b", "c"}, with_ids=True)


@pytest.mark.parametrize("odd", [0.15, 0.0], ids=["odd", "valid"])
def test_validate_records_accepts_exactly_what_validate_events_accepts(odd):
    rng = np.random.default_rng(7)
    fast_taken = 0
    for _ in range(200):
        rows = _batch(rng, odd, int(rng.integers(1, 5)))
        fast = validate_records(rows, known_items={"a", "b", "c"}, default_ts=_NOW, with_ids=True)
        slow = _slow(rows)
        if fast is None:
            assert odd, f"a valid plain batch missed the fast path: {rows}"
            continue
        fast_taken += 1
        assert slow.quarantine.empty, f"fast path accepted rows validate_events rejects: {rows}"
        assert _logged(fast.valid).equals(_logged(slow.valid)), rows
    assert fast_taken >= (50 if odd else 200)  # the comparison ran


def test_validate_records_orders_and_cuts_sessions_as_validate_events():
    rows = [{"user_id": "u2", "item_id": "a", "event": "view", "ts": "2025-01-01T10:00:00Z"},
            {"user_id": "u1", "item_id": "b", "event": "view", "ts": "2025-01-01T11:00:00Z"},
            {"user_id": "u1", "item_id": "a", "event": "view", "ts": "2025-01-01T10:00:00Z"},
            {"user_id": "u1", "item_id": "c", "event": "purchase", "ts": "2025-01-01T11:00:00Z", "order_id": "o"}]
    fast = validate_records(rows, known_items={"a", "b", "c"}, with_ids=True)
    assert fast.valid[["user_id", "item_id"]].values.tolist() == [["u1", "a"], ["u1", "b"], ["u1", "c"], ["u2", "a"]]
    assert fast.valid["session_id"].tolist() == ["u1/1", "u1/2", "u1/2", "u2/3"]  # 60 min > the 30 min gap
    assert _logged(fast.valid).equals(_logged(_slow(rows).valid))


@pytest.mark.parametrize("rows", [
    [{"user_id": "u1", "item_id": "a", "event": "view"}],  # no ts and no default
    [{"user_id": "u1", "item_id": "zzz", "event": "view", "ts": "2025-01-01"}],  # unknown item
    [{"user_id": "u1", "item_id": "a", "event": "view", "ts": "2025-01-01", "colour": "red"}],  # not a schema key
    [{"user_id": 1, "item_id": "a", "event": "view", "ts": "2025-01-01"}],  # int id: validate_events converts
    [],
], ids=["no-ts", "unknown-item", "extra-key", "int-id", "empty"])
def test_validate_records_leaves_other_batches_to_validate_events(rows):
    assert validate_records(rows, known_items={"a"}) is None


def test_ids_are_carried_only_when_asked_and_a_naive_default_time_is_utc():
    rows = [{"user_id": "u1", "item_id": "a", "event": "view", "event_id": "e1"}]
    plain = validate_records(rows, known_items={"a"}, default_ts=datetime(2025, 1, 1, 10))
    assert list(plain.valid.columns) == EVENTS_SCHEMA.names
    assert plain.valid["ts"].iloc[0] == pd.Timestamp("2025-01-01T10:00:00Z")
    carried = validate_records(rows, known_items={"a"}, default_ts=_NOW, with_ids=True)
    assert carried.valid["event_id"].tolist() == ["e1"]
    assert "event_id" not in validate_events(pd.DataFrame(rows).assign(ts="2025-01-01")).valid.columns
