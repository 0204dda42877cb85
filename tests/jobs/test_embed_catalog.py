"""The embed job end to end on tiny catalogues: quarantine, idempotence, incremental updates, queries."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from common.config import default_catalog
from common.encoder import EncoderConfig
from common.item_index import VECTOR_KINDS, collection_name
from common.retrieval import similar_items
from common.vector_store import open_store
from jobs.embed_catalog import EmbedConfig, run

SAMPLE = Path(default_catalog())


def tiny_catalog(tmp: Path, per_class: int = 3) -> pd.DataFrame:
    """A few items of every category from the shipped sample, with their images copied beside the file."""
    df = pd.read_parquet(SAMPLE).groupby("category", sort=True).head(per_class).reset_index(drop=True)
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    for rel in df["image"]:
        shutil.copy(SAMPLE.parent / rel, tmp / rel)
    return df


def write(df: pd.DataFrame, path: Path) -> str:
    df.to_parquet(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ray_local, store_dir):
    """A tiny catalogue with four bad rows, embedded once for the module."""
    tmp = tmp_path_factory.mktemp("tiny")
    df = tiny_catalog(tmp)
    (tmp / "images" / "corrupt.png").write_bytes(b"this is not a png")
    good = df.iloc[0]
    bad = pd.DataFrame([
        {**good, "item_id": "bad-price", "price": -5.0},
        {**good, "item_id": "bad-missing-image", "image": "images/nope.png"},
        {**good, "item_id": "bad-corrupt-image", "image": "images/corrupt.png"},
        {**good, "title": "a duplicate of the first item"},
    ])
    catalog = write(pd.concat([df, bad], ignore_index=True), tmp / "catalog.parquet")
    # fp32 (OpenVINO where installed): for 30 items a bf16 compile costs more than it saves (the CLI runs "auto").
    cfg = EmbedConfig(catalog=catalog, collection="tiny", store_uri=store_dir, batch_size=8,
                      artifacts_uri=str(tmp / "artifacts"), encoder=EncoderConfig(precision="fp32"))
    return {"df": df, "cfg": cfg, "tmp": tmp, "result": run(cfg)}


def test_bad_rows_are_quarantined_with_reasons_and_the_job_goes_on(tiny):
    result = tiny["result"]
    assert result.items == len(tiny["df"]) == 30
    assert result.quarantined == 4
    assert result.encoded == 30
    q = pq.read_table(result.quarantine_uri).to_pandas().set_index("item_id")
    assert "price" in q.loc["bad-price", "reason"]
    assert "not found" in q.loc["bad-missing-image", "reason"]
    assert "corrupt" in q.loc["bad-corrupt-image", "reason"]
    assert q["reason"].str.contains("duplicate").sum() == 1


def test_every_kind_holds_every_valid_item_once_and_nothing_else(tiny):
    store = open_store(tiny["cfg"].store_uri)
    for kind in VECTOR_KINDS:
        ids = [r["item_id"] for page in store.scan(collection_name("tiny", kind), []) for r in page]
        assert sorted(ids) == sorted(tiny["df"]["item_id"])


def test_snapshot_holds_unit_vectors_for_every_item(tiny):
    snap = pq.read_table(tiny["result"].embeddings_uri).to_pandas()
    assert sorted(snap["item_id"]) == sorted(tiny["df"]["item_id"])
    for kind in VECTOR_KINDS:
        norms = np.linalg.norm(np.stack(snap[f"{kind}_vector"].to_numpy()), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-3)


def test_an_items_nearest_neighbour_is_itself(tiny):
    store = open_store(tiny["cfg"].store_uri)
    snap = pq.read_table(tiny["result"].embeddings_uri).to_pandas()
    vectors = np.stack(snap["visual_vector"].to_numpy()).astype(np.float32)
    hits = store.search(collection_name("tiny", "visual"), vectors, k=1)
    assert [h[0].item_id for h in hits] == snap["item_id"].tolist()


def test_rerun_is_idempotent_and_encodes_nothing(tiny):
    again = run(tiny["cfg"])
    assert (again.encoded, again.upserted, again.removed, again.reused) == (0, 0, 0, 30)
    assert again.items == 30


def test_changes_reencode_only_what_changed(tiny, tmp_path):
    df = tiny["df"].copy()
    df.loc[0, "title"] = "A completely different title"
    df.loc[1, "price"] = float(df.loc[1, "price"]) + 10.0
    df = df.drop(index=2)
    cfg = EmbedConfig(**{**tiny["cfg"].__dict__, "catalog": write(df, tiny["tmp"] / "catalog-v2.parquet")})
    result = run(cfg)
    assert result.encoded == 1          # the new title
    assert result.upserted == 2         # ... and the new price, from cached vectors
    assert result.removed == 1          # the dropped row
    assert result.items == 29
    store = open_store(cfg.store_uri)
    row = store.get(collection_name("tiny", "fused"), [df.loc[1, "item_id"]])[0]
    assert row["price"] == pytest.approx(df.loc[1, "price"])
    assert store.count(collection_name("tiny", "text")) == 29


def test_similar_items_respect_a_filter(tiny):
    store = open_store(tiny["cfg"].store_uri)
    item = tiny["df"].iloc[5]["item_id"]
    hits = similar_items(store, "tiny", item, k=5, filter='category == "Bag" and price < 1000')
    assert hits and all(h.fields["category"] == "Bag" for h in hits)
    assert item not in [h.item_id for h in hits]


def test_the_manifest_records_the_encoder(tiny):
    manifest = json.loads((Path(tiny["cfg"].artifacts_uri) / "embeddings" / "tiny" /
                           tiny["result"].version / "manifest.json").read_text())
    assert manifest["encoder_identity"]
    assert manifest["result"]["quarantined"] == 4
    assert manifest["encoder"]["runtime"] == "auto"  # the service's text encoder loads it as recorded


def test_encoder_flags_become_the_encoder_config():
    from jobs.embed_catalog import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--runtime", "torch", "--precision", "fp32"]))
    assert (cfg.encoder.runtime, cfg.encoder.precision) == ("torch", "fp32")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--runtime", "tensorrt"])
