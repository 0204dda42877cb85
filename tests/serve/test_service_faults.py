"""Faults under a running service: the vector store going away and coming back, a replica killed while events
arrive. Acknowledged events are never lost; clients see 503 with Retry-After, never a stack trace."""
from __future__ import annotations

import time
import uuid

import ray
import requests

from common import milvus_local
from common.event_log import EventLog
from serve.app import sink_name
from serve.events import shard_of


def _until(fn, timeout: float = 90.0, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(every)


def test_store_outage_answers_503_with_retry_after_then_recovers(service):
    shop, url = service["shop"], service["url"]
    item = shop["items"]["item_id"].iloc[0]
    assert requests.get(f"{url}/items/{item}/similar", timeout=60).status_code == 200
    milvus_local.stop(shop["data_dir"])
    try:
        r = requests.get(f"{url}/items/{item}/similar", timeout=60)
        assert r.status_code == 503, r.text
        assert r.headers.get("Retry-After") and "unavailable" in r.json()["error"] and "Traceback" not in r.text
        assert requests.get(f"{url}/readyz", timeout=60).status_code == 503
        assert requests.get(f"{url}/healthz", timeout=60).status_code == 200  # alive, not ready
    finally:
        milvus_local.ensure_server(shop["data_dir"], port=shop["port"])
    _until(lambda: requests.get(f"{url}/items/{item}/similar", timeout=60).status_code == 200)
    assert requests.get(f"{url}/readyz", timeout=60).status_code == 200


def _replica_actors(deployment: str) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and f"#{deployment}#" in a["name"])


def test_a_killed_replica_is_replaced_and_no_acknowledged_event_is_lost(service):
    shop, url = service["shop"], service["url"]
    user = f"crash-{uuid.uuid4().hex[:8]}"
    items = shop["items"]["item_id"].tolist()
    acked: list[str] = []
    statuses: list[int] = []

    def send(i: int) -> None:
        r = requests.post(f"{url}/events", timeout=60,
                          json={"events": [{"user_id": user, "item_id": items[i % len(items)], "event": "view",
                                            "session_id": f"s-{i}", "event_id": f"e-{i}"}]})
        statuses.append(r.status_code)
        assert r.status_code in (200, 503), r.text
        if r.status_code == 200:
            acked.append(f"s-{i}")
        else:
            assert r.headers.get("Retry-After")

    for i in range(5):
        send(i)
    [victim] = _replica_actors(sink_name(shard_of(user, service["cfg"].event_shards)))  # the user's sink
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    i = 5
    while len(acked) < 15:  # keep sending through the replacement
        send(i)
        i += 1
        assert i < 400, f"the service did not recover: {statuses[-5:]}"
    replaced = _until(lambda: [a for a in _replica_actors(sink_name(shard_of(user, service["cfg"].event_shards)))
                               if a != victim])
    assert replaced
    logged = EventLog(service["cfg"].event_log).read()
    assert set(acked) <= set(logged[logged["user_id"] == user]["session_id"])
    # The replacement read the ids of the log's latest events at start-up: events acknowledged by the killed
    # replica, sent again, are duplicates, not second events.
    before_kill = [{"user_id": user, "item_id": items[i % len(items)], "event": "view", "session_id": f"s-{i}",
                    "event_id": f"e-{i}"} for i in range(5) if f"s-{i}" in acked]
    assert before_kill
    r = requests.post(f"{url}/events", json={"events": before_kill}, timeout=60)
    assert r.status_code == 200 and r.json()["accepted"] == 0, r.text
    assert r.json()["duplicates"] == list(range(len(before_kill))), r.text
    assert len(EventLog(service["cfg"].event_log).read().query("user_id == @user")) == len(logged.query(
        "user_id == @user"))
