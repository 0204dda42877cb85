"""Events: validation with quarantine reasons, timestamp forms, derived sessions, weights, user segments."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.errors import ConfigError, SchemaError
from common.events import (EVENTS_SCHEMA, SESSION_GAP, EventWeights, age_group, load_events, user_segments,
                           validate_events)


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
