"""Event sinks by user: every event of a user reaches one sink, and the shards' answers merge into the batch's."""
from __future__ import annotations

import pytest

from common.errors import ConfigError
from serve.app import sink_name
from serve.config import ServeConfig
from serve.events import merge_answers, partial_answer, shard_of, split_by_user


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
    answers = [{"accepted": 1, "duplicates": [0], "rejected": [{"index": 1, "reason": "unknown item 'x'"}],
                "sessions": {"a": 1}},
               {"accepted": 2, "duplicates": [], "rejected": [{"index": 0, "reason": "unknown event 'y'"}],
                "sessions": {"b": 2}}]
    assert merge_answers(answers, positions) == {
        "accepted": 3, "duplicates": [0], "sessions": {"a": 1, "b": 2},
        "rejected": [{"index": 1, "reason": "unknown event 'y'"}, {"index": 3, "reason": "unknown item 'x'"}]}


def test_event_shards_config():
    assert ServeConfig(event_shards=3).event_shards == 3
    for bad in (0, 65, 1.5, True):
        with pytest.raises(ConfigError, match="event_shards"):
            ServeConfig(event_shards=bad)
    for bad in (-1, 10_000_001, 2.0, False):
        with pytest.raises(ConfigError, match="dedup_event_ids"):
            ServeConfig(dedup_event_ids=bad)
    assert [sink_name(i) for i in range(3)] == ["EventSink", "EventSink1", "EventSink2"]


def test_a_partial_failure_says_what_was_appended_and_what_to_send_again():
    positions = [[0, 3], [1, 2, 4], [5]]
    answers = [{"accepted": 1, "duplicates": [1], "rejected": [], "sessions": {"a": 2}},
               RuntimeError("sink restarting"),
               {"accepted": 0, "duplicates": [], "rejected": [{"index": 0, "reason": "unknown item 'x'"}],
                "sessions": {}}]
    assert partial_answer(answers, positions) == {
        "accepted": 1, "duplicates": [3], "rejected": [{"index": 5, "reason": "unknown item 'x'"}],
        "sessions": {"a": 2}, "not_appended": [1, 2, 4]}


class _FakeSink:
    """A sink's handle in-process (the real sinks run in tests/serve/test_service.py): appends or fails."""

    def __init__(self, fail: bool) -> None:
        self.fail, self.append = fail, self

    def remote(self, rows):
        async def answer():
            if self.fail:
                from ray.exceptions import RayActorError
                raise RayActorError()
            return {"accepted": len(rows), "duplicates": [], "rejected": [],
                    "sessions": {r["user_id"]: 1 for r in rows}}
        return answer()


def _ingress(sinks):
    from serve.ingress import Ingress

    # The class as written (Serve's @serve.ingress wraps it in an ASGI class that needs a running Serve).
    cls = [c for c in Ingress.func_or_class.__mro__ if c.__module__ == "serve.ingress" and c.__name__ == "Ingress"][-1]
    ingress = object.__new__(cls)
    cls.__init__(ingress, ServeConfig(event_shards=len(sinks)), None, None, None, sinks)
    return ingress


def test_the_ingress_answers_a_partial_failure_with_what_to_send_again():
    import asyncio
    import json

    from serve.ingress import EventBatch

    users = [f"u{i}" for i in range(8)]
    batch = EventBatch(events=[{"user_id": u, "item_id": "i", "event": "view"} for u in users])
    failing = [i for i, u in enumerate(users) if shard_of(u, 2) == 1]
    assert 0 < len(failing) < len(users)
    answer = asyncio.run(_ingress([_FakeSink(False), _FakeSink(True)]).post_events(batch))
    body = json.loads(answer.body)
    assert answer.status_code == 503 and answer.headers["retry-after"]
    assert body["not_appended"] == failing and body["accepted"] == len(users) - len(failing)
    assert body["error"]  # the one-line message of the failure
    with pytest.raises(Exception, match="RayActorError|actor"):  # all failed: the usual error mapping answers
        asyncio.run(_ingress([_FakeSink(True), _FakeSink(True)]).post_events(batch))
