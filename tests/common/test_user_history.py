"""Offline user state for serving: seen and latest items, segments, popularity overall and by segment."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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


def _snapshot(artifacts: ArtifactStore, ids: list[str], model: str = "m", seed: int = 0) -> tuple[str, np.ndarray]:
    """Publish an embeddings snapshot of ``ids`` as the embed job does; its version and fused vectors."""
    version = artifacts.new_version("embeddings", "shop")
    v = np.random.default_rng(seed).standard_normal((len(ids), 4)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    table = pa.table({"item_id": ids, "category": ["Bag", "Coat", "Bag", "Coat"][:len(ids)],
                      "brand": ["x", "y", "z", "w"][:len(ids)], "price": [1.0, 2.0, 3.0, 4.0][:len(ids)],
                      "fused_vector": [list(map(float, r)) for r in v]})
    pq.write_table(table, artifacts.path("embeddings", "shop", version, "embeddings.parquet"))
    artifacts.publish("embeddings", "shop", version, {"result": {"version": version}, "encoder_identity": model})
    return version, v


def test_item_table_reads_the_latest_snapshot(tmp_path):
    artifacts = ArtifactStore(str(tmp_path))
    version, v = _snapshot(artifacts, ["a", "b", "c"])
    items = ItemTable.load(str(tmp_path), "shop")
    assert items.version == version and items.model == "m"
    np.testing.assert_allclose(items.vector("b"), v[1], rtol=1e-6)
    found, vectors = items.lookup(["c", "nope", "a"])
    assert found == ["c", "a"] and np.allclose(vectors, v[[2, 0]])
    assert items.fields["c"] == {"category": "Bag", "brand": "z", "price": 3.0} and items.vector("nope") is None


def test_a_running_service_follows_new_snapshots_of_the_same_encoder_only(tmp_path, caplog):
    from common.errors import NotFoundError
    from common.item_table import watch_snapshots

    with pytest.raises(NotFoundError, match="vitrine embed"):
        watch_snapshots(str(tmp_path), "shop", "fused", 0)
    artifacts = ArtifactStore(str(tmp_path))
    first, _ = _snapshot(artifacts, ["a", "b", "c"])
    tables = watch_snapshots(str(tmp_path), "shop", "fused", 0)
    assert tables.value.version == first and tables.value.vector("d") is None
    second, v = _snapshot(artifacts, ["a", "b", "c", "d"], seed=1)  # a new product, re-embedded
    assert tables.refresh() and tables.value.version == second
    np.testing.assert_allclose(tables.value.vector("d"), v[3], rtol=1e-6)
    _snapshot(artifacts, ["a", "b"], model="another-encoder")  # vectors of another space: refused, kept serving
    assert not tables.refresh() and tables.value.version == second and tables.failures == 1
    assert "restart the service" in caplog.text
