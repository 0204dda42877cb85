"""Alignment pairs from a catalogue file: its own (image, text) pairs, split by item into train, validation, test.

``vitrine align --catalog FILE`` aligns the encoder on any catalogue in the documented schema instead of
Fashion-MNIST. Items are split by a hash of ``item_id`` (80% train, 10% validation, 10% test), so reruns and
catalogue updates keep an item on its side. The text is what the embed job encodes (:func:`item_text`); the
category is the label for the quality figures: zero-shot "a photo of a {category}." accuracy and same-category
precision@10 of the joint-space image vector, on the test items. Rows that fail validation or whose image does
not decode are left out and counted.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.alignment import cached_features, encode_features
from common.catalog import load_catalog
from common.encoder import ItemEncoder
from common.errors import ConfigError
from jobs.embed_stages import decode_images, item_text

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_BUCKETS = (80, 90)  # hash bucket (0-99) < 80 -> train, < 90 -> validation, else test


@dataclass(frozen=True, eq=False)
class CatalogPairs:
    """Decoded pairs of one catalogue: pixels [N, S, S, 3], texts, category labels and each item's split."""

    pixels: np.ndarray
    texts: list[str]
    labels: np.ndarray  # index into ``categories``
    categories: list[str]
    split: np.ndarray  # one of SPLITS per pair
    skipped: int  # rows quarantined by validation or with an image that did not decode


def split_of(item_id: str) -> str:
    """Deterministic split of an item from the hash of its id."""
    bucket = int(hashlib.sha1(item_id.encode()).hexdigest()[:8], 16) % 100
    return SPLITS[0] if bucket < _BUCKETS[0] else SPLITS[1] if bucket < _BUCKETS[1] else SPLITS[2]


def catalog_pairs(uri: str, image_size: int) -> CatalogPairs:
    """Valid catalogue rows with decodable images, as pairs with labels and splits."""
    checked = load_catalog(uri)
    rows = checked.valid.to_pylist()
    decoded = decode_images({"item_id": [r["item_id"] for r in rows], "image": [r["image"] for r in rows]},
                            image_size)
    ok = np.array([not e for e in decoded["error"]], bool)
    rows = [r for r, good in zip(rows, ok) if good]
    skipped = checked.quarantine.num_rows + int((~ok).sum())
    if skipped:
        log.warning("align: %d catalogue row(s) left out (invalid or undecodable image)", skipped)
    categories = sorted({str(r["category"]) for r in rows if r.get("category")})
    if len(categories) < 2:
        raise ConfigError(f"aligning on {uri} needs items of at least 2 categories (the labels of the quality "
                          f"figures). Got {categories}")
    rows_ok = [r for r in rows if r.get("category")]
    keep = np.array([bool(r.get("category")) for r in rows], bool)
    return CatalogPairs(pixels=decoded["pixels"][ok][keep], texts=[item_text(r) for r in rows_ok],
                        labels=np.array([categories.index(str(r["category"])) for r in rows_ok]),
                        categories=categories, split=np.array([split_of(r["item_id"]) for r in rows_ok]),
                        skipped=skipped + int((~keep).sum()))


def catalog_data(uri: str, encoder: ItemEncoder, folder: Path, prompt: str):
    """The AlignData of a catalogue: frozen features of its train/validation/test items (cached by content)."""
    from jobs.align_encoder import AlignData

    pairs = catalog_pairs(uri, encoder.image_size)
    part = {s: pairs.split == s for s in SPLITS}
    for s in ("train", "test"):
        if part[s].sum() < 2:
            raise ConfigError(f"aligning on {uri}: only {int(part[s].sum())} item(s) fall in the {s} split; "
                              "a catalogue needs at least ~20 valid items")
    texts = [t for t, m in zip(pairs.texts, part["train"]) if m]
    train = cached_features(folder, encoder.identity, pairs.pixels[part["train"]], texts,
                            lambda: encode_features(encoder, pairs.pixels[part["train"]], texts))
    test = cached_features(folder, encoder.identity + "|image", pairs.pixels[part["test"]], None,
                           lambda: encode_features(encoder, pairs.pixels[part["test"]], None,
                                                   kinds=("visual", "image")))
    val = (cached_features(folder, encoder.identity + "|val", pairs.pixels[part["val"]], None,
                           lambda: encode_features(encoder, pairs.pixels[part["val"]], None))
           if part["val"].any() else {"visual": np.zeros((0, train["visual"].shape[1]), np.float32)})
    prompt_texts = tuple(prompt.format(c.lower()) for c in pairs.categories)
    prompts = encoder.encode_texts(list(prompt_texts))
    log.info("align on %s: %d train, %d validation, %d test items over %d categories", uri, int(part["train"].sum()),
             int(part["val"].sum()), int(part["test"].sum()), len(pairs.categories))
    return AlignData(visual=train["visual"], text=train["text"], eval_visual=test["visual"],
                     eval_image_before=test["image"], eval_labels=pairs.labels[part["test"]],
                     val_visual=val["visual"], val_labels=pairs.labels[part["val"]], prompts=prompts,
                     encoder_identity=encoder.identity, prompt_texts=prompt_texts)
