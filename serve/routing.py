"""Per-user request routing for the event sink: every request that names a ``route_key`` (the shopper) goes to the
one replica that owns that key, so one shopper's session updates are serialised by that replica's lock (see
``common.session_store``) even when the sink runs several replicas.

Ownership is rendezvous (highest-random-weight) hashing over the live replicas: each key goes to the replica with
the highest hash of (key, replica id); when a replica comes or goes, only the keys it owned move. A request
without a key may go to any replica. Built on Ray Serve's ``RequestRouter`` (alpha in Ray 2.60): when the owner
is busy the router waits and asks again, it never hands the request to another replica.
"""
from __future__ import annotations

import hashlib
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTE_KEY = "route_key"  # the keyword argument the router reads


def owner(key: str, replica_ids: list[str]) -> str:
    """The replica id that owns ``key`` among ``replica_ids`` (rendezvous hashing)."""
    return max(replica_ids, key=lambda r: hashlib.blake2b(f"{key}\x00{r}".encode(), digest_size=8).digest())


class UserAffinityRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key: Any = pending_request.kwargs.get(ROUTE_KEY) if pending_request is not None else None
        if key is None or len(candidate_replicas) <= 1:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_id[owner(str(key), list(by_id))]]]
