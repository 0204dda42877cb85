import pytest

from common.errors import ConfigError
from common.ttl_cache import TtlRows


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_fetches_only_what_is_not_cached_and_remembers_absent_rows():
    calls = []

    def fetch(ids):
        calls.append(list(ids))
        return {i: {"v": i} for i in ids if i != "gone"}

    cache = TtlRows(5.0, timer=Clock())
    assert cache.get_many(["a", "b", "a"], fetch) == {"a": {"v": "a"}, "b": {"v": "b"}}
    assert cache.get_many(["b", "c", "gone"], fetch) == {"b": {"v": "b"}, "c": {"v": "c"}, "gone": None}
    assert cache.get("gone", fetch) is None
    assert calls == [["a", "b"], ["c", "gone"]]
    assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 4


def test_entries_expire_after_ttl():
    clock, store = Clock(), {"a": 1}
    cache = TtlRows(5.0, timer=clock)
    fetch = lambda ids: {i: store[i] for i in ids if i in store}  # noqa: E731
    assert cache.get("a", fetch) == 1
    store["a"] = 2
    clock.now = 4.9
    assert cache.get("a", fetch) == 1  # within the ttl: the cached row
    clock.now = 5.1
    assert cache.get("a", fetch) == 2  # expired: read again


def test_zero_ttl_always_fetches_and_bounds_are_checked():
    calls = []
    cache = TtlRows(0)
    for _ in range(3):
        cache.get("a", lambda ids: calls.append(ids) or {"a": 1})
    assert len(calls) == 3 and cache.stats()["entries"] == 0
    with pytest.raises(ConfigError):
        TtlRows(-1)
    with pytest.raises(ConfigError):
        TtlRows(1, max_entries=0)


def test_size_is_bounded():
    cache = TtlRows(60, max_entries=3, timer=Clock())
    cache.get_many(list("abcdef"), lambda ids: {i: i for i in ids})
    assert cache.stats()["entries"] == 3
