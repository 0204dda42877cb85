"""The serving graph end to end over HTTP (serve.run on the session's local Ray): every endpoint, routing, live
events, filters and exclusions, explanations, run-time business rules, and bad input."""
from __future__ import annotations

import dataclasses
import time
import uuid

import pandas as pd
import pytest
import requests

from common.event_log import EventLog


def get(service, path: str, **params) -> requests.Response:
    return requests.get(f"{service['url']}{path}", params=params, timeout=60)


def ok(service, path: str, **params) -> dict:
    r = get(service, path, **params)
    assert r.status_code == 200, r.text
    return r.json()


def post_events(service, events: list[dict]) -> requests.Response:
    return requests.post(f"{service['url']}/events", json={"events": events}, timeout=60)


def items(service) -> pd.DataFrame:
    return service["shop"]["items"]


def test_health_readiness_and_openapi(service):
    assert ok(service, "/healthz") == {"status": "ok"}
    ready = ok(service, "/readyz")
    assert ready["status"] == "ready" and ready["retriever"]["items"] == len(items(service))
    assert ready["reranker"]["ranker"].startswith("ranker:")
    assert ready["business_filter"]["replica"]  # every stage answers before the service says it is ready
    assert ready["retriever"]["text_encoder"]["model"].startswith("vitrine-effnet-minilm")
    paths = ok(service, "/openapi.json")["paths"]
    assert {"/items/{item_id}/similar", "/items/{item_id}/bought-together", "/users/{user_id}/recommendations",
            "/search", "/events", "/healthz", "/readyz"} <= set(paths)


