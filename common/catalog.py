"""The product catalogue: its schema, reading it from Parquet/CSV/JSON Lines, row validation and content hashing.

Schema (one row per product; see ``data/README.md`` for the full table):

==============  =======  ========  ===========================================================
column          type     required  notes
==============  =======  ========  ===========================================================
item_id         str      yes       unique; ints in the file are converted to str when read
title           str      yes       non-empty after stripping
description     str      no
category        str      yes
brand           str      no
color           str      no
price           float    yes       finite and >= 0
in_stock        bool     no        default True; CSV strings true/false/1/0/yes/no
image           str|bin  yes       local path (relative to the catalogue's folder), a file://,
                                   s3://, gs:// or http(s):// URI, or the raw encoded bytes
(any other)     any      no        kept unchanged as free-form attributes
==============  =======  ========  ===========================================================

Validation never raises for a bad *row*: such rows go to a quarantine table with a ``reason``. It raises
:class:`SchemaError` only for a bad *file* (unknown format, missing required columns, unusable image type).
Image *content* (file exists, decodes) is checked later by the embed pipeline via :func:`read_image_bytes`.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import posixpath
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from common.errors import SchemaError, VitrineError

log = logging.getLogger(__name__)


class ImageError(VitrineError):
    """An image reference cannot be read (missing file, unreachable URI, empty bytes); one-line reason."""


@dataclass(frozen=True)
class CatalogField:
    """One documented catalogue column."""

    name: str  # column name in the file
    type: str  # logical type: "str", "float", "bool" or "image" (str path/URI or binary bytes)
    required: bool  # a file without this column is rejected
    note: str  # one line for the docs


CATALOG_FIELDS: tuple[CatalogField, ...] = (
    CatalogField("item_id", "str", True, "unique; integer ids are converted to str when read"),
    CatalogField("title", "str", True, "non-empty after stripping whitespace"),
    CatalogField("description", "str", False, "free text"),
    CatalogField("category", "str", True, "non-empty"),
    CatalogField("brand", "str", False, ""),
    CatalogField("color", "str", False, ""),
    CatalogField("price", "float", True, "finite and >= 0"),
    CatalogField("in_stock", "bool", False, "default True; true/false/1/0/yes/no accepted"),
    CatalogField("image", "image", True, "path (relative to the catalogue), file/s3/gs/http(s) URI, or bytes"),
)
REQUIRED_FIELDS: tuple[str, ...] = tuple(f.name for f in CATALOG_FIELDS if f.required)
#: The text fields that feed the encoder (with the image bytes); only these enter :func:`content_hash`.
CONTENT_FIELDS: tuple[str, ...] = ("title", "description", "category", "brand", "color")
FORMATS: dict[str, str] = {
    ".parquet": "parquet", ".pq": "parquet", ".csv": "csv",
    ".jsonl": "json", ".ndjson": "json", ".json": "json",
}
IMAGE_URI_SCHEMES: tuple[str, ...] = ("file", "s3", "gs", "http", "https")
GCS_RETRY_SECONDS = 30  # a missing or unreachable image should fail in seconds, not after 15 minutes of retries
_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})
_URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
try:  # fsspec's http driver raises aiohttp's own errors (e.g. a 500), which are not OSErrors
    from aiohttp import ClientError as _HttpError
except ImportError:  # pragma: no cover - without aiohttp fsspec has no http driver at all
    _HttpError = OSError  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class ValidationResult:
    """Rows that follow the schema (normalised) and rows that do not (original values + ``reason``)."""

    valid: pa.Table  # normalised: documented columns first, then free-form attributes
    quarantine: pa.Table  # the input columns as given, plus a str ``reason`` column ("; "-joined)


def _scheme(uri: str) -> str:
    m = _URI_RE.match(uri)
    return m.group(1).lower() if m else ""


def file_format(uri: str) -> str:
    """'parquet', 'csv' or 'json' from the extension of ``uri``; SchemaError naming the valid ones otherwise."""
    suffix = PurePosixPath(urlparse(uri).path if _scheme(uri) else uri).suffix.lower()
    if suffix not in FORMATS:
        raise SchemaError(
            f"unknown file format {suffix or '(no extension)'!r} for {uri}: use one of {', '.join(FORMATS)}"
        )
    return FORMATS[suffix]


def catalog_base_dir(uri: str) -> str:
    """The folder that relative image paths in the catalogue at ``uri`` resolve against (a path or a URI)."""
    if _scheme(uri) in ("", "file"):
        return str(_local_path(uri).resolve().parent)
    return uri.rsplit("/", 1)[0]


def _local_path(ref: str) -> Path:
    if _scheme(ref) == "file":
        return Path(url2pathname(unquote(urlparse(ref).path)))
    return Path(ref).expanduser()


def pyarrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path) for a URI; GCS gets a bounded retry time instead of pyarrow's 15 minutes."""
    if _scheme(uri) == "gs":
        parsed = urlparse(uri)
        return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=GCS_RETRY_SECONDS)), parsed.netloc + parsed.path
    return pafs.FileSystem.from_uri(uri)


