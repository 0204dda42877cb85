"""Each RayJob's entrypoint is `python -m vitrine.cli ...` whose exact arguments the CLI parses into a valid config."""
from __future__ import annotations

import importlib
import importlib.util
import shlex

import pytest

from tests.k8s.kuberay import JOBS_OF

# The module behind each subcommand (vitrine/cli.py wires these with _add_job / evaluate.build_parser); `events`
# is a command of the CLI itself (its arguments are checked by the parser and below).
JOB_MODULES = {("embed",): "embed_catalog", ("rules",): "mine_rules", ("profiles",): "build_profiles",
               ("align",): "align_encoder", ("train", "two-tower"): "train_two_tower",
               ("train", "graphsage"): "train_graphsage", ("train", "ranker"): "train_ranker",
               ("eval",): "evaluate", ("events",): None}
PREFIX = ["python", "-m", "vitrine.cli"]


def parse_entrypoint(entrypoint: str):
    """(subcommand path, argparse Namespace, job config) for an entrypoint; SystemExit on an unknown argument."""
    from vitrine.cli import build_parser

    argv = shlex.split(entrypoint)
    assert argv[:3] == PREFIX, f"entrypoint must start with {' '.join(PREFIX)}: {entrypoint!r}"
    assert importlib.util.find_spec(argv[2]) is not None
    args = build_parser().parse_args(argv[3:])
    # From the words, not args.model: `train ranker --model hgb` reuses that name (the ranker's model kind).
    command = tuple(argv[3:5]) if args.command == "train" else (args.command,)
    if JOB_MODULES[command] is None:
        return command, args, None
    module = importlib.import_module(f"jobs.{JOB_MODULES[command]}")
    return command, args, module.config_from_args(args)  # validates values, runs nothing


def storage(objects) -> dict[str, str]:
    return next(o["data"] for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "vitrine-storage")


@pytest.mark.parametrize("platform", sorted(JOBS_OF))
def test_entrypoints_parse_and_use_the_cluster_stores(built, platform):
    where = storage(built(platform))
    seen = set()
    for job in (j for j in built(JOBS_OF[platform]) if j["kind"] == "RayJob"):
        command, args, _ = parse_entrypoint(job["spec"]["entrypoint"])
        seen.add(command)
        if getattr(args, "store_uri", None) is not None:
            assert args.store_uri == where["VITRINE_STORE_URI"], job["metadata"]["name"]
        if getattr(args, "artifacts_uri", None) is not None:
            assert args.artifacts_uri == where["VITRINE_ARTIFACTS"], job["metadata"]["name"]
    assert seen == set(JOB_MODULES), f"a RayJob per batch job: missing {set(JOB_MODULES) - seen}"


def test_an_unknown_argument_fails_the_check(built):
    job = next(j for j in built("base/jobs") if j["metadata"]["name"] == "vitrine-embed")
    with pytest.raises(SystemExit):
        parse_entrypoint(job["spec"]["entrypoint"] + " --num-encoders 4")


@pytest.mark.parametrize("platform", sorted(JOBS_OF))
def test_the_learning_jobs_read_what_the_events_job_exports_from_the_services_log(built, platform):
    """Step 2 exports the offline events and the service's event log; steps 3-7 learn from its output."""
    from tests.k8s.test_serve_config import serve_config_v2

    jobs = {j["metadata"]["labels"]["vitrine.io/job"]: parse_entrypoint(j["spec"]["entrypoint"])[1]
            for j in built(JOBS_OF[platform]) if j["kind"] == "RayJob"}
    export = jobs["events"]
    assert export.action == "export" and export.log_optional and export.events
    [app] = serve_config_v2(built(platform))["applications"]
    assert export.log == app["args"]["event_log"]  # the log the service appends to
    for name in ("rules", "profiles", "train-ranker", "train-two-tower", "train-graphsage"):
        assert jobs[name].events == export.out, name
    assert jobs["eval"].events == export.events[0]  # the offline protocol keeps the offline events