def test_similar_items_explain_their_neighbour(service):
    df = items(service)
    item = df[df["in_stock"]]["item_id"].iloc[0]
    body = ok(service, f"/items/{item}/similar", k=5)
    assert body["strategy"] == "similar" and len(body["items"]) == 5
    ids = [r["item_id"] for r in body["items"]]
    assert item not in ids and len(set(ids)) == 5
    stock = dict(zip(df["item_id"], df["in_stock"]))
    assert all(stock[i] for i in ids)  # the default rules keep only items in stock
    for r in body["items"]:
        assert {"item_id", "score", "title", "category", "brand", "price", "in_stock", "reasons"} <= set(r)
        assert any(x["source"] in ("item", "learned") and x.get("because") == item for x in r["reasons"])
    scores = [r["score"] for r in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_similar_items_filters_hold(service):
    df = items(service)
    item = df["item_id"].iloc[0]
    category = sorted(df["category"].unique())[1]
    body = ok(service, f"/items/{item}/similar", k=5, category=category, price_max=float(df["price"].median()))
    assert body["items"], "a filter that matches items must return some"
    assert all(r["category"] == category and r["price"] <= df["price"].median() for r in body["items"])


def test_learned_candidates_reach_the_answers_and_obey_the_filters(service):
    """The shop's two-tower model: its candidates carry their model and score, and the catalogue's filters (the
    default in-stock rule, a category, a price bound) hold for them although its vectors hold no such fields."""
    assert ok(service, "/readyz")["retriever"]["learned"].get("two_tower")
    df = items(service)
    stock, price = dict(zip(df["item_id"], df["in_stock"])), dict(zip(df["item_id"], df["price"]))
    users = service["shop"]["events"]["user_id"].value_counts().index[:5]
    learned = []
    for user in users:
        for r in ok(service, f"/users/{user}/recommendations", k=10)["items"]:
            assert stock[r["item_id"]]
            learned += [x for x in r["reasons"] if x["source"] == "learned"]
    assert learned and all(x["model"] == "two_tower" and isinstance(x["score"], float) for x in learned)
    category = sorted(df["category"].unique())[2]
    kept = df[(df["category"] == category) & df["in_stock"]].sort_values("price")
    item, cap = kept["item_id"].iloc[0], float(kept["price"].iloc[-2])  # the cap drops the dearest of them
    body = ok(service, f"/items/{item}/similar", k=8, category=category, price_max=cap)  # its learned search is
    assert body["items"] and all(r["category"] == category and price[r["item_id"]] <= cap and stock[r["item_id"]]
                                 for r in body["items"])


def test_bought_together_gives_rules_with_their_lift(service):
    rules = ok(service, "/readyz")["retriever"]["rules"]
    assert rules
    events = service["shop"]["events"]
    top = events[events["event"] == "purchase"]["item_id"].value_counts().index[0]
    body = ok(service, f"/items/{top}/bought-together", k=5)
    assert body["strategy"] == "bought_together" and len(body["items"]) == 5  # rules, baskets, then popular
    for r in body["items"]:
        assert r["item_id"] != top
        reason = r["reasons"][0]
        assert reason["source"] in ("rules", "cooccurrence", "popular")
        assert reason["source"] == "popular" or top in reason["because"]
        if reason["source"] == "rules":
            assert reason["lift"] > 0 and "->" in reason["rule"]


def test_known_user_gets_personal_recommendations_without_seen_items(service):
    events = service["shop"]["events"]
    user = events["user_id"].value_counts().index[0]
    body = ok(service, f"/users/{user}/recommendations", k=10)
    assert body["strategy"] == "personal" and len(body["items"]) == 10
    seen = set(events[events["user_id"] == user]["item_id"])
    assert not seen & {r["item_id"] for r in body["items"]}
    for r in body["items"]:
        sources = {x["source"] for x in r["reasons"]}
        assert "ranker" in sources and sources - {"ranker"}


def test_explanations_are_true(service):
    """A similar item's reason holds the cosine to the seed item (in the visual space, or the two-tower's for a
    learned neighbour); a rule's reason holds the mined rule's lift."""
    import numpy as np

    from common.rules import BoughtTogether
    from common.vector_store import open_store
    from tests.serve.conftest import BASE

    store = open_store(service["shop"]["store"])
    item = items(service)["item_id"].iloc[0]
    body = ok(service, f"/items/{item}/similar", k=5)
    ids = [item] + [r["item_id"] for r in body["items"]]
    spaces = {source: {r["item_id"]: np.asarray(r["vector"]) for r in store.get(name, ids, with_vectors=True)}
              for source, name in (("item", f"{BASE}_visual"), ("learned", f"{BASE}_two_tower_items"))}
    checked_neighbours = 0
    for r in body["items"]:
        for reason in (x for x in r["reasons"] if x["source"] in spaces):
            vectors = spaces[reason["source"]]
            assert reason["score"] == pytest.approx(float(vectors[item] @ vectors[r["item_id"]]), abs=2e-3)
            checked_neighbours += 1
    assert checked_neighbours >= len(body["items"])
    artifacts = service["shop"]["artifacts"]
    with open(f"{artifacts}/rules/{BASE}/LATEST") as f:
        rules = BoughtTogether.load(f"{artifacts}/rules/{BASE}/{f.read().strip()}").rules
    lifts: dict = {}  # (antecedent, one consequent) -> the lifts of every rule with them
    for a, cs, lift in zip(rules["antecedents"], rules["consequents"], rules["lift"]):
        for c in cs:
            lifts.setdefault((tuple(a), c), []).append(round(float(lift), 3))
    checked = 0
    for antecedent in sorted({a for a, _ in lifts if len(a) == 1}):
        for r in ok(service, f"/items/{antecedent[0]}/bought-together", k=5)["items"]:
            reason = r["reasons"][0]
            if reason["source"] == "rules":
                assert round(reason["lift"], 3) in lifts[(tuple(reason["because"]), r["item_id"])]
                checked += 1
    assert checked


def test_a_user_with_nothing_gets_popular_items_by_segment(service):
    body = ok(service, f"/users/nobody-{uuid.uuid4().hex[:6]}/recommendations", k=5)
    assert body["strategy"] == "popular" and len(body["items"]) == 5
    assert all(any(x["source"] == "popular" for x in r["reasons"]) for r in body["items"])
    with_features = ok(service, f"/users/nobody-{uuid.uuid4().hex[:6]}/recommendations", k=5, age=29, region="PL")
    assert with_features["segment"] == "25-34|PL"


def test_events_change_the_very_next_recommendations(service):
    df = items(service)
    user = f"new-{uuid.uuid4().hex[:8]}"
    category = sorted(df["category"].unique())[2]
    clicked = df[df["category"] == category]["item_id"].iloc[:3].tolist()
    before = ok(service, f"/users/{user}/recommendations", k=5)
    assert before["strategy"] == "popular"
    r = post_events(service, [{"user_id": user, "item_id": i, "event": "view"} for i in clicked])
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 3 and r.json()["sessions"] == {user: 3}
    after = ok(service, f"/users/{user}/recommendations", k=5)
    assert after["strategy"] == "session"
    got = [x["item_id"] for x in after["items"]]
    assert not set(clicked) & set(got)  # seen in the session: excluded
    cat = dict(zip(df["item_id"], df["category"]))
    assert sum(cat[i] == category for i in got) >= 3
    assert any(x["source"] == "session" for r in after["items"] for x in r["reasons"])


def test_events_are_durable_and_bad_rows_are_rejected_with_reasons(service):
    df = items(service)
    user = f"durable-{uuid.uuid4().hex[:8]}"
    good = {"user_id": user, "item_id": df["item_id"].iloc[5], "event": "wishlist"}
    r = post_events(service, [good, {"user_id": user, "item_id": "no-such-item", "event": "view"},
                              {"user_id": user, "item_id": df["item_id"].iloc[6], "event": "teleport"}])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] == 1 and sorted(x["index"] for x in body["rejected"]) == [1, 2]
    assert all(x["reason"] for x in body["rejected"])
    logged = EventLog(service["cfg"].event_log).read()
    assert ((logged["user_id"] == user) & (logged["event"] == "wishlist")).sum() == 1


