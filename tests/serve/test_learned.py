"""Learned vectors across a retraining: the retriever (in-process, on the serve tests' shop) reads the versioned
collections behind the aliases, never pairs one training's user vector with another's items, and picks up a
model trained after it started. The vectors here are planted (each user's vector is one item's vector), which
is what makes the pairing visible; the models' quality is tested with the training jobs."""
from __future__ import annotations

import numpy as np
import pytest

from common.vector_store import open_store, replace_vectors
from serve.learned import LearnedModels, version_of
from tests.serve.conftest import BASE, serve_config

USERS, ITEMS = f"{BASE}_graphsage_users", f"{BASE}_graphsage_items"  # the shop has a two-tower model


def _publish(store, name: str, version: str, ids: list[str], vectors: np.ndarray) -> None:
    replace_vectors(store, name, version, f"graphsage-{version}", ids, vectors, index="FLAT")


def _planted(reason: dict) -> bool:
    return reason["source"] == "learned" and reason["model"] == "graphsage"


def _graphsage(retriever) -> str | None:
    return retriever._state()["learned"].get("graphsage")


def _learned_top(retriever, user: str) -> str | None:
    found = retriever.for_user(user, 20)
    learned = [c for c in found.candidates if any(_planted(r) for r in c.reasons)]
    best = max(learned, key=lambda c: max(r["score"] for r in c.reasons if _planted(r)), default=None)
    return best.item_id if best is not None else None


@pytest.fixture
def learned_store(shop):
    store = open_store(shop["store"])
    yield store
    for name in (USERS, ITEMS):
        store.drop_collection(name)
    store.close()


def test_version_of():
    assert version_of("shop_two_tower_items__v20261130") == "v20261130"
    assert version_of("shop_two_tower_items") == ""


def test_user_vectors_only_meet_items_of_their_own_training(shop, learned_store):
    from serve.retriever import Retriever

    rng = np.random.default_rng(0)
    items = shop["items"]["item_id"].astype(str).tolist()[:20]
    user = "planted-user"
    retriever = Retriever.func_or_class(serve_config(shop, learned_check_s=0.0))
    assert _graphsage(retriever) is None

    v1 = rng.standard_normal((len(items), 16)).astype(np.float32)
    _publish(learned_store, ITEMS, "v1", items, v1)
    _publish(learned_store, USERS, "v1", [user], v1[[3]])  # the user is item 3, in v1's space
    assert _graphsage(retriever) == "v1"  # trained after the retriever started
    assert _learned_top(retriever, user) == items[3]

    v2 = rng.standard_normal((len(items), 16)).astype(np.float32)
    _publish(learned_store, ITEMS, "v2", items, v2)  # a retraining between its two moves
    assert _graphsage(retriever) is None
    assert _learned_top(retriever, user) is None  # v1's user vector never searches v2's items

    _publish(learned_store, USERS, "v2", [user], v2[[7]])  # in v2 the user is item 7
    assert _graphsage(retriever) == "v2"
    assert _learned_top(retriever, user) == items[7]  # the cached v1 user vector did not outlive its model
    assert retriever.learned.mismatches >= 1


def test_a_version_dropped_under_a_read_sits_the_model_out_once(shop, learned_store):
    from serve.retriever import Retriever

    items = shop["items"]["item_id"].astype(str).tolist()[:10]
    vectors = np.eye(10, 16, dtype=np.float32)
    _publish(learned_store, ITEMS, "v1", items, vectors)
    _publish(learned_store, USERS, "v1", ["u-drop"], vectors[[2]])
    retriever = Retriever.func_or_class(serve_config(shop, learned_check_s=3600.0))  # resolved once, at start
    assert _learned_top(retriever, "u-drop") == items[2]
    _publish(learned_store, ITEMS, "v2", items, vectors)
    _publish(learned_store, USERS, "v2", ["u-drop"], vectors[[5]])  # v1 is dropped under the retriever
    assert _learned_top(retriever, "u-drop") is None  # no error reaches the caller; the model sat out
    assert _learned_top(retriever, "u-drop") == items[5]  # and was resolved again


def test_learned_models_check_at_most_every_check_s(shop, learned_store):
    clock = [0.0]
    models = LearnedModels(learned_store, BASE, check_s=5.0, timer=lambda: clock[0])
    assert "graphsage" not in [v.model for v in models.current()]
    items = shop["items"]["item_id"].astype(str).tolist()[:4]
    _publish(learned_store, ITEMS, "v1", items, np.eye(4, 8, dtype=np.float32))
    _publish(learned_store, USERS, "v1", ["u"], np.eye(1, 8, dtype=np.float32))
    assert "graphsage" not in [v.model for v in models.current()]  # not looked again yet
    clock[0] = 5.0
    assert ("graphsage", "v1") in [(v.model, v.version) for v in models.current()]


def test_learned_candidates_obey_the_pushed_down_filter(shop, learned_store):
    """The default rules push `in_stock == true` into retrieval; learned item vectors hold no such field."""
    from serve.retriever import Retriever

    items = shop["items"]["item_id"].astype(str).tolist()
    vectors = np.random.default_rng(1).standard_normal((len(items), 16)).astype(np.float32)
    _publish(learned_store, ITEMS, "v1", items, vectors)
    _publish(learned_store, USERS, "v1", ["u-filter"], vectors[[0]])
    retriever = Retriever.func_or_class(serve_config(shop))
    found = retriever.for_user("u-filter", 20, "in_stock == true")
    learned = [c for c in found.candidates if any(_planted(r) for r in c.reasons)]
    assert learned and all(c.fields["in_stock"] for c in learned)
