"""The learning loop while the service runs: events it took are exported with the offline history, the rules and
the ranker are retrained on them, and the running graph serves the new versions without a redeploy."""
from __future__ import annotations

import time
import uuid

import requests

from common.event_export import export_events
from common.rules import RulesConfig
from jobs.mine_rules import MineRulesConfig
from jobs.mine_rules import run as mine_rules
from jobs.train_ranker import TrainRankerConfig
from jobs.train_ranker import run as train_ranker
from tests.serve.conftest import BASE


def _ready(url: str) -> dict:
    r = requests.get(f"{url}/readyz", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_served_events_retrain_rules_and_ranker_and_the_service_picks_them_up(service):
    shop, url, cfg = service["shop"], service["url"], service["cfg"]
    before = _ready(url)
    user = f"loop-{uuid.uuid4().hex[:8]}"
    items = shop["items"]["item_id"].tolist()
    order = [{"user_id": user, "item_id": i, "event": "purchase", "order_id": f"{user}-o", "value": 10.0,
              "event_id": f"{user}-{i}"} for i in items[:2]]
    assert requests.post(f"{url}/events", json={"events": order}, timeout=60).status_code == 200

    out = str(shop["tmp"] / "retrain" / f"{user}.parquet")
    exported = export_events(out, cfg.event_log, [cfg.events])
    assert exported.from_log >= 2 and exported.from_files == len(shop["events"])
    rules = mine_rules(MineRulesConfig(events=out, name=BASE, artifacts_uri=shop["artifacts"],
                                       rules=RulesConfig(min_support=0.003, min_confidence=0.05)))
    ranker = train_ranker(TrainRankerConfig(events=out, collection=BASE, artifacts_uri=shop["artifacts"]))
    assert rules.version != before["retriever"]["rules"]

    deadline = time.monotonic() + 60  # artifacts_check_s is 1 s in the tests (30 s by default)
    while True:
        now = _ready(url)
        if now["retriever"]["rules"] == rules.version and now["reranker"]["ranker"] == ranker.identity:
            break
        assert time.monotonic() < deadline, f"the new rules/ranker were not picked up: {now}"
        time.sleep(0.5)
    body = requests.get(f"{url}/users/{shop['users']['user_id'].iloc[0]}/recommendations", params={"k": 5},
                        timeout=60).json()
    models = {x["model"] for r in body["items"] for x in r["reasons"] if x["source"] == "ranker"}
    assert models == {ranker.identity}  # every result ordered by the new ranker


def test_events_reach_the_history_so_an_ended_sessions_purchase_stays_excluded(service):
    """A purchase lives in the shopper's session; once the history is read again (history_refresh_s, 1 s here) the
    service knows it without the session: after the session ends the shopper is known (personal strategy), the item
    seeds item-to-item candidates and is never recommended back."""
    from common.vector_store import open_store
    from serve.retriever import sessions_collection

    shop, url = service["shop"], service["url"]
    user = f"hist-{uuid.uuid4().hex[:8]}"
    bought = shop["items"]["item_id"].iloc[7]
    before = _ready(url)["retriever"]["history"]["events"]
    r = requests.post(f"{url}/events", timeout=60, json={"events": [
        {"user_id": user, "item_id": bought, "event": "purchase", "order_id": f"{user}-o", "event_id": "p1"}]})
    assert r.status_code == 200 and r.json()["accepted"] == 1
    deadline = time.monotonic() + 60
    while _ready(url)["retriever"]["history"]["events"] <= before:
        assert time.monotonic() < deadline, "the history was not read again"
        time.sleep(0.5)
    open_store(shop["store"]).delete(sessions_collection(BASE), [user])  # the session ends (its row is gone)
    body = requests.get(f"{url}/users/{user}/recommendations", params={"k": 8}, timeout=60).json()
    assert body["strategy"] == "personal", body
    assert bought not in [x["item_id"] for x in body["items"]]
    assert any(x.get("because") == bought for r in body["items"] for x in r["reasons"] if x["source"] == "item")


def test_the_first_sink_compacts_the_event_log_beside_the_appends(service):
    """Every test's events are appended while the first sink merges parts older than compact_events_s (2 s here):
    the user's appended parts end up in merged parts, and the log reads the same events."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from common.event_log import REPLACES_KEY, EventLog

    url, cfg = service["url"], service["cfg"]
    user = f"compact-{uuid.uuid4().hex[:8]}"
    items = service["shop"]["items"]["item_id"].tolist()
    for n in range(6):  # six parts
        r = requests.post(f"{url}/events", timeout=60, json={"events": [
            {"user_id": user, "item_id": items[n], "event": "view", "event_id": f"c{n}"}]})
        assert r.status_code == 200
    log = EventLog(cfg.event_log)
    deadline = time.monotonic() + 60

    def merged_mine() -> bool:  # the user's six events all in merged parts (parts that list what they replace)
        found = 0
        for path in Path(cfg.event_log).glob("date=*/part-*.parquet"):
            try:
                if REPLACES_KEY in (pq.read_schema(path).metadata or {}):
                    found += pq.read_table(path, columns=["user_id"])["user_id"].to_pylist().count(user)
            except FileNotFoundError:  # merged again and deleted meanwhile: look again
                return False
        return found == 6

    while not merged_mine():
        assert time.monotonic() < deadline, "the sink did not compact the log"
        time.sleep(0.5)
    logged = log.read()
    assert sorted(logged.loc[logged["user_id"] == user, "event_id"]) == [f"c{n}" for n in range(6)]
