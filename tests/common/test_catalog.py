"""Tests for common/catalog.py (reading, validation, hashing, image bytes) and the shipped sample catalogue."""
from __future__ import annotations

import functools
import http.server
import io
import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from common import fashion_mnist
from common.catalog import (
    CATALOG_FIELDS, REQUIRED_FIELDS, ImageError, catalog_base_dir, content_hash, load_catalog, read_catalog,
    read_image_bytes, validate_catalog,
)
from common.errors import SchemaError
from common.sample_catalog import CATEGORY_NAMES, build_sample_catalog

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"
ROWS = [
    {"item_id": 1, "title": "Tee", "category": "T-shirt", "price": 10.0, "image": "img/1.png", "in_stock": True},
    {"item_id": 2, "title": "Boot", "category": "Ankle boot", "price": 99.5, "image": "img/2.png", "in_stock": False},
]


def _write(rows: list[dict], path: Path) -> Path:
    """Write rows in the format the suffix names (the test's own writer, independent of the reader)."""
    if path.suffix in (".parquet", ".pq"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".csv":
        pacsv.write_csv(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _validate(rows: list[dict], base_dir: str = "/shop") -> tuple[list[dict], list[dict]]:
    result = validate_catalog(pa.Table.from_pylist(rows), base_dir)
    return result.valid.to_pylist(), result.quarantine.to_pylist()


def _row(**changes: object) -> dict:
    return {"item_id": "a", "title": "Tee", "category": "T-shirt", "price": 10.0, "image": "a.png", **changes}


@pytest.mark.parametrize("name", ["c.parquet", "c.pq", "c.csv", "c.jsonl", "c.ndjson", "c.json"])
def test_read_each_format_with_int_ids_as_str(tmp_path: Path, name: str) -> None:
    table = read_catalog(str(_write(ROWS, tmp_path / name)))
    assert table.column("item_id").to_pylist() == ["1", "2"]
    assert table.schema.field("item_id").type == pa.string()
    valid = validate_catalog(table, catalog_base_dir(str(tmp_path / name))).valid.to_pylist()
    assert [r["price"] for r in valid] == [10.0, 99.5]
    assert [r["in_stock"] for r in valid] == [True, False]
    assert valid[0]["image"] == str(tmp_path / "img" / "1.png")


def test_read_file_uri_and_csv_keeps_leading_zeros(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("item_id,title,category,price,image\n007,Tee,T-shirt,5,a.png\n")
    assert read_catalog(path.as_uri()).column("item_id").to_pylist() == ["007"]


def test_unknown_extension_names_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match=r"\.xlsx.*\.parquet.*\.csv.*\.jsonl"):
        read_catalog(str(tmp_path / "c.xlsx"))


def test_missing_required_columns_are_all_named(tmp_path: Path) -> None:
    rows = [{"item_id": 1, "category": "Bag", "image": "a.png"}]
    with pytest.raises(SchemaError, match="title, price") as info:
        read_catalog(str(_write(rows, tmp_path / "c.parquet")))
    assert "item_id," not in str(info.value).split(";")[0]


def test_missing_file_is_a_schema_error(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="not found"):
        read_catalog(str(tmp_path / "none.csv"))


@pytest.mark.parametrize(("change", "reason"), [
    ({"title": "  "}, "missing title"),
    ({"title": None}, "missing title"),
    ({"category": ""}, "missing category"),
    ({"price": -3}, "price is not a finite number >= 0: -3"),
    ({"price": math.nan}, "price is not a finite number >= 0: nan"),
    ({"price": math.inf}, "price is not a finite number >= 0: inf"),
    ({"price": None}, "missing price"),
    ({"image": None}, "missing image"),
    ({"image": ""}, "missing image"),
    ({"image": "ftp://host/a.png"}, "unsupported image URI scheme 'ftp'"),
    ({"item_id": " "}, "missing item_id"),
])
def test_each_quarantine_reason(change: dict, reason: str) -> None:
    valid, quarantine = _validate([_row(item_id="ok"), _row(**change)])
    assert [r["item_id"] for r in valid] == ["ok"]
    assert len(quarantine) == 1 and quarantine[0]["reason"].startswith(reason)


def test_bad_price_string_from_csv_keeps_original_values(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("item_id,title,category,price,image,material\n1,Tee,T-shirt,abc,a.png,silk\n"
                    "2,,T-shirt,-3,b.png,wool\n3,Hat,Bag,4.5,c.png,\n")
    result = load_catalog(str(path))
    assert result.quarantine.to_pylist() == [
        {"item_id": "1", "title": "Tee", "category": "T-shirt", "price": "abc", "image": "a.png",
         "material": "silk", "reason": "price is not a finite number >= 0: abc"},
        {"item_id": "2", "title": "", "category": "T-shirt", "price": "-3", "image": "b.png",
         "material": "wool", "reason": "missing title; price is not a finite number >= 0: -3"},
    ]
    assert result.valid.column("price").to_pylist() == [4.5]


def test_duplicate_id_keeps_first_and_names_its_row() -> None:
    valid, quarantine = _validate([_row(item_id="x", title="First"), _row(item_id="y"),
                                   _row(item_id=" x ", title="Second")])
    assert [(r["item_id"], r["title"]) for r in valid] == [("x", "First"), ("y", "Tee")]
    assert [r["reason"] for r in quarantine] == ["duplicate item_id 'x' (first at row 0)"]
    assert quarantine[0]["title"] == "Second"


@pytest.mark.parametrize(("raw", "expected"), [
    ("true", True), ("FALSE", False), ("1", True), ("0", False), ("yes", True), (" No ", False),
    ("", True), (None, True), (True, True), (False, False),
])
def test_in_stock_parsing(raw: object, expected: bool) -> None:
    valid, _ = _validate([_row(in_stock=raw)])
    assert valid[0]["in_stock"] is expected


def test_in_stock_missing_column_defaults_true_and_garbage_is_quarantined() -> None:
    assert _validate([_row()])[0][0]["in_stock"] is True
    _, quarantine = _validate([_row(in_stock="maybe")])
    assert quarantine[0]["reason"] == "in_stock is not a boolean (true/false/1/0/yes/no): maybe"


def test_normalisation_and_column_order() -> None:
    valid, _ = _validate([_row(item_id=" a ", title=" Tee  ", price="12.50", brand=" ", material="silk")])
    assert list(valid[0]) == [f.name for f in CATALOG_FIELDS] + ["material"]
    assert valid[0]["item_id"] == "a" and valid[0]["title"] == "Tee" and valid[0]["price"] == 12.5
    assert valid[0]["brand"] is None and valid[0]["material"] == "silk"


def test_image_references_resolve_relative_and_keep_uris(tmp_path: Path) -> None:
    refs = ["img/a.png", "./b.png", "/abs/c.png", "file:///abs/d.png", "s3://bucket/e.png", "gs://b/f.png",
            "https://cdn.example.com/g.jpg"]
    rows = [_row(item_id=str(i), image=ref) for i, ref in enumerate(refs)]
    valid, quarantine = _validate(rows, str(tmp_path))
    assert quarantine == []
    assert [r["image"] for r in valid] == [str(tmp_path / "img" / "a.png"), str(tmp_path / "b.png")] + refs[2:]
    remote, _ = _validate([_row(image="img/a.png")], "s3://bucket/shop")
    assert remote[0]["image"] == "s3://bucket/shop/img/a.png"


def test_binary_image_column_is_kept_as_bytes() -> None:
    table = pa.table({"item_id": ["a", "b"], "title": ["T", "U"], "category": ["Bag", "Bag"], "price": [1.0, 2.0],
                      "image": pa.array([b"\x89PNG...", b""], pa.binary())})
    result = validate_catalog(table, "/shop")
    assert result.valid.column("image").to_pylist() == [b"\x89PNG..."]
    assert result.valid.schema.field("image").type == pa.binary()
    assert result.quarantine.column("reason").to_pylist() == ["missing image"]


def test_content_hash_is_stable_and_tracks_only_encoder_inputs() -> None:
    row = {"title": "Tee", "description": None, "category": "T-shirt", "brand": "Noir", "color": "black",
           "price": 10.0, "in_stock": True, "image": "/a.png"}
    base = content_hash(row, b"png-bytes", "clip-vit-b32@1")
    # A golden value: a change in canonicalisation would silently force re-encoding every catalogue.
    assert base == "0996b982fc7fe1036e4edf48d025ad5233c1ba079bebe89ca8d8604c6186d964"
    assert base == content_hash(dict(row), b"png-bytes", "clip-vit-b32@1")
    assert base == content_hash({**row, "price": 12.0, "in_stock": False, "image": "/moved.png"},
                                b"png-bytes", "clip-vit-b32@1")
    assert base == content_hash({**row, "title": " Tee ", "description": ""}, b"png-bytes", "clip-vit-b32@1")
    assert base != content_hash({**row, "title": "Tee 2"}, b"png-bytes", "clip-vit-b32@1")
    assert base != content_hash(row, b"png-bytes!", "clip-vit-b32@1")
    assert base != content_hash(row, b"png-bytes", "clip-vit-b32@2")


def test_read_image_bytes_from_path_file_uri_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a b.png"
    path.write_bytes(b"\x89PNG data")
    assert read_image_bytes(str(path)) == b"\x89PNG data"
    assert read_image_bytes(path.as_uri()) == b"\x89PNG data"
    assert read_image_bytes(b"raw") == b"raw"
    assert read_image_bytes(memoryview(b"raw")) == b"raw"


@pytest.mark.parametrize("ref", ["missing.png", "file:///nowhere/missing.png"])
def test_read_image_bytes_missing_file(tmp_path: Path, ref: str) -> None:
    ref = str(tmp_path / ref) if "://" not in ref else ref
    with pytest.raises(ImageError, match=r"^image not found: "):
        read_image_bytes(ref)


def test_read_image_bytes_rejects_empty_and_directories(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="empty"):
        read_image_bytes(b"")
    with pytest.raises(ImageError, match="cannot read image"):
        read_image_bytes(str(tmp_path))


@pytest.fixture
def http_folder(tmp_path: Path) -> Iterator[str]:
    """A localhost HTTP server over tmp_path (no outside network)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_read_image_bytes_and_catalog_over_http(tmp_path: Path, http_folder: str) -> None:
    (tmp_path / "a.png").write_bytes(b"png over http")
    _write(ROWS, tmp_path / "c.jsonl")
    assert read_image_bytes(f"{http_folder}/a.png") == b"png over http"
    result = load_catalog(f"{http_folder}/c.jsonl")
    assert result.valid.column("image").to_pylist() == [f"{http_folder}/img/1.png", f"{http_folder}/img/2.png"]
    with pytest.raises(ImageError, match="image not found"):
        read_image_bytes(f"{http_folder}/missing.png")


def test_shipped_sample_catalogue_is_valid_and_complete() -> None:
    result = load_catalog(str(SAMPLE / "catalog.parquet"))
    assert result.quarantine.num_rows == 0 and result.valid.num_rows == 2000
    counts = result.valid.group_by("category").aggregate([("item_id", "count")]).to_pylist()
    assert {r["category"]: r["item_id_count"] for r in counts} == dict.fromkeys(CATEGORY_NAMES, 200)
    assert set(REQUIRED_FIELDS) | {"description", "brand", "color", "in_stock", "material"} <= set(
        result.valid.column_names)
    for ref in result.valid.column("image").to_pylist():
        with Image.open(io.BytesIO(read_image_bytes(ref))) as image:
            assert image.size == (28, 28) and image.mode == "L"
    assert load_catalog(str(SAMPLE / "catalog.csv")).valid.equals(result.valid)


@pytest.mark.skipif(fashion_mnist.find_dir() is None, reason="Fashion-MNIST not available locally")
def test_shipped_sample_is_rebuilt_exactly_from_code(tmp_path: Path) -> None:
    table = build_sample_catalog(tmp_path, per_class=200, seed=0)
    assert table.equals(pq.read_table(SAMPLE / "catalog.parquet"))
    assert (tmp_path / "catalog.csv").read_bytes() == (SAMPLE / "catalog.csv").read_bytes()
    shipped = sorted(p.name for p in (SAMPLE / "images").iterdir())
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == shipped
    assert all((tmp_path / "images" / n).read_bytes() == (SAMPLE / "images" / n).read_bytes() for n in shipped)
