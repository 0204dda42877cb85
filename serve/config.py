"""The serving graph's settings: one typed config, from defaults, a YAML file and flags (see ``from_args``)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import (default_artifacts_uri, default_events, default_store_uri, from_mapping, load_yaml,
                           resolve_uri)
from common.errors import ConfigError
from common.item_index import check_base_name

MAX_K = 100  # the most results one request may ask for
MAX_EVENTS = 1000  # the most events one POST /events may carry
MAX_EVENT_SHARDS = 64  # the most event sinks (ServeConfig.event_shards)
MAX_DEDUP_EVENT_IDS = 10_000_000  # the most event ids a sink remembers (~100 bytes each)


def default_event_log() -> str:
    """Where POST /events appends (beside the other var/ state)."""
    return resolve_uri("var/events")


def default_users() -> str:
    """The shipped sample's user features (age, region) for popularity by segment."""
    return str(Path(default_events()).parent / "users.parquet")


@dataclass(frozen=True)
class Replicas:
    """Scaling of one deployment: fractional CPUs so the whole graph fits on 2 cores, autoscaled on load."""

    num_cpus: float = 0.25  # logical CPUs each replica reserves
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0  # autoscaler's target of in-flight requests per replica
    max_ongoing_requests: int = 16  # back-pressure: requests one replica accepts at once

    def __post_init__(self) -> None:
        if not 0 < self.num_cpus <= 64:
            raise ConfigError(f"num_cpus must be in (0, 64]. Got {self.num_cpus!r}")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ConfigError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1. "
                              f"Got {self.min_replicas!r}, {self.max_replicas!r}")
        if self.target_ongoing_requests <= 0 or self.max_ongoing_requests < 1:
            raise ConfigError("target_ongoing_requests must be > 0 and max_ongoing_requests >= 1")

    def options(self, gpus: float = 0.0, access_log: bool = True) -> dict[str, Any]:
        """``Deployment.options(...)`` keyword arguments."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if gpus:
            actor["num_gpus"] = gpus
        return {
            "ray_actor_options": actor,
            "max_ongoing_requests": self.max_ongoing_requests,
            "logging_config": {"enable_access_log": access_log},
            "autoscaling_config": {"min_replicas": self.min_replicas, "initial_replicas": max(self.min_replicas, 1),
                                   "max_replicas": self.max_replicas,
                                   "target_ongoing_requests": self.target_ongoing_requests,
                                   "upscale_delay_s": 3.0, "downscale_delay_s": 60.0},
        }


@dataclass(frozen=True)
class ServeConfig:
    """What the service reads and how it behaves."""

    collection: str = "items"  # catalogue name: collections <collection>_<kind>, artifacts embeddings/<collection>
    store_uri: str = field(default_factory=default_store_uri)  # Milvus: a Lite server folder or http://host:19530
    artifacts_uri: str = field(default_factory=default_artifacts_uri)  # embeddings manifest, rules, ranker
    events: str | None = field(default_factory=default_events)  # offline events (history, popularity); None: none
    users: str | None = field(default_factory=default_users)  # user features for popularity by segment; None: none
    event_log: str = field(default_factory=default_event_log)  # POST /events appends here (Parquet parts)
    kind: str = "fused"  # item vectors for profiles, sessions, text search and diversity
    similar_kind: str = "visual"  # item vectors for /items/{id}/similar (image-only similarity)
    candidates: int = 50  # candidates each retrieval source returns
    recent_items: int = 5  # how many of the user's latest items seed item-to-item and rules candidates
    diversity: float = 0.8  # MMR lambda for personal recommendations (1 = relevance only)
    ranker: str = "latest"  # "latest" published ranker (vitrine train ranker), or "none": order by summed scores
    rules: Mapping[str, Any] = field(default_factory=dict)  # business rules (common.business_rules), user_config
    session_gap_s: float = 1800.0  # a pause this long starts a new session
    fresh_sessions: bool = True  # read a user's live session under "Strong" consistency: the very next request sees
    # an acknowledged POST /events (on a Milvus server it waits for the server's time tick; False: up to one tick old)
    search_ef: int = 64  # HNSW beam of unfiltered searches (filtered ones widen it by 1/selectivity)
    store_timeout_s: float = 10.0  # each vector store call's deadline (then 503 + Retry-After, not a hung request)
    stage_access_logs: bool = False  # an access log line per request in every stage too (the ingress always logs)
    fields_ttl_s: float = 5.0  # fields (stock, price) read for rules/popular/pinned candidates are reused this long
    user_vector_ttl_s: float = 60.0  # offline user vectors (profile, learned) are reused this long; 0: no cache
    learned_check_s: float = 5.0  # how often the retriever looks for newly trained learned vectors (serve/learned.py)
    artifacts_check_s: float = 30.0  # how often rules and the "latest" ranker are looked for anew (0: at start only)
    # How often the retriever reads the event history again when the event log changed (seen and bought items,
    # latest items, affinities, popularity and recency; 0: at start only). Below session_gap_s, an item of an
    # ended session is never recommended again: it is in the live session until the history holds it.
    history_refresh_s: float = 300.0
    host: str = "127.0.0.1"  # HTTP bind address
    port: int = 8000  # HTTP port
    proxy_location: str = "EveryNode"  # HTTP proxies on every node, or "HeadOnly" (several nodes on one machine)
    ingress: Replicas = field(default_factory=lambda: Replicas(num_cpus=0.2, max_replicas=2))
    retriever: Replicas = field(default_factory=lambda: Replicas(num_cpus=0.25, max_replicas=2))
    reranker: Replicas = field(default_factory=lambda: Replicas(num_cpus=0.2, max_replicas=2))
    business_filter: Replicas = field(default_factory=lambda: Replicas(num_cpus=0.1, max_replicas=2))
    # Each event sink is one replica: its requests run on threads that take per-user locks, so a user's concurrent
    # events never lose a session update; two replicas of one sink could (last writer wins across processes).
    # More sinks (event_shards) each own a share of the users: that scales out without the risk.
    events_sink: Replicas = field(default_factory=lambda: Replicas(num_cpus=0.1, max_replicas=1))
    event_shards: int = 1  # event sinks, each owning the users that hash to it (scale POST /events out this way)
    # Each sink remembers the (user_id, event_id) of this many latest events (read back from the event log at
    # start-up), so a batch sent again after a timeout or a sink restart is answered "duplicates", not appended
    # twice; 0: no memory (the log's readers still read each event_id once, but sessions would count it twice).
    dedup_event_ids: int = 100_000
    # The first event sink merges the event log's appended parts older than this, this often (each POST /events
    # writes a part: 5,000 parts took 4.2 s to read, merged 13 ms); 0: never (then run `vitrine events compact`
    # on a schedule).
    compact_events_s: float = 60.0
    text_encoder: Replicas = field(default_factory=lambda: Replicas(num_cpus=0.25, max_replicas=1))
    # At their maxima the defaults reserve 1.85 logical CPUs: the whole graph can scale out on 2 cores.

    def __post_init__(self) -> None:
        check_base_name(self.collection)
        if not 1 <= self.candidates <= 1000:
            raise ConfigError(f"candidates must be in [1, 1000]. Got {self.candidates!r}")
        if not 0.0 <= self.diversity <= 1.0:
            raise ConfigError(f"diversity (MMR lambda) must be in [0, 1]. Got {self.diversity!r}")
        if self.ranker not in ("latest", "none") and not self.ranker.startswith("v"):
            raise ConfigError(f"ranker must be 'latest', 'none' or a published version (v...). Got {self.ranker!r}")
        if self.proxy_location not in ("EveryNode", "HeadOnly"):
            raise ConfigError(f"proxy_location must be EveryNode or HeadOnly. Got {self.proxy_location!r}")
        for name in ("fields_ttl_s", "user_vector_ttl_s", "learned_check_s", "artifacts_check_s", "history_refresh_s",
                     "compact_events_s"):
            if not 0 <= getattr(self, name) <= 86_400:
                raise ConfigError(f"{name} must be in [0, 86400] seconds. Got {getattr(self, name)!r}")
        if isinstance(self.event_shards, bool) or not isinstance(self.event_shards, int) \
                or not 1 <= self.event_shards <= MAX_EVENT_SHARDS:
            raise ConfigError(f"event_shards must be an integer in [1, {MAX_EVENT_SHARDS}]. Got {self.event_shards!r}")
        if isinstance(self.dedup_event_ids, bool) or not isinstance(self.dedup_event_ids, int) \
                or not 0 <= self.dedup_event_ids <= MAX_DEDUP_EVENT_IDS:
            raise ConfigError(f"dedup_event_ids must be an integer in [0, {MAX_DEDUP_EVENT_IDS}]. "
                              f"Got {self.dedup_event_ids!r}")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port must be in [1, 65535]. Got {self.port!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_URIS = ("store_uri", "artifacts_uri", "events", "users", "event_log")


def config_from_mapping(values: Mapping[str, Any]) -> ServeConfig:
    """A ServeConfig from plain values (YAML, JSON, ``serve run`` arguments); local paths made absolute."""
    values = dict(values)
    for name in _URIS:
        if values.get(name) in ("", "none"):
            values[name] = None
        elif isinstance(values.get(name), str):
            values[name] = resolve_uri(values[name])
    for name, cast in (("candidates", int), ("recent_items", int), ("port", int), ("search_ef", int),
                       ("event_shards", int), ("dedup_event_ids", int),
                       ("diversity", float), ("session_gap_s", float), ("store_timeout_s", float),
                       ("fields_ttl_s", float), ("user_vector_ttl_s", float), ("learned_check_s", float),
                       ("artifacts_check_s", float), ("history_refresh_s", float), ("compact_events_s", float)):
        if isinstance(values.get(name), str):  # `serve run module:build_app key=value` passes strings
            try:
                values[name] = cast(values[name])
            except ValueError:
                raise ConfigError(f"{name} must be a number. Got {values[name]!r}") from None
    return from_mapping(ServeConfig, values)


def config_from_file(path: str | None, overrides: Mapping[str, Any] | None = None) -> ServeConfig:
    values = load_yaml(path) if path else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config_from_mapping(values)
