"""The RayService's serveConfigV2 is what `vitrine serve --config serve.yaml` deploys, and Serve accepts it."""
from __future__ import annotations

import importlib

import pytest
import yaml

from tests.k8s import render_serve_config as render
from tests.k8s.kuberay import K8S

SETTINGS = {"base": "base/serve.yaml", "overlays/prod": "base/serve.yaml", "overlays/dev": "overlays/dev/serve.yaml"}


def serve_config_v2(objects) -> dict:
    (service,) = [o for o in objects if o["kind"] == "RayService"]
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def test_generated_patches_are_up_to_date():
    assert render.main(["--check"]) == 0, "run: .venv/bin/python -m tests.k8s.render_serve_config"


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_serve_config_equals_app_config(built, name):
    assert serve_config_v2(built(name)) == render.serve_config(K8S / SETTINGS[name])


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_serve_accepts_the_config(built, name):
    from ray.serve.schema import ServeDeploySchema

    from common.business_rules import BusinessRules
    from serve.config import config_from_mapping

    config = serve_config_v2(built(name))
    ServeDeploySchema.model_validate(config)
    storage = next(o["data"] for o in built(name) if o["kind"] == "ConfigMap")
    names = deployment_names()
    for app in config["applications"]:
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        cfg = config_from_mapping(app["args"])
        assert (cfg.store_uri, cfg.artifacts_uri) == (storage["VITRINE_STORE_URI"], storage["VITRINE_ARTIFACTS"])
        assert cfg.host == "0.0.0.0", "Serve's proxy must listen beyond the pod's loopback"
        for d in app.get("deployments", []):
            assert d["name"] in names, f"unknown deployment {d['name']!r}; the graph has {sorted(names)}"
            if "user_config" in d:
                assert d["name"] == "BusinessFilter"
                BusinessRules.from_mapping(d["user_config"])


def deployment_names() -> set[str]:
    from ray.serve import Deployment

    import serve.app

    return {v.name for v in vars(serve.app).values() if isinstance(v, Deployment)}


def test_deployment_names_are_the_graphs():
    assert deployment_names() == {"Ingress", "Retriever", "Reranker", "BusinessFilter", "EventSink", "TextEncoder"}


def test_bad_rules_are_caught(tmp_path):
    from common.business_rules import BusinessRules
    from common.errors import ConfigError

    settings = yaml.safe_load((K8S / "base/serve.yaml").read_text())
    settings["rules"]["max_per_categry"] = 2
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(settings))
    config = render.serve_config(tmp_path / "serve.yaml")
    with pytest.raises(ConfigError):
        BusinessRules.from_mapping(config["applications"][0]["deployments"][0]["user_config"])
