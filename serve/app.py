"""``build_app``: the serving graph, wired by passing deployment handles into constructors.

    Ingress (HTTP) -> Retriever (-> TextEncoder) -> Reranker -> BusinessFilter;  Ingress -> EventSink (per user)

``vitrine serve`` deploys it declaratively (``serve.launch.app_config``: import path ``serve.app:build_app``, the
config as ``args``, the business rules as the BusinessFilter's ``user_config``), as ``serve deploy`` and KubeRay's
RayService do; ``serve run serve.app:build_app collection=items`` works too.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from ray.serve import Application

from serve.business_filter import BusinessFilter
from serve.config import ServeConfig, config_from_mapping
from serve.events import EventSink
from serve.ingress import Ingress
from serve.reranker import Reranker
from serve.retriever import Retriever
from serve.text_encoder import TextEncoder

log = logging.getLogger(__name__)


def _gpus() -> float:
    """One GPU for the text encoder replica when the connected cluster has one (else CPU)."""
    import ray

    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def build_app(args: ServeConfig | Mapping[str, Any] | None = None) -> Application:
    cfg = args if isinstance(args, ServeConfig) else config_from_mapping(args or {})
    rules, cfg = dict(cfg.rules), dataclasses.replace(cfg, rules={})  # the rules reach only the filter
    access = cfg.stage_access_logs  # the stages serve the ingress's requests: one access line per request is enough
    text = TextEncoder.options(**cfg.text_encoder.options(gpus=_gpus(), access_log=access)).bind(cfg)
    retriever = Retriever.options(**cfg.retriever.options(access_log=access)).bind(cfg, text)
    reranker = Reranker.options(**cfg.reranker.options(access_log=access)).bind(cfg)
    business = BusinessFilter.options(user_config=rules, **cfg.business_filter.options(access_log=access)).bind()
    if cfg.events_sink.max_replicas > 1:
        log.warning("events_sink.max_replicas=%d: two replicas of one sink updating one user's session at the same "
                    "moment can lose one update (the event log keeps both events); raise event_shards instead",
                    cfg.events_sink.max_replicas)
    if not 0 < cfg.history_refresh_s < cfg.session_gap_s:
        log.warning("history_refresh_s=%s with session_gap_s=%s: items of a session that ended are not excluded "
                    "(exclude_seen) until the history is read again; keep history_refresh_s above 0 and below "
                    "session_gap_s", cfg.history_refresh_s, cfg.session_gap_s)
    sinks = [EventSink.options(name=sink_name(i), **cfg.events_sink.options(access_log=access)).bind(cfg, i == 0)
             for i in range(cfg.event_shards)]  # the first sink also compacts the event log
    return Ingress.options(**cfg.ingress.options()).bind(cfg, retriever, reranker, business, sinks)


def sink_name(shard: int) -> str:
    """The deployment name of event sink ``shard`` (the first keeps the plain name)."""
    return "EventSink" if shard == 0 else f"EventSink{shard}"
