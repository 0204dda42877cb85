"""The `vitrine` command line: parse, call the library or a job, print. One-line errors, non-zero exits."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable

from common.errors import ConfigError, VitrineError

log = logging.getLogger("vitrine")

SHOWN = ("item_id", "score", "category", "title", "brand", "color", "price", "in_stock")


def _print_hits(hits, as_json: bool) -> None:
    rows = [{"item_id": h.item_id, "score": round(float(h.score), 4),
             **{k: h.fields.get(k) for k in SHOWN[2:] if k in h.fields}} for h in hits]
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, default=str))
        return
    if not rows:
        print("(no results)")
        return
    import pandas as pd

    print(pd.DataFrame(rows).to_string(index=False, max_colwidth=40))


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--collection", default="items", help="catalogue name (default: items)")
    p.add_argument("--store", help="vector store URI (default: $VITRINE_STORE_URI or var/milvus)")
    p.add_argument("--filter", help="Milvus filter, e.g. 'category == \"Bag\" and price < 50'")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def cmd_similar(args: argparse.Namespace) -> int:
    from common.config import default_store_uri, resolve_uri
    from common.retrieval import similar_items
    from common.vector_store import open_store

    store = open_store(resolve_uri(args.store) if args.store else default_store_uri())
    _print_hits(similar_items(store, args.collection, args.item_id, k=args.k, filter=args.filter,
                              kind=args.space), args.json)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from common.artifacts import ArtifactStore
    from common.config import default_artifacts_uri, default_store_uri, from_mapping, resolve_uri
    from common.encoder import EncoderConfig, ItemEncoder
    from common.retrieval import search_text
    from common.vector_store import open_store

    artifacts = ArtifactStore(resolve_uri(args.artifacts) if args.artifacts else default_artifacts_uri())
    manifest = artifacts.manifest("embeddings", args.collection)
    encoder = ItemEncoder(from_mapping(EncoderConfig, manifest["encoder"]))
    store = open_store(resolve_uri(args.store) if args.store else default_store_uri())
    _print_hits(search_text(store, encoder, args.collection, " ".join(args.query), k=args.k, filter=args.filter,
                            kind=args.space), args.json)
    return 0


def cmd_milvus(args: argparse.Namespace) -> int:
    from common import milvus_local
    from common.config import default_store_uri, resolve_uri

    data_dir = resolve_uri(args.store) if args.store else default_store_uri()
    if args.action == "start":
        info = milvus_local.ensure_server(data_dir)
    elif args.action == "stop":
        info = milvus_local.stop(data_dir)
    else:
        info = milvus_local.status(data_dir)
    print(json.dumps(dataclasses.asdict(info) if dataclasses.is_dataclass(info) else info, default=str))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    from common.sample_catalog import build_sample_catalog
    from common.synthetic_events import generate_events, write_events, write_users

    out = Path(args.out)
    catalog = build_sample_catalog(out, per_class=args.per_class, seed=args.seed)
    events, users = generate_events(catalog, n_users=args.users, seed=args.seed)
    write_events(events, str(out / "events.parquet"))
    write_users(users, str(out / "users.parquet"))
    print(f"wrote {catalog.num_rows} items, {len(events)} events of {len(users)} users to {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serve import launch
    from serve.config import config_from_file

    if args.stop:
        launch.stop(args.address)
        print("service stopped")
        return 0
    cfg = config_from_file(args.config, {
        "store_uri": args.store, "artifacts_uri": args.artifacts, "collection": args.collection,
        "events": args.events, "users": args.users, "event_log": args.event_log, "host": args.host,
        "port": args.port, "ranker": args.ranker})
    url = launch.start(cfg, args.address)
    print(f"Vitrine is serving at {url} (OpenAPI: {url}/docs). Try:")
    print(launch.examples(url, args.example_item, args.example_user))
    if args.foreground:
        import time

        print("serving in the foreground; Ctrl-C stops it")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            launch.stop(args.address)
    else:
        print("It keeps running in the Ray cluster; stop it with: vitrine serve --stop")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from common.config import resolve_uri
    from common.event_log import EventLog, is_event_log
    from serve.config import default_event_log

    log_uri = resolve_uri(args.log) if args.log else default_event_log()
    if args.action == "export":
        from common.event_export import export_events

        if not args.out:
            raise ConfigError("events export needs --out FILE (.parquet, .csv or .jsonl)")
        files = [resolve_uri(f) for f in args.events or []]
        print(export_events(resolve_uri(args.out), None if args.no_log else log_uri, files, args.since,
                            log_optional=args.log_optional).summary())
        return 0
    if not is_event_log(log_uri):
        raise ConfigError(f"{log_uri} holds no event log parts (date=*/part-*.parquet): nothing was appended there")
    if args.action == "compact":
        print(json.dumps({"log": log_uri, "parts_removed": EventLog(log_uri).compact(args.older_than)}))
    else:
        print(json.dumps(EventLog(log_uri).stats(), indent=1))
    return 0


def _events_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["stats", "compact", "export"],
                   help="stats: what the log holds; compact: merge past days' parts (one compaction at a time); "
                        "export: offline files + the log as one events file for the learning jobs")
    p.add_argument("--log", help="the service's event log (default: var/events)")
    p.add_argument("--events", action="append", metavar="FILE",
                   help="export: an offline events file to include (repeatable), e.g. data/sample/events.parquet")
    p.add_argument("--out", help="export: the events file to write (.parquet, .csv or .jsonl)")
    p.add_argument("--since", help="export: only events at or after this ISO-8601 time (UTC when naive)")
    p.add_argument("--no-log", action="store_true", help="export: the files only, without the event log")
    p.add_argument("--log-optional", action="store_true",
                   help="export: a log with nothing appended yet exports the files only (a pipeline's first run)")
    p.add_argument("--older-than", type=float, metavar="SECONDS",
                   help="compact: today's parts written at least this long ago too (default: past days only)")
    p.set_defaults(func=cmd_events)


def cmd_submit(args: argparse.Namespace) -> int:
    from vitrine.submit import submit

    env = dict(pair.split("=", 1) for pair in args.env or [])
    return submit(args.job, address=args.address, working_dir=args.working_dir, runtime_env_file=args.runtime_env,
                  env=env, python=args.python, follow=not args.no_follow)


def _submit_args(p: argparse.ArgumentParser) -> None:
    from vitrine.submit import DEFAULT_ADDRESS

    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS_HTTP", DEFAULT_ADDRESS),
                   help=f"the Ray dashboard / job API (default: $RAY_ADDRESS_HTTP or {DEFAULT_ADDRESS})")
    p.add_argument("--working-dir", default=".", help="uploaded with the job (.venv, var/, .git left out)")
    p.add_argument("--runtime-env", help="a runtime env YAML (e.g. cluster/runtime_env.yaml)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE", help="an environment variable for the job")
    p.add_argument("--python", help="the Python the cluster runs (default: this one on a local head, else python)")
    p.add_argument("--no-follow", action="store_true", help="submit and return without following the logs")
    p.add_argument("job", nargs=argparse.REMAINDER, help="the job and its arguments, e.g. embed --catalog s3://...")
    p.set_defaults(func=cmd_submit)


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of serve settings (serve/config.py ServeConfig; business rules "
                                    "under `rules:`)")
    p.add_argument("--store", help="vector store URI (default: $VITRINE_STORE_URI or var/milvus)")
    p.add_argument("--artifacts", help="artifact store URI (default: $VITRINE_ARTIFACTS or var/artifacts)")
    p.add_argument("--collection", help="catalogue name (default: items)")
    p.add_argument("--events", help="offline events file for history and popularity (default: the sample's)")
    p.add_argument("--users", help="user features file for popularity by segment (default: the sample's)")
    p.add_argument("--event-log", help="where POST /events appends (default: var/events)")
    p.add_argument("--host", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--ranker", help="'latest' published ranker (default), a version, or 'none'")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, a running local head, or a new one)")
    p.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops the service")
    p.add_argument("--stop", action="store_true", help="shut the service down (and the local Ray head it started)")
    p.add_argument("--example-item", default="fm-000299", help=argparse.SUPPRESS)
    p.add_argument("--example-user", default="u-0001", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    from jobs import (
        align_encoder,
        build_profiles,
        embed_catalog,
        evaluate,
        mine_rules,
        train_graphsage,
        train_ranker,
        train_two_tower,
    )

    parser = argparse.ArgumentParser(prog="vitrine", description="Multimodal product recommendations on Ray")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_job(sub, "embed", embed_catalog, "embed a catalogue into the vector store (Ray Data job)")

    similar = sub.add_parser("similar", help="items similar to an item")
    similar.add_argument("item_id")
    similar.add_argument("--space", default="visual", choices=["visual", "fused", "image", "text"],
                         help="which vectors to compare (default visual: image-only similarity)")
    _store_args(similar)
    similar.set_defaults(func=cmd_similar)

    search = sub.add_parser("search", help="text search over the catalogue (text -> image and title)")
    search.add_argument("query", nargs="+")
    search.add_argument("--space", default="fused", choices=["fused", "image", "text"],
                        help="which item vectors to match (default fused: image and text)")
    search.add_argument("--artifacts", help="artifact store (to find the collection's encoder)")
    _store_args(search)
    search.set_defaults(func=cmd_search)

    _add_job(sub, "align", align_encoder, "align the encoder's towers on catalogue pairs (Ray Train, LiT heads)")

    train = sub.add_parser("train", help="train a learned recommender on events (Ray Train)")
    models = train.add_subparsers(dest="trainer", required=True)
    _add_job(models, "two-tower", train_two_tower, "two-tower retrieval model; vectors into Milvus")
    _add_job(models, "graphsage", train_graphsage, "GraphSAGE on the user-item graph; vectors into Milvus")
    _add_job(models, "ranker", train_ranker, "the serving graph's learned reranker (candidates -> features -> model)")
    _add_job(sub, "rules", mine_rules, "mine frequently-bought-together rules from events (FP-Growth)")
    _add_job(sub, "profiles", build_profiles, "build user profile vectors (mean item embeddings) into the store")

    ev = sub.add_parser("eval", help="compare every recommender on a public data set or an events file")
    evaluate.build_parser(ev)
    ev.set_defaults(func=lambda a: evaluate.run_and_print(a))

    _serve_args(sub.add_parser("serve", help="run the recommendation service (Ray Serve graph over HTTP)"))
    _events_args(sub.add_parser("events", help="the service's event log: stats, compaction, export for retraining"))
    _submit_args(sub.add_parser("submit", help="submit a batch job to a Ray cluster and follow it to the end"))

    milvus = sub.add_parser("milvus", help="the embedded Milvus Lite server behind a store folder")
    milvus.add_argument("action", choices=["start", "stop", "status"])
    milvus.add_argument("--store", help="store folder (default: $VITRINE_STORE_URI or var/milvus)")
    milvus.set_defaults(func=cmd_milvus)

    sample = sub.add_parser("sample", help="rebuild the shipped sample catalogue and synthetic events")
    sample.add_argument("--out", default="data/sample")
    sample.add_argument("--per-class", type=int, default=200)
    sample.add_argument("--users", type=int, default=500)
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=cmd_sample)
    return parser


def _add_job(sub, name: str, job, help: str) -> None:
    """A subcommand for a batch job module: its own flags; runs ``job.run`` and prints the one-line summary."""
    p = sub.add_parser(name, help=help)
    job.build_parser(p)

    def run(args: argparse.Namespace) -> int:
        print(job.run(job.config_from_args(args)).summary())
        return 0

    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our packages log progress at INFO; libraries (open_clip logs through the root logger) only warnings.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("common", "jobs", "serve", "vitrine"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except VitrineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