def test_concurrent_event_requests_each_get_their_own_answer(service):
    """Requests handled at the same time (the sink's threads, several replicas) each get only their own counts."""
    from concurrent.futures import ThreadPoolExecutor

    df = items(service)
    tag = uuid.uuid4().hex[:8]
    requests_ = [[{"user_id": f"burst-{tag}-{n}", "item_id": df["item_id"].iloc[n + j], "event": "view"}
                  for j in range(n + 1)] + ([{"user_id": f"burst-{tag}-{n}", "item_id": "nope", "event": "view"}]
                                            if n % 2 else [])
                 for n in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda events: post_events(service, events), requests_))
    for n, r in enumerate(answers):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["accepted"] == n + 1
        assert [x["index"] for x in body["rejected"]] == ([n + 1] if n % 2 else [])
        assert body["sessions"] == {f"burst-{tag}-{n}": n + 1}
    logged = EventLog(service["cfg"].event_log).read()
    assert logged["user_id"].str.startswith(f"burst-{tag}-").sum() == sum(n + 1 for n in range(8))


def test_a_batch_of_many_shoppers_is_answered_as_one(service):
    """A batch whose shoppers belong to different event sinks: one answer, rejections at their batch positions."""
    from serve.events import shard_of

    df = items(service)
    tag = uuid.uuid4().hex[:8]
    users = [f"mix-{tag}-{n}" for n in range(6)]
    assert len({shard_of(u, service["cfg"].event_shards) for u in users}) > 1  # the batch spans the sinks
    batch = []
    for n, user in enumerate(users):
        batch += [{"user_id": user, "item_id": df["item_id"].iloc[n + j], "event": "view"} for j in range(n + 1)]
        batch.append({"user_id": user, "item_id": "nope", "event": "view"})  # rejected, at this position
    r = post_events(service, batch)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] == sum(n + 1 for n in range(6))
    assert [x["index"] for x in body["rejected"]] == [i for i, e in enumerate(batch) if e["item_id"] == "nope"]
    assert body["sessions"] == {user: n + 1 for n, user in enumerate(users)}


def test_one_shoppers_concurrent_events_all_reach_the_session(service):
    """Six requests of one user at once: each is folded onto the one before (none reads a session another
    overwrites), so their answers count 1..6 and the session ends with all six."""
    from concurrent.futures import ThreadPoolExecutor

    df = items(service)
    user = f"rush-{uuid.uuid4().hex[:8]}"
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda n: post_events(service, [{"user_id": user, "item_id": df["item_id"].iloc[n],
                                                                 "event": "view"}]), range(6)))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert sorted(r.json()["sessions"][user] for r in answers) == [1, 2, 3, 4, 5, 6]


def test_an_event_sent_again_under_its_id_is_a_duplicate_not_a_second_event(service):
    df = items(service)
    user = f"retry-{uuid.uuid4().hex[:8]}"
    batch = [{"user_id": user, "item_id": df["item_id"].iloc[n], "event": "view", "event_id": f"{user}-{n}"}
             for n in range(3)]
    first = post_events(service, batch)
    assert first.status_code == 200 and first.json()["duplicates"] == [] and first.json()["sessions"] == {user: 3}
    again = post_events(service, batch + [{**batch[0], "event_id": f"{user}-new"}])  # a retry with one new event
    assert again.status_code == 200, again.text
    assert (again.json()["accepted"], again.json()["duplicates"], again.json()["sessions"]) == (1, [0, 1, 2], {user: 4})
    only_again = post_events(service, batch[1:])  # nothing new: still 200, not "no valid event"
    assert only_again.status_code == 200 and only_again.json()["accepted"] == 0
    assert only_again.json()["duplicates"] == [0, 1] and only_again.json()["sessions"] == {}
    logged = EventLog(service["cfg"].event_log).read()
    assert sorted(logged[logged["user_id"] == user]["event_id"]) == sorted([f"{user}-{n}" for n in range(3)]
                                                                           + [f"{user}-new"])


