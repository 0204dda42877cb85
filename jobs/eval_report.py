"""Writes an evaluation's report: ``metrics.json``, ``report.md`` and PNG plots (matplotlib, Agg backend).

``metrics.json`` keys (documented in README):
``dataset``, ``protocol``, ``users``, ``items``, ``train_events``, ``test_events``, ``quarantined``, ``seconds``,
``config`` (the EvalConfig), ``skipped`` (model -> reason), and ``models``: model name -> {``metrics``:
{"precision@K", "recall@K", "ndcg@K", "hit_rate@K", "map@K", "coverage@K", "diversity@K" (K <= 20, when item
vectors exist), "users"}, ``slices``: {"light_users", "cold_items"} -> the same rank metrics at K <= 20,
``fit_seconds``, ``score_seconds``}.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobs.evaluate import EvalConfig, EvalResult

_TABLE_METRICS = ("precision", "recall", "ndcg", "hit_rate", "map", "coverage")


def _payload(result: EvalResult, cfg: EvalConfig) -> dict:
    config = asdict(cfg)
    config["weights"] = {"events": dict(cfg.weights.events), "buttons": dict(cfg.weights.buttons),
                         "rating_center": cfg.weights.rating_center}
    return {"dataset": result.dataset, "protocol": result.protocol, "users": result.users, "items": result.items,
            "train_events": result.train_events, "test_events": result.test_events,
            "quarantined": result.quarantined, "seconds": round(result.seconds, 2), "config": config,
            "skipped": result.skipped,
            "models": {r.model: {"metrics": r.metrics, "slices": r.slices, "fit_seconds": round(r.fit_seconds, 3),
                                 "score_seconds": round(r.score_seconds, 3)} for r in result.reports}}


def _plots(result: EvalResult, fs, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({int(key.split("@")[1]) for r in result.reports for key in r.metrics if key.startswith("ndcg@")})
    files = []
    for metric in ("ndcg", "recall"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in result.reports:
            ax.plot(ks, [r.metrics[f"{metric}@{k}"] for k in ks], marker="o", label=r.model)
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K")
        ax.set_ylabel(f"{metric}@K")
        ax.set_title(f"{result.dataset}: {metric}@K ({result.protocol} protocol)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"{metric}_at_k.png"
        with fs.open(f"{out}/{name}", "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
        files.append(name)
    return files


def _markdown(result: EvalResult, cfg: EvalConfig, plots: list[str]) -> str:
    ks = [k for k in cfg.ks if k <= 20] or [min(cfg.ks)]
    lines = [f"# Evaluation: {result.dataset}", "",
             f"Protocol: **{result.protocol}** "
             + ("(per-user temporal split, last {:.0%} of each user's items held out)".format(cfg.holdout)
                if result.protocol == "user" else "(each user's last order held out; first item added -> the rest)")
             + "; items seen in training excluded; the whole catalogue ranked.", "",
             f"{result.users} users, {result.items} items, {result.train_events} training and "
             f"{result.test_events} held-out events, {result.quarantined} events quarantined.", ""]
    for k in ks:
        lines += [f"## At K = {k}", "", "| model | " + " | ".join(_TABLE_METRICS) + " | fit s |",
                  "| --- |" + " ---: |" * (len(_TABLE_METRICS) + 1)]
        for r in result.reports:
            cells = [f"{r.metrics.get(f'{m}@{k}', float('nan')):.4f}" for m in _TABLE_METRICS]
            lines.append(f"| {r.model} | " + " | ".join(cells) + f" | {r.fit_seconds:.1f} |")
        lines.append("")
    slice_names = sorted({s for r in result.reports for s in r.slices})
    if slice_names:
        lines += ["## Slices (NDCG@10 / recall@10)", "", "| model | " + " | ".join(slice_names) + " |",
                  "| --- |" + " ---: |" * len(slice_names)]
        for r in result.reports:
            cells = [f"{r.slices[s].get('ndcg@10', float('nan')):.4f} / {r.slices[s].get('recall@10', float('nan')):.4f}"
                     for s in slice_names]
            lines.append(f"| {r.model} | " + " | ".join(cells) + " |")
        lines.append("")
    if result.skipped:
        lines += ["Skipped: " + "; ".join(f"{m} ({why})" for m, why in result.skipped.items()), ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(result: EvalResult, cfg: EvalConfig) -> str:
    """Write metrics.json, the PNG plots and report.md into ``result.out_dir`` (a folder or any fsspec URI, e.g.
    ``s3://bucket/eval/ml-100k``); returns it."""
    from fsspec.core import url_to_fs

    fs, out = url_to_fs(result.out_dir)
    out = out.rstrip("/")
    fs.makedirs(out, exist_ok=True)
    with fs.open(f"{out}/metrics.json", "w") as f:
        f.write(json.dumps(_payload(result, cfg), indent=2, default=str) + "\n")
    plots = _plots(result, fs, out) if result.reports else []
    with fs.open(f"{out}/report.md", "w") as f:
        f.write(_markdown(result, cfg, plots))
    return result.out_dir
