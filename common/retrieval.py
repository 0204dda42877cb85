"""Catalogue queries over the vector store: similar items and text search, with filters."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from common.errors import ConfigError, CollectionMismatchError, NotFoundError
from common.item_index import collection_name
from common.vector_store import Hit, VectorStore

if TYPE_CHECKING:
    from common.encoder import ItemEncoder

log = logging.getLogger(__name__)

MAX_K = 1000  # a bound on result size, for the CLI and the server alike
TEXT_KINDS = ("fused", "image", "text")  # kinds that live in the text tower's space


def check_k(k: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise ConfigError(f"k must be an integer in [1, {MAX_K}]. Got {k!r}")
    return k


def item_vector(store: VectorStore, base: str, item_id: str, kind: str = "visual") -> np.ndarray:
    """The stored ``kind`` vector of an item; NotFoundError names the id when it is not in the catalogue."""
    name = collection_name(base, kind)
    rows = store.get(name, [item_id], with_vectors=True)
    if not rows:
        raise NotFoundError(f"unknown item_id {item_id!r} in collection {base!r}")
    return np.asarray(rows[0]["vector"], dtype=np.float32)


def similar_items(store: VectorStore, base: str, item_id: str, k: int = 10, filter: str | None = None,
                  kind: str = "visual") -> list[Hit]:
    """The ``k`` items nearest to ``item_id`` in the ``kind`` space, the item itself excluded."""
    check_k(k)
    query = item_vector(store, base, item_id, kind)
    return store.search(collection_name(base, kind), query[None, :], k=k, filter=filter,
                        exclude_ids=[item_id])[0]


def search_text(store: VectorStore, encoder: "ItemEncoder", base: str, query: str, k: int = 10,
                filter: str | None = None, kind: str = "fused") -> list[Hit]:
    """The ``k`` items that best match a free-text query (text tower -> ``kind`` vectors)."""
    check_k(k)
    if kind not in TEXT_KINDS:
        raise ConfigError(f"text search needs a vector kind in the text space: {', '.join(TEXT_KINDS)}. Got {kind!r}")
    if not query or not query.strip():
        raise ConfigError("the search query is empty")
    name = collection_name(base, kind)
    spec = store.describe(name)
    if spec.model != encoder.identity:
        raise CollectionMismatchError(
            f"collection {name!r} holds vectors of {spec.model}, but the query encoder is {encoder.identity}"
        )
    vector = encoder.encode_texts([query.strip()])
    return store.search(name, vector, k=k, filter=filter)[0]
