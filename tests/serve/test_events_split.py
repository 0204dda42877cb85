"""The event sink appends concurrent requests together; each request must get back exactly its own share."""
from common.event_log import EventLog
from serve.events import split_result


def _row(user, item, event="view", **extra):
    return {"user_id": user, "item_id": item, "event": event, "ts": "2026-11-01T10:00:00Z", **extra}


def test_each_request_gets_its_own_counts_rejections_and_sessions(tmp_path):
    log = EventLog(str(tmp_path / "log"), known_items={"a", "b", "c"})
    batches = [
        [_row("u1", "a"), _row("u1", "nope"), _row("u1", "b", "purchase")],  # one unknown item
        [_row("u2", "c", "bogus")],  # nothing valid
        [_row("u3", "a"), _row("u1", "c")],  # a user shared with the first request
    ]
    result = log.append([row for batch in batches for row in batch])
    assert result.accepted == 4 and sorted(r["index"] for r in result.rejected) == [1, 3]
    sessions = {"u1": 3, "u3": 1}  # as SessionStore.update reports them
    first, second, third = split_result(batches, result, sessions)
    assert first["accepted"] == 2 and [r["index"] for r in first["rejected"]] == [1]
    assert "item" in first["rejected"][0]["reason"]
    assert first["sessions"] == {"u1": 3}
    assert second["accepted"] == 0 and [r["index"] for r in second["rejected"]] == [0] and second["sessions"] == {}
    assert "event" in second["rejected"][0]["reason"]
    assert third["accepted"] == 2 and third["rejected"] == [] and third["sessions"] == {"u3": 1, "u1": 3}
    assert sum(part["accepted"] for part in (first, second, third)) == result.accepted
    assert len(log.read()) == 4


def test_a_single_request_is_passed_through():
    from common.event_log import AppendResult

    result = AppendResult(accepted=1, rejected=[{"index": 1, "reason": "bad ts"}], part="x")
    (only,) = split_result([[_row("u", "a"), _row("u", "b")]], result, {"u": 1})
    assert only == {"accepted": 1, "rejected": [{"index": 1, "reason": "bad ts"}], "sessions": {"u": 1}}
