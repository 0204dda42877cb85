"""Benchmark: the base encoder against the aligned one on Fashion-MNIST test photos, and free-text search.

For each preset, on the first 200 *test* images of each class (never trained on):

* zero-shot text->image accuracy with "a photo of a {class}." and same-class precision@10 of the joint-space
  ``image`` vector (the protocol of benchmarks/image_quality.py);
* free-text search over those photos, each given a GENERATED catalogue text (common.sample_catalog, read as the
  embed job reads it): for queries such as "red dress", the share of the top 10 in the query's category and, where
  the query names a colour, in its colour, searching the ``image``, ``text`` and ``fused`` vectors. Fashion-MNIST is
  greyscale, so colour can only come from the text; the image vectors cannot learn it.

Prints JSON; no assertions.

    python -m benchmarks.align_quality --out align_quality.json
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

import numpy as np

from common.model_assets import ALIGNED_MODEL_NAME, BASE_MODEL_NAME

#: (query, Fashion-MNIST label, colour word or None)
QUERIES: tuple[tuple[str, int, str | None], ...] = (
    ("red dress", 3, "red"), ("black ankle boots", 9, "black"), ("white sneakers", 7, "white"),
    ("navy trousers", 1, "navy"), ("grey wool pullover", 2, "grey"), ("leather bag", 8, None),
    ("warm winter coat", 4, None), ("summer sandals", 5, None), ("button-down shirt", 6, None),
    ("plain t-shirt", 0, None),
)


def free_text_search(encoder: Any, vectors: dict[str, np.ndarray], labels: np.ndarray, colors: list[str],
                     k: int = 10) -> dict[str, dict[str, float]]:
    """Mean category and colour precision@k of the QUERIES over each vector kind."""
    q = encoder.encode_texts([t for t, _, _ in QUERIES])
    out: dict[str, dict[str, float]] = {}
    for kind, v in vectors.items():
        top = np.argsort(-(q @ v.T), axis=1)[:, :k]
        category = [float((labels[t] == label).mean()) for t, (_, label, _) in zip(top, QUERIES)]
        colour = [float(np.mean([colors[i] == c for i in t])) for t, (_, _, c) in zip(top, QUERIES) if c]
        out[kind] = {"category_p10": round(float(np.mean(category)), 4), "colour_p10": round(float(np.mean(colour)), 4)}
    return out


def measure(model: str, per_class: int, precision: str, seed: int) -> dict[str, Any]:
    from common.alignment import encode_features, precision_at_k, zero_shot_accuracy
    from common.encoder import EncoderConfig, ItemEncoder
    from common.sample_catalog import sample_table
    from jobs.align_encoder import class_prompts, eval_split
    from jobs.embed_stages import item_text

    images, labels = eval_split(per_class)
    rows = sample_table(np.arange(len(labels)), labels, seed).to_pylist()
    encoder = ItemEncoder(EncoderConfig(model=model, precision=precision))
    t0 = time.perf_counter()
    feats = encode_features(encoder, images, [item_text(r) for r in rows], kinds=("visual", "image"))
    seconds = time.perf_counter() - t0
    prompts = encoder.encode_texts(class_prompts())
    vectors = {"image": feats["image"], "text": feats["text"], "fused": encoder.fuse(feats["image"], feats["text"])}
    return {
        "model": encoder.identity, "plan": encoder.plan, "images": len(labels), "encode_seconds": round(seconds, 1),
        "zero_shot_accuracy": round(zero_shot_accuracy(feats["image"], prompts, labels), 4),
        "precision_at_10": {"visual": round(precision_at_k(feats["visual"], labels), 4),
                            "image": round(precision_at_k(feats["image"], labels), 4)},
        "free_text_search": free_text_search(encoder, vectors, labels, [r["color"] for r in rows]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=[BASE_MODEL_NAME, ALIGNED_MODEL_NAME],
                   help="presets or local-dir:PATH folders to compare")
    p.add_argument("--per-class", type=int, default=200, help="test images per class")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--seed", type=int, default=1, help="seed of the generated test-catalogue texts")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    results = [measure(m, args.per_class, args.precision, args.seed) for m in args.models]
    text = json.dumps({"queries": [q for q, _, _ in QUERIES], "results": results}, indent=2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
