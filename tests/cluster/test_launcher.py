"""The cluster launcher template validates against Ray's own schema, and its node groups hold what jobs ask."""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_launcher_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / "launcher.yaml").read_text())
    validate_config(prepare_config(config))  # `ray up`'s own checks: unknown fields or wrong types raise
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"]["CPU"] == 0
    assert types["gpu_worker"]["resources"]["GPU"] >= 1 and types["gpu_worker"]["min_workers"] == 0
    assert types["cpu_worker"]["max_workers"] + types["gpu_worker"]["max_workers"] <= config["max_workers"]


def test_a_misspelt_field_is_refused():
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / "launcher.yaml").read_text())
    config["available_node_types"]["cpu_worker"]["max_worker"] = 3
    with pytest.raises(Exception):
        validate_config(prepare_config(config))


def test_local_cluster_scripts_are_valid_bash():
    import subprocess

    for script in ("start-head.sh", "start-worker.sh", "stop-head.sh", "submit-embed.sh", "env.sh"):
        done = subprocess.run(["bash", "-n", str(ROOT / "cluster" / script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
