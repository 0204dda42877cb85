"""Benchmark: catalogue embedding throughput, three ways on the same items in one run.

1. ``bare``: the batched model forward alone (images pre-decoded, batches of ``--batch``; image + text towers).
2. ``pipeline``: the real embed job on Ray Data (read, validate, decode, encoder actors, cache and Milvus writes).
3. ``naive``: one item at a time, torch fp32 eager, decoding inline (what the source projects did).

Each phase runs in its own process; peak memory is the largest summed RSS of that process and its children
(Ray's workers included), sampled every 0.2 s. Items/s counts an item as image + text encoded. Prints JSON and
writes it to ``--out``. No assertions: the README records what it measured.

    python benchmarks/embed_throughput.py --items 2000 --naive-items 200 --out var/bench/embed_throughput.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _items(n: int) -> list[dict[str, Any]]:
    import pandas as pd

    from common.config import default_catalog

    df = pd.read_parquet(default_catalog())
    df = df.sample(n=min(n, len(df)), random_state=0) if n < len(df) else df
    base = Path(default_catalog()).parent
    return [{**r, "image": str(base / r["image"])} for r in df.to_dict("records")]


def _texts(items: list[dict[str, Any]]) -> list[str]:
    from jobs.embed_stages import item_text

    return [item_text(r) for r in items]


def phase_bare(n: int, batch: int, precision: str, runtime: str) -> dict[str, Any]:
    from PIL import Image

    from common.encoder import EncoderConfig, ItemEncoder

    items = _items(n)
    enc = ItemEncoder(EncoderConfig(precision=precision, runtime=runtime))
    pixels = [enc.prepare_image(Image.open(r["image"])) for r in items]
    texts = _texts(items)
    import numpy as np

    warm = np.stack(pixels[:batch])
    enc.fuse(enc.encode_images(warm)["image"], enc.encode_texts(texts[:batch]))  # convert or compile outside the clock
    t0 = time.perf_counter()
    for i in range(0, len(items), batch):
        images = enc.encode_images(np.stack(pixels[i:i + batch]))
        enc.fuse(images["image"], enc.encode_texts(texts[i:i + batch]))
    seconds = time.perf_counter() - t0
    return {"items": len(items), "seconds": seconds, "items_per_s": len(items) / seconds, "plan": enc.plan,
            "text_plan": enc.text_plan}


def phase_naive(n: int) -> dict[str, Any]:
    from PIL import Image

    from common.encoder import EncoderConfig, ItemEncoder

    items = _items(n)
    enc = ItemEncoder(EncoderConfig(precision="fp32", runtime="torch"))
    texts = _texts(items)
    t0 = time.perf_counter()
    for r, text in zip(items, texts):
        pixels = enc.prepare_image(Image.open(r["image"]))[None]
        enc.fuse(enc.encode_images(pixels)["image"], enc.encode_texts([text]))
    seconds = time.perf_counter() - t0
    return {"items": len(items), "seconds": seconds, "items_per_s": len(items) / seconds, "plan": enc.plan}


def phase_pipeline(n: int, batch: int, precision: str, runtime: str, encoders: int = 0) -> dict[str, Any]:
    import pandas as pd
    import ray

    from common import milvus_local
    from common.encoder import EncoderConfig
    from jobs.embed_catalog import EmbedConfig, run

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(tmp) / "catalog.parquet"
        pd.DataFrame(_items(n)).to_parquet(catalog, index=False)
        store = str(Path(tmp) / "milvus")
        try:
            result = run(EmbedConfig(catalog=str(catalog), collection="bench", store_uri=store,
                                     artifacts_uri=str(Path(tmp) / "artifacts"), batch_size=batch,
                                     encoders=encoders, encoder=EncoderConfig(precision=precision, runtime=runtime)))
        finally:
            milvus_local.stop(store)
    ray.shutdown()
    return {"items": result.items, "seconds": result.seconds, "items_per_s": result.steady_items_per_s,
            "end_to_end_items_per_s": result.items / result.seconds}


def _sampled(cmd: list[str]) -> tuple[dict[str, Any], float]:
    """Run a phase in a child process; return its JSON result and peak summed RSS (MiB) of its process tree."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        parent = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"phase {cmd[-1]} failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]), peak / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--naive-items", type=int, default=200, help="the naive loop is slow: it runs on fewer items")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--precision", default="auto")
    p.add_argument("--runtime", default="auto", choices=["auto", "torch", "openvino"],
                   help="the bare forward's and the pipeline's (the naive loop is always torch fp32 eager)")
    p.add_argument("--out", default=str(ROOT / "var" / "bench" / "embed_throughput.json"))
    p.add_argument("--encoders", type=int, default=0, help="the pipeline's encoder actors (0: the job's default)")
    p.add_argument("--phases", nargs="+", choices=["bare", "pipeline", "naive"], default=["bare", "pipeline", "naive"])
    p.add_argument("--phase", choices=["bare", "pipeline", "naive"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:
        result = {"bare": lambda: phase_bare(args.items, args.batch, args.precision, args.runtime),
                  "pipeline": lambda: phase_pipeline(args.items, args.batch, args.precision, args.runtime,
                                                     args.encoders),
                  "naive": lambda: phase_naive(args.naive_items)}[args.phase]()
        print(json.dumps(result))
        return 0
    base = [sys.executable, str(Path(__file__).resolve()), "--items", str(args.items), "--naive-items",
            str(args.naive_items), "--batch", str(args.batch), "--precision", args.precision,
            "--runtime", args.runtime, "--encoders", str(args.encoders), "--phase"]
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(),
                                          "processor": platform.processor() or platform.machine(),
                                          "python": platform.python_version()}}
    for phase in args.phases:
        result, peak = _sampled([*base, phase])
        report[phase] = {**result, "peak_rss_mib": round(peak)}
        print(f"{phase}: {json.dumps(report[phase])}", file=sys.stderr)
    for other in ("bare", "naive"):
        if "pipeline" in report and other in report:
            report[f"pipeline_vs_{other}"] = round(report["pipeline"]["items_per_s"] / report[other]["items_per_s"], 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
