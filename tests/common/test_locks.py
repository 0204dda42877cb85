"""The event sink's per-user locks and its bounded memory of recent event ids."""
from __future__ import annotations

import threading

import pytest

from common.errors import ConfigError
from common.locks import RecentSet, StripedLocks


def test_recent_set_forgets_the_oldest_and_a_key_added_again_is_recent():
    recent = RecentSet(3)
    recent.add(["a", "b", "c"])
    recent.add(["a"])  # refreshed: now the newest
    recent.add(["d"])  # evicts b, the oldest
    assert [k in recent for k in "abcd"] == [True, False, True, True] and len(recent) == 3
    nothing = RecentSet(0)
    nothing.add(["a"])
    assert "a" not in nothing and len(nothing) == 0
    with pytest.raises(ConfigError, match="capacity"):
        RecentSet(-1)


def test_a_users_lock_holds_another_batch_of_that_user_but_not_of_others():
    locks = StripedLocks(64)
    other = next(u for u in (f"u{i}" for i in range(1000)) if locks.stripe(u) != locks.stripe("u-a"))
    entered = threading.Event()

    def take(user: str) -> None:
        with locks.held([user]):
            entered.set()

    with locks.held(["u-a", "u-a"]):  # a batch with the user twice takes its stripe once
        t = threading.Thread(target=take, args=("u-a",))
        t.start()
        assert not entered.wait(0.3)  # the same user's batch waits
        threading.Thread(target=take, args=(other,)).start()
        assert entered.wait(5)  # another stripe's does not
    t.join(5)
    assert not t.is_alive()
    with pytest.raises(ConfigError, match="stripes"):
        StripedLocks(0)
