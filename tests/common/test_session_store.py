"""Live sessions in a real (Milvus Lite) store: the fold oracle, read-after-write, gaps, dislikes, several users."""
from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from common.errors import ConfigError, SchemaError
from common.profiles import session_update
from common.session_store import MAX_RECENT, SessionStore
from common.vector_store import open_store

DIM = 8
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
_names = itertools.count()


@pytest.fixture(scope="module")
def store(store_dir):
    s = open_store(store_dir)
    yield s
    s.close()


@pytest.fixture
def sessions(store) -> SessionStore:
    return SessionStore(store, f"sessions_{next(_names)}", dim=DIM, model="test-encoder", gap_seconds=600)


@pytest.fixture(scope="module")
def vectors() -> dict[str, np.ndarray]:
    v = np.random.default_rng(0).standard_normal((12, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return {f"i{k}": v[k] for k in range(len(v))}


def _events(*rows: tuple[str, str, str, int]) -> pd.DataFrame:
    """(user, item, event, seconds after T0) rows."""
    return pd.DataFrame([{"user_id": u, "item_id": i, "event": e, "ts": T0 + timedelta(seconds=s)}
                         for u, i, e, s in rows])


def _fold(vectors, items) -> np.ndarray:
    s = None
    for i in items:
        s = session_update(s, vectors[i])
    return s


def test_update_then_get_equals_the_hand_fold(sessions, vectors):
    items = ["i0", "i3", "i5", "i3", "i7"]
    out = sessions.update(_events(*[("u1", i, "view", k) for k, i in enumerate(items)]), vectors)
    got = sessions.get("u1")  # the very next read sees the new state
    assert got is not None
    np.testing.assert_allclose(got.vector, _fold(vectors, items), atol=1e-6)
    np.testing.assert_allclose(out["u1"].vector, got.vector, atol=1e-6)
    assert got.recent == ("i7", "i3", "i5", "i0")
    assert got.seen == ("i7", "i3", "i5", "i0")
    assert got.n_events == 5
    assert got.updated_at == (T0 + timedelta(seconds=4)).isoformat()
    # A second batch continues the stored session: the fold goes on from the stored vector.
    sessions.update(_events(("u1", "i9", "add_to_bag", 30)), vectors)
    got = sessions.get("u1")
    np.testing.assert_allclose(got.vector, _fold(vectors, [*items, "i9"]), atol=1e-5)
    assert got.n_events == 6 and got.recent[0] == "i9"


def test_another_store_client_sees_the_update(sessions, vectors, store_dir):
    sessions.update(_events(("u1", "i1", "view", 0)), vectors)
    other = open_store(store_dir)  # as another Serve replica would
    try:
        replica = SessionStore(other, sessions.collection, dim=DIM, model="test-encoder", gap_seconds=600)
        np.testing.assert_allclose(replica.get("u1").vector, vectors["i1"], atol=1e-6)
    finally:
        other.close()


def test_a_gap_starts_a_new_session(sessions, vectors):
    sessions.update(_events(("u1", "i0", "view", 0), ("u1", "i1", "view", 60)), vectors)
    sessions.update(_events(("u1", "i2", "view", 60 + 601), ("u1", "i4", "view", 700)), vectors)
    got = sessions.get("u1")
    np.testing.assert_allclose(got.vector, _fold(vectors, ["i2", "i4"]), atol=1e-6)
    assert (got.recent, got.seen, got.n_events) == (("i4", "i2"), ("i4", "i2"), 2)
    # A gap inside one batch too; a gap of exactly gap_seconds does not cut.
    sessions.update(_events(("u2", "i0", "view", 0), ("u2", "i1", "view", 600)), vectors)
    assert sessions.get("u2").recent == ("i1", "i0")
    sessions.update(_events(("u2", "i3", "view", 700), ("u2", "i2", "view", 1301)), vectors)
    assert sessions.get("u2").recent == ("i2",)


def test_negative_events_do_not_move_the_vector_but_are_seen(sessions, vectors):
    sessions.update(_events(("u1", "i0", "view", 0), ("u1", "i1", "dislike", 1), ("u1", "i2", "return", 2)), vectors)
    got = sessions.get("u1")
    np.testing.assert_allclose(got.vector, vectors["i0"], atol=1e-6)
    assert got.recent == ("i0",)
    assert got.seen == ("i2", "i1", "i0")
    assert got.n_events == 3


def test_only_negative_events_store_no_row(sessions, vectors):
    out = sessions.update(_events(("u3", "i1", "dislike", 0)), vectors)
    assert out["u3"].vector is None and out["u3"].seen == ("i1",)
    assert sessions.get("u3") is None
    # Once a positive event comes in the same batch, the earlier dislike is kept in seen.
    sessions.update(_events(("u4", "i1", "dislike", 0), ("u4", "i2", "view", 1)), vectors)
    assert sessions.get("u4").seen == ("i2", "i1")
    # A gap that ends a stored session, followed only by a dislike: the ended session is not served as live.
    sessions.update(_events(("u4", "i3", "dislike", 5000)), vectors)
    assert sessions.get("u4") is None


def test_two_users_in_one_batch_and_items_without_vectors(sessions, vectors, caplog):
    batch = _events(("u1", "i0", "view", 0), ("u2", "i5", "view", 1), ("u1", "nope", "view", 2),
                    ("u2", "i6", "purchase", 3), ("u1", "i1", "wishlist", 4))
    with caplog.at_level("INFO", logger="common.session_store"):
        out = sessions.update(batch.sample(frac=1.0, random_state=3), vectors)  # any row order: sorted by ts
    assert set(out) == {"u1", "u2"}
    assert "1 event(s) on items without a vector" in caplog.text
    u1, u2 = sessions.get("u1"), sessions.get("u2")
    np.testing.assert_allclose(u1.vector, _fold(vectors, ["i0", "i1"]), atol=1e-6)
    np.testing.assert_allclose(u2.vector, _fold(vectors, ["i5", "i6"]), atol=1e-6)
    assert u1.seen == ("i1", "nope", "i0") and u1.recent == ("i1", "i0")


def test_recent_is_bounded(sessions, vectors):
    items = [f"i{k % 12}" for k in range(40)] + [f"x{k}" for k in range(30)]
    more = {**vectors, **{f"x{k}": vectors[f"i{k % 12}"] for k in range(30)}}
    sessions.update(_events(*[("u1", i, "view", k) for k, i in enumerate(items)]), more)
    got = sessions.get("u1")
    assert len(got.recent) == MAX_RECENT and got.recent[0] == "x29"
    assert len(set(got.seen)) == len(got.seen) == 42


def test_bad_input(sessions, store, vectors):
    with pytest.raises(ConfigError, match="-1"):
        SessionStore(store, "sessions_bad", dim=DIM, model="m", gap_seconds=-1)
    with pytest.raises(SchemaError, match="ts"):
        sessions.update(pd.DataFrame({"user_id": ["u1"], "item_id": ["i1"], "event": ["view"]}), vectors)
    with pytest.raises(ConfigError, match=r"\[3\]"):
        sessions.update(_events(("u1", "i1", "view", 0)), {"i1": np.ones(3)})
    assert sessions.update(pd.DataFrame(columns=["user_id", "item_id", "event", "ts"]), vectors) == {}


def test_concurrent_updates_of_one_user_lose_nothing(sessions, vectors, monkeypatch):
    """Serve runs the sink's requests on threads: two batches of one user must not read the same old session."""
    import threading
    import time

    real_get = sessions.store.get

    def slow_get(*args, **kwargs):  # the real read, made slow enough that unguarded threads would overlap
        rows = real_get(*args, **kwargs)
        time.sleep(0.05)
        return rows

    monkeypatch.setattr(sessions.store, "get", slow_get)
    items = [f"i{k}" for k in range(8)]
    threads = [threading.Thread(target=sessions.update, args=(_events(("u9", item, "view", k)), vectors))
               for k, item in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = sessions.get("u9")
    assert got.n_events == 8 and set(got.seen) == set(items)
