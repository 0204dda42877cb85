"""The event sink's per-user router (serve/routing.py): ownership by rendezvous hashing. The routing itself runs in
the whole graph (tests/serve/test_service.py: one shopper's concurrent events over two sink replicas)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from serve.routing import UserAffinityRouter, owner


def _replica(rid: str):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid))


def _choose(replicas, kwargs):
    router = UserAffinityRouter.__new__(UserAffinityRouter)  # choose_replicas needs no router state
    pending = SimpleNamespace(kwargs=kwargs)
    return asyncio.run(router.choose_replicas(replicas, pending))


def test_a_key_always_goes_to_one_replica_and_keys_spread_over_all():
    replicas = [_replica(r) for r in ("r1", "r2", "r3")]
    for user in ("alice", "bob", "u-0001"):
        chosen = {_choose(replicas, {"route_key": user})[0][0].replica_id.unique_id for _ in range(5)}
        assert chosen == {owner(user, ["r1", "r2", "r3"])}
    owners = [owner(f"u{i}", ["r1", "r2", "r3"]) for i in range(300)]
    assert {o: owners.count(o) for o in set(owners)}.keys() == {"r1", "r2", "r3"}
    assert min(owners.count(r) for r in ("r1", "r2", "r3")) > 60  # roughly even (100 each expected)


def test_a_replica_leaving_moves_only_its_own_keys():
    keys = [f"u{i}" for i in range(300)]
    before = {k: owner(k, ["r1", "r2", "r3"]) for k in keys}
    after = {k: owner(k, ["r1", "r3"]) for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "r2")
    assert all(after[k] in ("r1", "r3") for k in keys)


def test_requests_without_a_key_may_go_anywhere():
    replicas = [_replica("r1"), _replica("r2")]
    assert _choose(replicas, {}) == [replicas]
    assert _choose(replicas[:1], {"route_key": "alice"}) == [replicas[:1]]
