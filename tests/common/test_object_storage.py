"""Object storage round trips (s3:// through an S3 server, gs:// through a GCS emulator, both on loopback): the
artifact store, the event log, a catalogue whose images live in the bucket, and a model folder loaded from it."""
from __future__ import annotations

import io
import itertools

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from common.artifacts import ArtifactStore
from common.catalog import ImageError, load_catalog, read_image_bytes
from common.event_log import EventLog

_names = itertools.count()


@pytest.fixture(params=["s3", "gs"])
def bucket(request, object_storage) -> str:
    """A fresh folder in the bucket of one backend."""
    return f"{object_storage[request.param]}/t{next(_names)}"


def test_artifact_versions_publish_and_read_back(bucket):
    store = ArtifactStore(f"{bucket}/artifacts")
    assert store.latest("embeddings", "items") is None
    version = store.new_version("embeddings", "items")
    with fsspec.open(store.path("embeddings", "items", version, "embeddings.parquet"), "wb") as f:
        pq.write_table(pa.table({"item_id": ["a", "b"]}), f)
    assert store.latest("embeddings", "items") is None  # not published yet: readers see nothing half-written
    store.publish("embeddings", "items", version, {"items": 2})
    assert store.latest("embeddings", "items") == version
    assert store.manifest("embeddings", "items") == {"items": 2}
    with fsspec.open(store.path("embeddings", "items", version, "embeddings.parquet"), "rb") as f:
        assert pq.read_table(f)["item_id"].to_pylist() == ["a", "b"]


def test_event_log_appends_and_reads_back_with_quarantine(bucket):
    log = EventLog(f"{bucket}/event-log")
    rows = [{"user_id": "u1", "item_id": "i1", "event": "view", "ts": "2024-05-01T12:00:00Z"},
            {"user_id": "u1", "item_id": "i2", "event": "purchase", "ts": "2024-05-01T12:01:00Z"},
            {"user_id": "", "item_id": "i3", "event": "view", "ts": "2024-05-01T12:02:00Z"}]
    result = log.append(rows)
    assert result.accepted == 2 and [r["index"] for r in result.rejected] == [2]
    assert result.part.startswith(bucket)
    out = log.read()
    assert list(out["item_id"]) == ["i1", "i2"] and list(out["event"]) == ["view", "purchase"]
    fs, path = fsspec.core.url_to_fs(f"{bucket}/event-log/quarantine")
    assert fs.find(path)  # the bad row is kept, with its reason, beside the log


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_catalogue_and_its_images_in_the_bucket(bucket):
    fs, root = fsspec.core.url_to_fs(bucket)
    for name, value in (("a.png", 10), ("b.png", 200)):
        fs.pipe_file(f"{root}/shop/img/{name}", _png(value))
    rows = {"item_id": ["1", "2", "3"], "title": ["Red dress", "Black boot", "Lost bag"],
            "category": ["Dress", "Ankle boot", "Bag"], "price": [10.0, 20.0, 5.0], "in_stock": [True, True, False],
            "image": ["img/a.png", "img/b.png", "img/missing.png"]}
    with fsspec.open(f"{bucket}/shop/catalog.parquet", "wb") as f:
        pq.write_table(pa.table(rows), f)
    checked = load_catalog(f"{bucket}/shop/catalog.parquet")
    rows = checked.valid.to_pylist()
    assert [r["image"] for r in rows] == [f"{bucket}/shop/img/{n}.png" for n in ("a", "b", "missing")]
    assert read_image_bytes(rows[1]["image"]) == _png(200)
    with pytest.raises(ImageError, match="missing.png"):  # the embed job's decode stage quarantines it
        read_image_bytes(rows[2]["image"])


def test_an_encoder_loads_a_model_folder_from_the_bucket(object_storage, tmp_path, monkeypatch):
    from common.encoder import EncoderConfig, ItemEncoder
    from common.model_assets import BASE_MODEL_NAME, ensure_model

    local = ensure_model(BASE_MODEL_NAME)
    remote = f"{object_storage['s3']}/t{next(_names)}/models/{BASE_MODEL_NAME}/v1"
    fs, path = fsspec.core.url_to_fs(remote)
    fs.put(str(local), path, recursive=True)
    monkeypatch.setenv("VITRINE_CACHE", str(tmp_path / "cache"))
    texts = ["red summer dress", "black ankle boots"]
    expected = ItemEncoder(EncoderConfig(model=f"local-dir:{local}", precision="fp32", device="cpu"))
    fetched = ItemEncoder(EncoderConfig(model=f"local-dir:{remote}", precision="fp32", device="cpu"))
    assert fetched.identity == expected.identity
    np.testing.assert_allclose(fetched.encode_texts(texts), expected.encode_texts(texts), atol=1e-6)
    fs.rm(path, recursive=True)  # a published version never changes: the fetched copy is reused
    again = ItemEncoder(EncoderConfig(model=f"local-dir:{remote}", precision="fp32", device="cpu"))
    assert again.identity == expected.identity
    with pytest.raises(Exception, match="local-dir"):
        ItemEncoder(EncoderConfig(model=f"local-dir:{object_storage['s3']}/nothing-here", device="cpu"))
