"""One serving graph for the serve tests: a tiny catalogue embedded, rules, profiles, a two-tower model (2 epochs)
and a ranker trained on its synthetic shoppers, and the whole Ray Serve graph on the session's local Ray, over
HTTP on a free port.

The store is a Milvus Lite server on a fixed loopback port, named by its ``http://`` URI, so a test can stop the
vector store under the running service and start it again on the same address.
"""
from __future__ import annotations

import socket
import time

import pandas as pd
import pytest
import requests

from common import milvus_local
from common.encoder import EncoderConfig
from common.rules import RulesConfig
from common.two_tower import TwoTowerConfig
from common.synthetic_events import generate_events
from jobs.build_profiles import ProfilesConfig
from jobs.build_profiles import run as build_profiles
from jobs.embed_catalog import EmbedConfig
from jobs.embed_catalog import run as embed
from jobs.mine_rules import MineRulesConfig
from jobs.mine_rules import run as mine_rules
from jobs.train_ranker import TrainRankerConfig
from jobs.train_ranker import run as train_ranker
from jobs.train_two_tower import TrainTwoTowerConfig
from jobs.train_two_tower import run as train_two_tower
from tests.jobs.test_embed_catalog import tiny_catalog

BASE = "shop"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def shop(tmp_path_factory, ray_local):
    """The tiny shop's files, its store (own Lite server on a fixed port) and the jobs' artifacts."""
    tmp = tmp_path_factory.mktemp("shop")
    items = tiny_catalog(tmp, per_class=6)
    items["in_stock"] = [i % 7 != 3 for i in range(len(items))]  # a few items out of stock
    items.to_parquet(tmp / "catalog.parquet", index=False)
    events, users = generate_events(items, n_users=80, days=14, seed=3)
    events.to_parquet(tmp / "events.parquet", index=False)
    users.to_parquet(tmp / "users.parquet", index=False)
    data_dir, port = tmp / "milvus", free_port()
    server = milvus_local.ensure_server(data_dir, port=port)
    store, artifacts = server.uri, str(tmp / "artifacts")
    embed(EmbedConfig(catalog=str(tmp / "catalog.parquet"), collection=BASE, store_uri=store, batch_size=16,
                      artifacts_uri=artifacts, encoder=EncoderConfig(precision="fp32")))
    mine_rules(MineRulesConfig(events=str(tmp / "events.parquet"), name=BASE, artifacts_uri=artifacts,
                               rules=RulesConfig(min_support=0.003, min_confidence=0.05)))
    build_profiles(ProfilesConfig(events=str(tmp / "events.parquet"), collection=BASE, store_uri=store,
                                  artifacts_uri=artifacts))
    train_two_tower(TrainTwoTowerConfig(events=str(tmp / "events.parquet"), collection=BASE, store_uri=store,
                                        artifacts_uri=artifacts, model=TwoTowerConfig(epochs=2), workers=1))
    train_ranker(TrainRankerConfig(events=str(tmp / "events.parquet"), collection=BASE, artifacts_uri=artifacts))
    yield {"tmp": tmp, "items": items, "events": events, "users": users, "store": store, "data_dir": data_dir,
           "port": port, "artifacts": artifacts}
    milvus_local.stop(data_dir)


def serve_config(shop, **overrides):
    from serve.config import Replicas, ServeConfig

    one = Replicas(num_cpus=0.1, min_replicas=1, max_replicas=1)
    values = dict(collection=BASE, store_uri=shop["store"], artifacts_uri=shop["artifacts"],
                  events=str(shop["tmp"] / "events.parquet"), users=str(shop["tmp"] / "users.parquet"),
                  event_log=str(shop["tmp"] / "event_log"), candidates=30, port=free_port(), ingress=one,
                  retriever=one, reranker=one, business_filter=one, events_sink=one, text_encoder=one,
                  artifacts_check_s=1.0, history_refresh_s=1.0, compact_events_s=2.0)
    values.update(overrides)
    return ServeConfig(**values)


def wait_ready(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready in {timeout} s")


@pytest.fixture(scope="session")
def service(shop):
    """The graph deployed as `vitrine serve` does (a declarative Serve config); yields its base URL and config;
    shut down at the end."""
    from ray import serve

    from serve.launch import deploy

    cfg = serve_config(shop, event_shards=2)  # every event test also checks the sinks' split by user
    deploy(cfg)
    url = f"http://127.0.0.1:{cfg.port}"
    wait_ready(url)
    yield {"url": url, "cfg": cfg, "shop": shop}
    serve.shutdown()


def liked_category(shop, user_id: str) -> pd.Series:
    """A user's planted taste categories."""
    row = shop["users"].set_index("user_id").loc[user_id]
    return row["taste_categories"]