def _read_uri_bytes(uri: str) -> bytes:
    """All bytes at a local path or URI: open() locally, fsspec remotely, pyarrow.fs when fsspec lacks the driver."""
    if _scheme(uri) in ("", "file"):
        return _local_path(uri).read_bytes()
    try:
        with fsspec.open(uri, "rb") as f:
            return f.read()
    except ImportError as e:  # e.g. s3fs/gcsfs not installed: pyarrow ships S3 and GCS itself
        log.debug("fsspec cannot open %s (%s); using pyarrow.fs", uri, e)
        fs, path = pyarrow_filesystem(uri)
        with fs.open_input_stream(path) as f:
            return f.read()


def read_image_bytes(ref: str | bytes | bytearray | memoryview) -> bytes:
    """The encoded image bytes behind a catalogue ``image`` value; ImageError with a one-line reason if unreadable."""
    if isinstance(ref, (bytes, bytearray, memoryview)):
        data = bytes(ref)
        if not data:
            raise ImageError("image bytes are empty")
        return data
    if not isinstance(ref, str) or not ref.strip():
        raise ImageError(f"image reference must be a non-empty path, URI or bytes. Got {ref!r}")
    try:
        data = _read_uri_bytes(ref.strip())
    except FileNotFoundError as e:
        raise ImageError(f"image not found: {ref}") from e
    except (OSError, ValueError, ImportError, _HttpError) as e:  # permissions, network, HTTP status, protocol
        raise ImageError(f"cannot read image {ref}: {type(e).__name__}: {e}".splitlines()[0]) from e
    if not data:
        raise ImageError(f"image file is empty: {ref}")
    return data


def _csv_all_strings(data: bytes) -> pa.Table:
    """CSV with every column read as str, so ids keep leading zeros and bad prices reach validation."""
    header = next(csv.reader(io.StringIO(data[:1 << 20].decode("utf-8-sig", errors="replace"))), [])
    types = {name: pa.string() for name in header}
    return pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(column_types=types))


def _json_records(data: bytes) -> pa.Table:
    """JSON Lines (or one JSON array); falls back to Python parsing when a column mixes types across rows."""
    text = data.decode("utf-8-sig")
    if not text.lstrip().startswith("["):
        try:
            return pajson.read_json(io.BytesIO(data))
        except pa.ArrowInvalid as e:
            log.debug("pyarrow JSON reader failed (%s); parsing rows in Python", e)
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = json.loads(text)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise SchemaError("a JSON catalogue must hold one object per line (or a list of objects)")
    names = list(dict.fromkeys(k for r in records for k in r))
    columns = {}
    for name in names:
        values = [r.get(name) for r in records]
        kinds = {type(v) for v in values if v is not None}
        if len(kinds) > 1 and not kinds <= {int, float}:  # mixed: keep as text, validation will judge it
            values = [None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in values]
        columns[name] = pa.array(values)
    return pa.table(columns) if columns else pa.table({})


