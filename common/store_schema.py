"""What Vitrine sends to Milvus: store URIs, rows (ids, vectors, typed scalar fields) and filter expressions."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from common.vector_store import CollectionSpec

PRIMARY_KEY = "item_id"
VECTOR_FIELD = "vector"
MAX_ID_LENGTH = 512  # bytes, the varchar length of item_id
VALID_URIS = (
    "a local path (var/milvus, ./x.db), milvus-lite:///abs/path, milvus-lite://rel/path, "
    "http://host:port, https://host:port or tcp://host:port"
)
_HOST_PORT_RE = re.compile(r"[\w.-]+:\d+")


@dataclass(frozen=True)
class StoreTarget:
    """Where a store URI points."""

    kind: str  # "lite" (shared local Milvus Lite server) or "server"
    location: str  # absolute data directory for "lite", the endpoint URI for "server"


def parse_store_uri(uri: str) -> StoreTarget:
    """Classify a store URI; ConfigError (naming the valid forms) for anything else."""
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"vector store URI is empty; use {VALID_URIS}")
    uri = uri.strip()
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        scheme = scheme.lower()
        if scheme == "milvus-lite":
            if not rest.strip("/"):
                raise ConfigError(f"vector store URI {uri!r} names no data directory; use {VALID_URIS}")
            return StoreTarget("lite", os.path.abspath(os.path.expanduser(rest)))
        if scheme in ("http", "https", "tcp"):
            if not rest.split("/", 1)[0]:
                raise ConfigError(f"vector store URI {uri!r} names no host; use {VALID_URIS}")
            return StoreTarget("server", uri)
        raise ConfigError(f"unsupported vector store URI {uri!r}; use {VALID_URIS}")
    if _HOST_PORT_RE.fullmatch(uri) and not Path(uri).exists():
        raise ConfigError(f"vector store URI {uri!r} looks like host:port; write http://{uri} (valid: {VALID_URIS})")
    return StoreTarget("lite", os.path.abspath(os.path.expanduser(uri)))


def fields_from_schema(by_name: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Scalar field types read from a collection schema (for collections without Vitrine's properties)."""
    from pymilvus import DataType  # noqa: PLC0415

    kinds = {DataType.VARCHAR: "str", DataType.DOUBLE: "float", DataType.FLOAT: "float", DataType.INT64: "int",
             DataType.INT32: "int", DataType.INT16: "int", DataType.INT8: "int", DataType.BOOL: "bool",
             DataType.JSON: "json"}
    return {n: kinds.get(f["type"], "json") for n, f in by_name.items() if n not in (PRIMARY_KEY, VECTOR_FIELD)}


def check_ids(ids: Sequence[Any]) -> list[str]:
    """The ids as a list; StoreError unless each is a non-empty string."""
    if isinstance(ids, (str, bytes)):
        raise StoreError(f"ids must be a list of strings, not one string ({ids!r})")
    bad = [i for i in ids if not isinstance(i, str) or not i]
    if bad:
        raise StoreError(f"ids must be non-empty strings; got {bad[:5]!r}")
    return list(ids)


def normalised(vectors: np.ndarray, spec: CollectionSpec, *, what: str) -> np.ndarray:
    """``vectors`` as rows of unit length; StoreError (naming ``what``) for a wrong shape, NaN or a zero row."""
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or vectors.shape[1] != spec.dim:
        raise StoreError(f"{what} have shape {list(vectors.shape)}; collection {spec.name!r} expects [n, {spec.dim}]")
    if not np.isfinite(vectors).all():
        raise StoreError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if (norms == 0).any():
        raise StoreError(f"{what} contain an all-zero vector (row {int(np.flatnonzero(norms[:, 0] == 0)[0])})")
    return vectors / norms


def prepare_row(spec: CollectionSpec, row: dict[str, Any]) -> dict[str, Any]:
    """A row as Milvus takes it: checked id, normalised float32 vector, exactly the spec's fields, coerced."""
    if not isinstance(row, dict):
        raise StoreError(f"rows must be dicts; got {type(row).__name__}")
    item_id = row.get(PRIMARY_KEY)
    if not isinstance(item_id, str) or not item_id or len(item_id.encode()) > MAX_ID_LENGTH:
        raise StoreError(f"row {PRIMARY_KEY} must be a non-empty string of at most {MAX_ID_LENGTH} bytes; "
                         f"got {item_id!r}")
    if VECTOR_FIELD not in row:
        raise StoreError(f"row {item_id!r} has no {VECTOR_FIELD!r}")
    vector = np.asarray(row[VECTOR_FIELD], dtype=np.float32)
    if vector.ndim != 1 or vector.shape[0] != spec.dim:
        raise StoreError(f"row {item_id!r}: vector has shape {list(vector.shape)}; collection {spec.name!r} "
                         f"expects [{spec.dim}]")
    out: dict[str, Any] = {PRIMARY_KEY: item_id,
                           VECTOR_FIELD: normalised(vector, spec, what=f"row {item_id!r}: vector")[0]}
    extra = sorted(set(row) - {PRIMARY_KEY, VECTOR_FIELD} - set(spec.fields))
    missing = sorted(set(spec.fields) - set(row))
    if extra or missing:
        raise StoreError(f"row {item_id!r} of {spec.name!r}: missing fields {missing}, unknown fields {extra}; "
                         f"the collection's fields are {spec.fields}")
    for fname, kind in spec.fields.items():
        out[fname] = _scalar(row[fname], kind, item_id, fname)
    return out


def _scalar(value: Any, kind: str, item_id: str, fname: str) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    ok = {
        "str": isinstance(value, str),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "json": value is not None,
    }[kind]
    if not ok:
        raise StoreError(f"row {item_id!r}: field {fname!r} must be {kind}; got {value!r}")
    return float(value) if kind == "float" else value


def row_out(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the store returns it (its vector, if any, as a float32 array)."""
    out = dict(row)
    if VECTOR_FIELD in out:
        out[VECTOR_FIELD] = np.asarray(out[VECTOR_FIELD], dtype=np.float32)
    return out


def combine_filter(expr: str | None, exclude_ids: list[str]) -> str:
    """The filter sent to Milvus: the caller's expression and-ed with ``item_id not in [...]``."""
    expr = (expr or "").strip()
    if not exclude_ids:
        return expr  # as written, so Milvus' column numbers in errors match the caller's expression
    parts = [f"({expr})"] if expr else []
    if exclude_ids:
        parts.append(f"({ids_filter(list(dict.fromkeys(exclude_ids)), negate=True)})")
    return " and ".join(parts)


def ids_filter(ids: list[str], negate: bool = False) -> str:
    """``item_id in [...]`` (``not in`` when ``negate``), the ids JSON-quoted."""
    quoted = ", ".join(json.dumps(i, ensure_ascii=False) for i in ids)
    return f"{PRIMARY_KEY} {'not in' if negate else 'in'} [{quoted}]"


def search_params(index: str, k: int, ef: int) -> dict[str, int]:
    """Search-time parameters for the index type."""
    if index in ("HNSW", "AUTOINDEX"):
        return {"ef": max(ef, k)}
    if index.startswith("IVF"):
        return {"nprobe": 16}
    return {}