def test_retries_racing_the_first_attempt_append_once(service):
    """The same batch sent four times at once (a client retrying while its first request is still being written):
    one answer appends it, the other three answer duplicates, and the session counts it once."""
    from concurrent.futures import ThreadPoolExecutor

    df = items(service)
    user = f"race-{uuid.uuid4().hex[:8]}"
    batch = [{"user_id": user, "item_id": df["item_id"].iloc[n], "event": "view", "event_id": f"e{n}"}
             for n in range(2)]
    with ThreadPoolExecutor(4) as pool:
        answers = [r.json() for r in pool.map(lambda _: post_events(service, batch), range(4))]
    assert sorted(a["accepted"] for a in answers) == [0, 0, 0, 2], answers
    assert sorted(len(a["duplicates"]) for a in answers) == [0, 2, 2, 2]
    assert [a["sessions"] for a in answers if a["accepted"]] == [{user: 2}]
    logged = EventLog(service["cfg"].event_log).read()
    assert (logged["user_id"] == user).sum() == 2


@pytest.mark.parametrize("body", [
    {"events": []},
    {"events": [{"user_id": "u", "event": "view"}]},
    {"events": [{"user_id": "u", "item_id": "x", "event": "view", "surprise": 1}]},
    {"events": [{"user_id": "u", "item_id": "x", "event": "view"}] * 1001},
    {"nothing": True},
    "not json at all",
])
def test_malformed_event_bodies_are_422(service, body):
    kwargs = {"data": body} if isinstance(body, str) else {"json": body}
    r = requests.post(f"{service['url']}/events", timeout=60, **kwargs)
    assert r.status_code == 422 and "Traceback" not in r.text


def test_a_batch_with_no_valid_event_is_422_with_reasons(service):
    r = post_events(service, [{"user_id": "u", "item_id": "no-such-item", "event": "view"}])
    assert r.status_code == 422 and r.json()["rejected"][0]["reason"]


def test_text_search(service):
    body = ok(service, "/search", q="ankle boot", k=5)
    assert body["strategy"] == "search" and len(body["items"]) == 5
    assert all(r["reasons"][0]["source"] == "text" for r in body["items"])


@pytest.mark.parametrize("path, params, status", [
    ("/items/no-such-item/similar", {}, 404),
    ("/items/no-such-item/bought-together", {}, 404),
    ("/items/ITEM/similar", {"k": 0}, 422),
    ("/items/ITEM/similar", {"k": 101}, 422),
    ("/items/ITEM/similar", {"k": "ten"}, 422),
    ("/items/ITEM/similar", {"price_min": -1}, 422),
    ("/items/ITEM/similar", {"price_min": 50, "price_max": 10}, 422),
    ("/users/u/recommendations", {"age": 500}, 422),
    ("/search", {}, 422),
    ("/search", {"q": "x" * 600}, 422),
])
def test_bad_requests_get_a_message_not_a_trace(service, path, params, status):
    r = get(service, path.replace("ITEM", items(service)["item_id"].iloc[0]), **params)
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text and r.json()


def test_business_rules_change_at_run_time_without_a_restart(service):
    from ray import serve

    from serve.launch import deploy
    from tests.serve.conftest import wait_ready

    handle = serve.get_deployment_handle("BusinessFilter", app_name="vitrine")

    def replicas():
        return handle.replica.remote().result()

    def wait_rules(deny: tuple) -> None:  # a deploy returns before the replicas have reconfigured
        deadline = time.monotonic() + 60
        while handle.current.remote().result().deny_categories != deny:
            assert time.monotonic() < deadline, "the new rules never reached the filter"
            time.sleep(0.2)

    df = items(service)
    item = df["item_id"].iloc[0]
    before = replicas()
    denied = sorted(df["category"].unique())[0]
    pinned = df[df["in_stock"] & (df["category"] != denied)]["item_id"].iloc[-1]
    rules = {"deny_categories": [denied], "max_per_category": 1, "pinned": [pinned]}
    deploy(dataclasses.replace(service["cfg"], rules=rules))
    try:
        wait_rules((denied,))
        sim = ok(service, f"/items/{item}/similar", k=5)["items"]
        assert sim and all(r["category"] != denied for r in sim)
        assert len({r["category"] for r in sim}) == len(sim)  # at most one per category
        user = service["shop"]["events"]["user_id"].iloc[0]
        time.sleep(1.5)  # the ingress re-reads the rules (for pushdown and pinned items) once a second
        recs = ok(service, f"/users/{user}/recommendations", k=5)["items"]
        assert recs[0]["item_id"] == pinned and recs[0]["reasons"][0]["source"] == "pinned"
        assert replicas() == before  # reconfigured in place
    finally:
        deploy(service["cfg"])
        wait_rules(())
    wait_ready(service["url"])
    assert replicas() == before