def ids_as_str(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray:
    """Identifiers as str (the house rule): ints -> "12", integral floats -> "12" (not "12.0"), str unchanged."""
    if pa.types.is_floating(column.type):  # ints that went through a null-holding float column: 12.0 -> "12"
        values = [None if v is None or v != v else (str(int(v)) if float(v).is_integer() else str(v))
                  for v in column.to_pylist()]
        return pa.chunked_array([pa.array(values, pa.string())])
    column = column if isinstance(column, pa.ChunkedArray) else pa.chunked_array([column])
    return column.cast(pa.string())


def read_table(uri: str) -> pa.Table:
    """Read a Parquet, CSV or JSON Lines file (by extension) from a path or URI; CSV columns come back as str.

    Raises SchemaError for an unknown extension or an unparsable file, VitrineError when it cannot be read.
    """
    fmt = file_format(uri)
    try:
        if fmt == "parquet":
            if _scheme(uri) in ("", "file"):
                return pq.read_table(_local_path(uri))
            return pq.read_table(io.BytesIO(_read_uri_bytes(uri)))
        data = _read_uri_bytes(uri)
        return _csv_all_strings(data) if fmt == "csv" else _json_records(data)
    except FileNotFoundError as e:
        raise SchemaError(f"file not found: {uri}") from e
    except (pa.ArrowInvalid, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SchemaError(f"cannot parse {uri} as {fmt}: {str(e).splitlines()[0]}") from e
    except OSError as e:  # permissions, network, a folder instead of a file
        raise VitrineError(f"cannot read {uri}: {type(e).__name__}: {e}".splitlines()[0]) from e


def read_catalog(uri: str) -> pa.Table:
    """Read a catalogue (Parquet, CSV or JSON Lines, by extension) from a path or URI; item_id comes back as str.

    Raises SchemaError for an unknown extension or when required columns are missing (all of them named).
    """
    table = read_table(uri)
    missing = [name for name in REQUIRED_FIELDS if name not in table.column_names]
    if missing:
        raise SchemaError(
            f"catalogue {uri} lacks required column(s) {', '.join(missing)}; "
            f"it has: {', '.join(table.column_names) or '(none)'}"
        )
    table = table.set_column(table.column_names.index("item_id"), "item_id", ids_as_str(table["item_id"]))
    log.info("read %d catalogue rows from %s", table.num_rows, uri)
    return table


def _clean_strings(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Stripped str; empty strings become null."""
    text = pc.utf8_trim_whitespace(column.cast(pa.string()))
    return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)


def _parse_price(value: Any) -> float | None:
    """A finite price >= 0, or None when the value is not one."""
    if isinstance(value, bool):
        return None
    try:
        price = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return None
    return price if math.isfinite(price) and price >= 0 else None


def _parse_in_stock(value: Any) -> bool | None:
    """True/False from a bool, 1/0 or a yes/no-like string (missing -> True); None when it is none of these."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value) if value in (0, 1) else None
    text = str(value).strip().lower()
    if text == "":
        return True
    return True if text in _TRUE else False if text in _FALSE else None


def _resolve_image(ref: Any, base_dir: str) -> tuple[Any, str | None]:
    """(normalised reference, problem or None). URIs and bytes are kept; relative paths joined to base_dir."""
    if isinstance(ref, (bytes, bytearray)):
        return (bytes(ref), None) if ref else (None, "missing image")
    if ref is None or not str(ref).strip():
        return None, "missing image"
    ref = str(ref).strip()
    scheme = _scheme(ref)
    if scheme:
        if scheme not in IMAGE_URI_SCHEMES:
            return None, f"unsupported image URI scheme {scheme!r}: use a path, {', '.join(IMAGE_URI_SCHEMES)}"
        return ref, None
    if Path(ref).expanduser().is_absolute():
        return str(Path(ref).expanduser()), None
    if _scheme(base_dir) not in ("", "file"):  # a remote catalogue: its relative paths are remote too
        return posixpath.join(base_dir.rstrip("/"), ref), None
    return str((_local_path(base_dir) / ref).resolve()), None


def _check_rows(table: pa.Table, base_dir: str) -> tuple[list[list[str]], dict[str, list[Any]]]:
    """Per-row problem lists and the normalised values of the columns that need Python-level parsing."""
    n = table.num_rows
    problems: list[list[str]] = [[] for _ in range(n)]
    ids = _clean_strings(table["item_id"]).to_pylist()
    first_seen: dict[str, int] = {}
    for row, item_id in enumerate(ids):
        if item_id is None:
            problems[row].append("missing item_id")
        elif item_id in first_seen:
            problems[row].append(f"duplicate item_id {item_id!r} (first at row {first_seen[item_id]})")
        else:
            first_seen[item_id] = row
    for name in ("title", "category"):
        for row, value in enumerate(_clean_strings(table[name]).to_pylist()):
            if value is None:
                problems[row].append(f"missing {name}")
    prices, stock, images = [], [], []
    for row, raw in enumerate(table["price"].to_pylist()):
        prices.append(_parse_price(raw))
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            problems[row].append("missing price")
        elif prices[-1] is None:
            problems[row].append(f"price is not a finite number >= 0: {raw}")
    raw_stock = table["in_stock"].to_pylist() if "in_stock" in table.column_names else [None] * n
    for row, raw in enumerate(raw_stock):
        stock.append(_parse_in_stock(raw))
        if stock[-1] is None:
            problems[row].append(f"in_stock is not a boolean (true/false/1/0/yes/no): {raw}")
    for row, raw in enumerate(table["image"].to_pylist()):
        ref, problem = _resolve_image(raw, base_dir)
        images.append(ref)
        if problem:
            problems[row].append(problem)
    return problems, {"item_id": ids, "price": prices, "in_stock": stock, "image": images}


def validate_catalog(table: pa.Table, base_dir: str | Path) -> ValidationResult:
    """Split a catalogue into normalised valid rows and quarantined rows with a reason (never raises for a row).

    Normalises: strings stripped (empty optional strings -> null), price float64, in_stock bool (default True),
    relative image paths -> absolute paths under ``base_dir`` (the catalogue's folder, a path or a URI).
    Duplicate item_ids: the first row wins, later ones are quarantined naming the first row (0-based).
    """
    missing = [name for name in REQUIRED_FIELDS if name not in table.column_names]
    if missing:
        raise SchemaError(f"catalogue lacks required column(s) {', '.join(missing)}")
    image_type = table.schema.field("image").type
    is_binary = pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
    if not (is_binary or pa.types.is_string(image_type) or pa.types.is_large_string(image_type)
            or pa.types.is_null(image_type)):
        raise SchemaError(f"image column must be str (path/URI) or binary (bytes). Got {image_type}")
    if not pa.types.is_string(table.schema.field("item_id").type):
        table = table.set_column(table.column_names.index("item_id"), "item_id", ids_as_str(table["item_id"]))
    problems, parsed = _check_rows(table, str(base_dir))
    ok = pa.array([not p for p in problems], pa.bool_())
    reasons = pa.array(["; ".join(p) for p in problems if p], pa.string())
    quarantine = table.filter(pc.invert(ok))
    quarantine = quarantine.drop_columns(["reason"]) if "reason" in quarantine.column_names else quarantine
    quarantine = quarantine.append_column("reason", reasons)
    columns: dict[str, pa.Array | pa.ChunkedArray] = {}
    for f in CATALOG_FIELDS:
        if f.name in ("item_id", "price", "in_stock", "image"):
            kind = {"price": pa.float64(), "in_stock": pa.bool_(),
                    "image": pa.binary() if is_binary else pa.string()}.get(f.name, pa.string())
            columns[f.name] = pa.array(parsed[f.name], kind)
        elif f.name in table.column_names:
            columns[f.name] = _clean_strings(table[f.name])
        else:
            columns[f.name] = pa.nulls(table.num_rows, pa.string())
    extras = [name for name in table.column_names if name not in columns]
    valid = pa.table({**columns, **{name: table[name] for name in extras}}).filter(ok)
    if quarantine.num_rows:
        log.warning("quarantined %d of %d catalogue rows (first: %s)", quarantine.num_rows, table.num_rows,
                    reasons[0].as_py())
    return ValidationResult(valid=valid, quarantine=quarantine)


def load_catalog(uri: str) -> ValidationResult:
    """``validate_catalog(read_catalog(uri), catalog_base_dir(uri))``: the usual way in."""
    return validate_catalog(read_catalog(uri), catalog_base_dir(uri))


def _canonical_text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def content_hash(row: dict[str, Any], image_bytes: bytes, model_identity: str) -> str:
    """sha256 hex of what the encoder sees: the CONTENT_FIELDS text, the image *bytes* and the model identity.

    Price, stock, the image's path/URI and free-form attributes are deliberately left out, so a price change
    or a moved image file does not force re-encoding; a new title, new image bytes or a new model does.
    Strings are stripped and empty/NaN counts as missing, so CSV and Parquet copies of a row hash alike.
    """
    payload = {
        "v": 1,
        "fields": {name: _canonical_text(row.get(name)) for name in CONTENT_FIELDS},
        "image_sha256": hashlib.sha256(bytes(image_bytes)).hexdigest(),
        "model": model_identity,
    }
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
