"""How a catalogue lives in the vector store: one collection per vector kind, the same scalar fields in each."""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.errors import ConfigError
from common.vector_store import CollectionSpec

#: Vector kinds an item has. ``visual``: image-only similarity; ``image``: the image in the joint text space;
#: ``text``: the title/description in that space; ``fused``: image and text combined (text search, default).
VECTOR_KINDS: tuple[str, ...] = ("visual", "image", "text", "fused")
#: Column names of the vectors in batches and Parquet files (``image`` alone is the catalogue's image reference).
VECTOR_COLUMNS: dict[str, str] = {kind: f"{kind}_vector" for kind in VECTOR_KINDS}
#: Scalar fields stored beside every vector, for filters and for showing results.
SCALAR_FIELDS: dict[str, str] = {
    "title": "str",
    "category": "str",
    "brand": "str",
    "color": "str",
    "price": "float",
    "in_stock": "bool",
    "content_hash": "str",   # what the vectors were computed from (see common.catalog.content_hash)
    "fingerprint": "str",    # content_hash plus every scalar field: a changed price re-upserts, not re-encodes
    "attributes": "json",    # free-form catalogue columns
}
# The fused kind is written last in every batch: its fingerprint marks the item as complete in all kinds.
WRITE_ORDER: tuple[str, ...] = ("visual", "image", "text", "fused")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")


def check_base_name(base: str) -> str:
    """A catalogue collection name must be a valid Milvus name prefix."""
    if not _NAME.match(base or ""):
        raise ConfigError(
            f"collection name must start with a letter or '_' and hold only letters, digits and '_'. Got {base!r}"
        )
    return base


def collection_name(base: str, kind: str) -> str:
    """The physical collection holding ``kind`` vectors of catalogue ``base``."""
    if kind not in VECTOR_KINDS:
        raise ConfigError(f"vector kind must be one of {', '.join(VECTOR_KINDS)}. Got {kind!r}")
    return f"{check_base_name(base)}_{kind}"


def collection_specs(base: str, model: str, dims: Mapping[str, int], index: str = "AUTOINDEX") -> list[CollectionSpec]:
    """One spec per vector kind, in write order."""
    return [
        CollectionSpec(name=collection_name(base, kind), dim=int(dims[kind]), model=model,
                       fields=dict(SCALAR_FIELDS), index=index)
        for kind in WRITE_ORDER
    ]


def fingerprint(row: Mapping[str, Any]) -> str:
    """A hash of everything the store holds for an item except its vectors."""
    payload = {name: _plain(row.get(name)) for name in SCALAR_FIELDS if name != "fingerprint"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and value != value:  # NaN
        return None
    return value


def scalar_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar fields of an item as the store wants them (types coerced, nulls filled)."""
    attrs = row.get("attributes")
    if isinstance(attrs, str):
        attrs = json.loads(attrs) if attrs else {}
    out = {
        "title": str(row.get("title") or ""),
        "category": str(row.get("category") or ""),
        "brand": str(row.get("brand") or ""),
        "color": str(row.get("color") or ""),
        "price": float(row.get("price") or 0.0),
        "in_stock": bool(row.get("in_stock")),
        "content_hash": str(row.get("content_hash") or ""),
        "attributes": attrs or {},
    }
    out["fingerprint"] = fingerprint(out)
    return out


def store_rows(items: Sequence[Mapping[str, Any]], vectors: Mapping[str, np.ndarray]) -> dict[str, list[dict]]:
    """Rows for each kind's collection: ``items[i]`` with ``vectors[kind][i]``."""
    scalars = [scalar_row(r) for r in items]
    return {
        kind: [
            {"item_id": str(r["item_id"]), "vector": np.asarray(vectors[kind][i], dtype=np.float32), **s}
            for i, (r, s) in enumerate(zip(items, scalars))
        ]
        for kind in WRITE_ORDER
    }
