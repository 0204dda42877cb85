"""Serve settings, the declarative deployment config and the error -> HTTP status mapping (no Ray needed)."""
from __future__ import annotations

import json

import pytest

from common.errors import (ConfigError, FilterError, NotFoundError, SchemaError, StoreError, StoreUnavailableError,
                           TrainingFailedError)
from serve.config import Replicas, ServeConfig, config_from_mapping
from serve.ingress import error_response
from serve.launch import app_config, examples


def test_values_from_serve_run_arguments_are_typed_and_paths_absolute(tmp_path):
    cfg = config_from_mapping({"candidates": "40", "port": "8100", "diversity": "0.5", "search_ef": "128",
                               "events": "none", "store_uri": "rel/milvus", "retriever": {"max_replicas": 4}})
    assert (cfg.candidates, cfg.port, cfg.diversity, cfg.search_ef, cfg.events) == (40, 8100, 0.5, 128, None)
    assert cfg.store_uri.startswith("/") and cfg.retriever == Replicas(max_replicas=4)


@pytest.mark.parametrize("values, message", [
    ({"surprise": 1}, "surprise"),
    ({"candidates": 0}, "candidates"),
    ({"candidates": "many"}, "candidates must be a number"),
    ({"diversity": 1.5}, "diversity"),
    ({"ranker": "best"}, "ranker"),
    ({"collection": "1bad"}, "collection name"),
    ({"retriever": {"num_cpus": 0}}, "num_cpus"),
    ({"retriever": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
])
def test_bad_settings_are_refused_with_the_value(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_mapping(values)


def test_replicas_options_are_fractional_and_autoscaled():
    options = Replicas(num_cpus=0.25, min_replicas=1, max_replicas=3).options(gpus=1.0)
    assert options["ray_actor_options"] == {"num_cpus": 0.25, "num_gpus": 1.0}
    assert options["autoscaling_config"]["max_replicas"] == 3 and options["max_ongoing_requests"] >= 1


def test_app_config_carries_rules_only_as_the_filters_user_config():
    cfg = ServeConfig(rules={"deny_categories": ["Bag"]}, port=8123)
    config = app_config(cfg)
    json.dumps(config)  # what `serve deploy` / a RayService would take
    [app] = config["applications"]
    assert app["import_path"] == "serve.app:build_app" and "rules" not in app["args"]
    assert app["deployments"] == [{"name": "BusinessFilter", "user_config": {"deny_categories": ["Bag"]}}]
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert config_from_mapping(app["args"]) == ServeConfig(port=8123)  # the args rebuild the same config


@pytest.mark.parametrize("error, status", [
    (NotFoundError("unknown item_id 'x'"), 404),
    (ConfigError("k must be in [1, 100]"), 422),
    (FilterError("invalid filter"), 422),
    (SchemaError("bad event"), 422),
    (StoreUnavailableError("Milvus at x is unavailable"), 503),
    (StoreError("upsert failed"), 500),
    (TrainingFailedError("no"), 500),
    (RuntimeError("boom\nTraceback (most recent call last)"), 500),
])
def test_errors_map_to_statuses_with_one_line_and_no_trace(error, status):
    response = error_response(error)
    body = json.loads(response.body)
    assert response.status_code == status and "\n" not in body["error"] and "Traceback" not in body["error"]
    assert (response.headers.get("Retry-After") is not None) == (status == 503)


def test_an_error_raised_in_a_replica_is_unwrapped():
    from ray.exceptions import RayTaskError

    wrapped = RayTaskError("Retriever.similar", "Traceback (most recent call last): ...", NotFoundError("gone"))
    response = error_response(wrapped)
    assert response.status_code == 404 and json.loads(response.body) == {"error": "gone"}


def test_examples_are_curl_calls():
    lines = examples("http://127.0.0.1:8000", "fm-000299", "u-0001").splitlines()
    assert all(line.startswith("curl -s") for line in lines) and any("-X POST" in line for line in lines)


def test_serve_stop_stops_only_a_ray_head_it_started(tmp_path, monkeypatch):
    """The session noted when `vitrine serve` started the head must be the connected one (the real start and stop
    run in `make demo` / `make serve-stop`)."""
    from serve import launch

    marker = tmp_path / "var" / "ray-head.json"
    monkeypatch.setattr(launch, "started_marker", lambda: marker)
    monkeypatch.setattr(launch, "_session_name", lambda: "session_b")
    assert not launch._started_here()  # nothing noted: someone else's cluster
    marker.parent.mkdir()
    marker.write_text('{"session": "session_a"}')
    assert not launch._started_here()  # a head started earlier, stopped since; another runs now
    marker.write_text('{"session": "session_b"}')
    assert launch._started_here()
    marker.write_text("{not json")
    assert not launch._started_here()
