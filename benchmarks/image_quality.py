"""Benchmark: how well the encoder's image vectors group Fashion-MNIST test products, and zero-shot text->image.

On 2,000 Fashion-MNIST *test* images (the first 200 of each class, in file order): same-class precision@10
(self excluded, cosine) for raw pixels, the ``visual`` vectors and the ``image`` (joint-space) vectors; and
zero-shot accuracy: each image is labelled with the class whose prompt "a photo of a {class}." is nearest in
the joint space. Prints JSON; no assertions.

    python -m benchmarks.image_quality --precision auto --out image_quality.json
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

import numpy as np

from common import fashion_mnist
from common.alignment import precision_at_k, zero_shot_accuracy
from jobs.align_encoder import class_prompts, eval_split

def run(per_class: int, precision: str, batch: int, invert: bool) -> dict[str, Any]:
    from PIL import Image

    from common.encoder import EncoderConfig, ItemEncoder

    images, labels = eval_split(per_class)
    if invert:  # Fashion-MNIST is light-on-black; catalogue photos are mostly dark-on-white
        images = 255 - images
    encoder = ItemEncoder(EncoderConfig(precision=precision))
    pixels = np.stack([encoder.prepare_image(Image.fromarray(im)) for im in images])
    t0 = time.perf_counter()
    parts = [encoder.encode_images(pixels[i:i + batch]) for i in range(0, len(pixels), batch)]
    seconds = time.perf_counter() - t0
    visual = np.concatenate([p["visual"] for p in parts])
    image = np.concatenate([p["image"] for p in parts])
    prompts = encoder.encode_texts(class_prompts())
    return {
        "model": encoder.identity, "plan": encoder.plan, "images": len(images), "inverted": invert,
        "encode_seconds": round(seconds, 1), "prompts": class_prompts(),
        "precision_at_10": {
            "raw_pixels": round(precision_at_k(images.reshape(len(images), -1).astype(np.float32), labels), 4),
            "visual": round(precision_at_k(visual, labels), 4),
            "image": round(precision_at_k(image, labels), 4),
        },
        "zero_shot_accuracy": round(zero_shot_accuracy(image, prompts, labels), 4),
        "zero_shot_chance": round(1 / len(fashion_mnist.CLASS_NAMES), 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=200, help="test images per class")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=64, help="images per encode_images call")
    p.add_argument("--invert", action="store_true", help="also measure on inverted (dark-on-white) images")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results = [run(args.per_class, args.precision, args.batch, invert=False)]
    if args.invert:
        results.append(run(args.per_class, args.precision, args.batch, invert=True))
    text = json.dumps(results, indent=2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
