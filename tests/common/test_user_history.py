"""Offline user state for serving: seen and latest items, segments, popularity overall and by segment."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common.artifacts import ArtifactStore
from common.item_table import ItemTable
from common.user_history import UserHistory, segment_of


def events(rows):
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "event", "ts"])
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    return frame


def test_seen_latest_and_popularity():
    ev = events([("u1", "a", "view", "2024-01-01"), ("u1", "b", "purchase", "2024-01-02"),
                 ("u1", "c", "dislike", "2024-01-03"), ("u1", "a", "view", "2024-01-04"),
                 ("u2", "a", "view", "2024-01-01"), ("u3", "b", "view", "2024-01-01")])
    h = UserHistory.from_events(ev)
    assert h.seen["u1"] == {"a", "b", "c"} and h.knows("u2") and not h.knows("nobody")
    assert h.recent["u1"] == ("a", "b")  # newest first, the disliked item left out
    assert h.popular_for(None) == (("a", 1.0), ("b", 1.0))  # users who liked each, ties by id
    assert UserHistory.from_events(ev.iloc[:0]).popular_for(None) == ()


def test_popularity_by_segment_falls_back_to_overall_for_small_segments():
    rows, users = [], []
    for u in range(30):
        young = u < 20
        users.append({"user_id": f"u{u}", "age": 20 if young else 60, "region": "PL"})
        rows.append((f"u{u}", "sneaker" if young else "coat", "view", "2024-01-01"))
    rows += [(f"u{u}", "coat", "view", "2024-01-02") for u in range(20, 30)]
    h = UserHistory.from_events(events(rows), pd.DataFrame(users), min_segment_users=15)
    assert h.segments["u0"] == "18-24|PL" == segment_of(20, "PL")
    assert h.popular_for("18-24|PL")[0][0] == "sneaker"
    assert h.popular_for("55+|PL") == h.popular_for(None)  # 10 users: below the minimum, overall is used
    assert segment_of() is None and segment_of(region="DE") == "unknown|DE"


def test_item_table_reads_the_latest_snapshot(tmp_path):
    artifacts = ArtifactStore(str(tmp_path))
    version = artifacts.new_version("embeddings", "shop")
    rng = np.random.default_rng(0)
    v = rng.standard_normal((3, 4)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    table = pa.table({"item_id": ["a", "b", "c"], "category": ["Bag", "Coat", "Bag"], "brand": ["x", "y", "z"],
                      "price": [1.0, 2.0, 3.0], "fused_vector": [list(map(float, r)) for r in v]})
    pq.write_table(table, artifacts.path("embeddings", "shop", version, "embeddings.parquet"))
    artifacts.publish("embeddings", "shop", version, {"result": {"version": version}, "encoder_identity": "m"})
    items = ItemTable.load(str(tmp_path), "shop")
    assert items.version == version and items.model == "m"
    np.testing.assert_allclose(items.vector("b"), v[1], rtol=1e-6)
    found, vectors = items.lookup(["c", "nope", "a"])
    assert found == ["c", "a"] and np.allclose(vectors, v[[2, 0]])
    assert items.fields["c"] == {"category": "Bag", "brand": "z", "price": 3.0} and items.vector("nope") is None
