"""The stages of the catalogue embedding pipeline: pure CPU functions and the callable classes Ray Data runs.

Batches are dicts of numpy arrays (``batch_format="numpy"``). Each stage adds columns and never drops a row:
a row that fails carries its reason in ``error`` to the end, where the job quarantines it.
"""
from __future__ import annotations

import functools
import io
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from common.catalog import ImageError, content_hash, read_image_bytes
from common.embedding_cache import EmbeddingCache, vector_column
from common.encoder import EncoderConfig, ItemEncoder, prepare_image
from common.item_index import VECTOR_COLUMNS, collection_name, store_rows
from common.vector_store import VectorStore, open_store

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
TEXT_FIELDS = ("title", "category", "color", "brand", "description")


def _rows(batch: Batch) -> list[dict[str, Any]]:
    n = len(batch["item_id"])
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _load(ref: Any) -> Image.Image:
    """Read and decode one image reference; ImageError with a one-line reason when it cannot."""
    data = read_image_bytes(ref)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"corrupt image: {e}") from e
    return img


def inspect_images(batch: Batch, identity: str, known: frozenset[str]) -> Batch:
    """Read each image, hash the item's content and decide its action: 'encode', 'cached' or 'error'."""
    hashes, actions, errors = [], [], []
    for row in _rows(batch):
        try:
            data = read_image_bytes(row["image"])
            Image.open(io.BytesIO(data)).verify()
        except ImageError as e:
            hashes.append("")
            actions.append("error")
            errors.append(str(e))
            continue
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            hashes.append("")
            actions.append("error")
            errors.append(f"corrupt image: {e}")
            continue
        h = content_hash(row, data, identity)
        hashes.append(h)
        actions.append("cached" if h in known else "encode")
        errors.append("")
    return {"item_id": batch["item_id"], "content_hash": np.array(hashes, dtype=object),
            "action": np.array(actions, dtype=object), "error": np.array(errors, dtype=object)}


def decode_images(batch: Batch, image_size: int) -> Batch:
    """Decode and resize each image to uint8 ``[S, S, 3]``; a failure leaves a blank image and an error."""
    pixels = np.zeros((len(batch["item_id"]), image_size, image_size, 3), dtype=np.uint8)
    errors = []
    for i, ref in enumerate(batch["image"]):
        try:
            pixels[i] = prepare_image(_load(ref), image_size)
            errors.append("")
        except ImageError as e:
            errors.append(str(e))
    out = {k: v for k, v in batch.items() if k != "image"}
    out["pixels"] = pixels
    out["error"] = np.array(errors, dtype=object)
    return out


def item_text(row: Mapping[str, Any]) -> str:
    """The text the text tower reads for an item: title, category, colour, brand, description."""
    parts = [str(row.get(f) or "").strip() for f in TEXT_FIELDS]
    return ". ".join(p for p in parts if p and p.lower() != "nan")


class EncodeBatch:
    """Encoder actor: loads the model once, then turns pixels and text into the four vector kinds."""

    def __init__(self, encoder_cfg: EncoderConfig, threads: int = 0):
        if threads > 0:
            # Ray sets OMP_NUM_THREADS to the actor's num_cpus (1); on a CPU node the encoder should use the
            # cores that no other actor encodes on.
            import torch

            torch.set_num_threads(threads)
        self.encoder = ItemEncoder(encoder_cfg)

    def __call__(self, batch: Batch) -> Batch:
        images = self.encoder.encode_images(batch["pixels"])
        text = self.encoder.encode_texts([item_text(r) for r in _rows({k: v for k, v in batch.items()
                                                                     if k != "pixels"})])
        out = {k: v for k, v in batch.items() if k != "pixels"}
        vectors = {"visual": images["visual"], "image": images["image"], "text": text,
                   "fused": self.encoder.fuse(images["image"], text)}
        out.update({VECTOR_COLUMNS[kind]: v for kind, v in vectors.items()})
        return out


@functools.lru_cache(maxsize=4)
def _store(uri: str) -> VectorStore:
    """One store connection per worker process and URI, reused by every write task on that worker."""
    return open_store(uri)


def write_batch(batch: Batch, store_uri: str, base: str, cache_uri: str, run_id: str) -> Batch:
    """Add a batch's vectors to the embedding cache, upsert them into every kind's collection, and pass on
    only what the driver needs to count (id, hash, error).

    A task, not an actor: on a 2-CPU Ray 2.60 cluster a second actor pool after the encoder pool never
    became ready (both actors alive, the operator stuck at "pending"; see README, Known issues).
    """
    ok = np.array([not e for e in batch["error"]], dtype=bool)
    if ok.any():
        EmbeddingCache(cache_uri).write(pa.table({
            "content_hash": pa.array(batch["content_hash"][ok].tolist(), pa.string()),
            **{col: vector_column(batch[col][ok]) for col in VECTOR_COLUMNS.values()},
        }), run_id)
        meta = {k: v for k, v in batch.items() if k not in VECTOR_COLUMNS.values()}
        items = [r for r, good in zip(_rows(meta), ok) if good]
        store = _store(store_uri)
        for kind, rows in store_rows(items, {k: batch[c][ok] for k, c in VECTOR_COLUMNS.items()}).items():
            store.upsert(collection_name(base, kind), rows)
    return {"item_id": batch["item_id"], "content_hash": batch["content_hash"], "error": batch["error"]}
