"""Event sinks by user: every event of a user reaches one sink, and the shards' answers merge into the batch's."""
from __future__ import annotations

import pytest

from common.errors import ConfigError
from serve.app import sink_name
from serve.config import ServeConfig
from serve.events import merge_answers, shard_of, split_by_user


def test_a_users_events_all_go_to_one_shard_and_users_spread():
    rows = [{"user_id": f"u{n % 50}", "item_id": "i", "event": "view"} for n in range(200)]
    positions = split_by_user(rows, 4)
    assert sorted(i for where in positions for i in where) == list(range(200))  # every row once
    for shard, where in enumerate(positions):
        assert all(shard_of(rows[i]["user_id"], 4) == shard for i in where) and where == sorted(where)
    owners = {}
    for shard, where in enumerate(positions):
        for i in where:
            assert owners.setdefault(rows[i]["user_id"], shard) == shard
    assert all(len(where) >= 20 for where in positions)  # 50 users over 4 shards: none empty or lopsided
    assert shard_of("u7", 1) == 0 and shard_of("u7", 4) == shard_of("u7", 4)  # stable (crc32, not hash())


def test_answers_merge_back_to_batch_positions():
    positions = [[0, 3], [1, 2, 4]]
    answers = [{"accepted": 1, "rejected": [{"index": 1, "reason": "unknown item 'x'"}], "sessions": {"a": 1}},
               {"accepted": 2, "rejected": [{"index": 0, "reason": "unknown event 'y'"}], "sessions": {"b": 2}}]
    assert merge_answers(answers, positions) == {
        "accepted": 3, "sessions": {"a": 1, "b": 2},
        "rejected": [{"index": 1, "reason": "unknown event 'y'"}, {"index": 3, "reason": "unknown item 'x'"}]}


def test_event_shards_config():
    assert ServeConfig(event_shards=3).event_shards == 3
    for bad in (0, 65, 1.5, True):
        with pytest.raises(ConfigError, match="event_shards"):
            ServeConfig(event_shards=bad)
    assert [sink_name(i) for i in range(3)] == ["EventSink", "EventSink1", "EventSink2"]
