"""The Dockerfile builds from what exists: its COPY sources, the extras it installs, the model function it calls."""
from __future__ import annotations

import fnmatch
import re
import tomllib

from tests.k8s.kuberay import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(name + " ")]


def test_base_image_matches_the_project_python():
    (base,) = instructions("FROM")
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert base == "python:3.11-slim" and requires == ">=3.11"


def test_copied_paths_exist_and_are_not_ignored():
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip()[:1] not in ("", "#")]
    for copy in instructions("COPY"):
        for src in copy.split()[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: no such path"
            assert not any(fnmatch.fnmatch(src, pattern) for pattern in ignored), f"COPY {src} is in .dockerignore"
    for heavy in (".venv", "var", ".git"):
        assert heavy in ignored


def test_installed_extras_exist_in_pyproject():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    asked = set(re.findall(r"'\.\[([\w,]+)\]'", DOCKERFILE))
    assert asked, "the Dockerfile installs the project with an extra ('.[s3]')"
    for group in asked:
        for extra in group.split(","):
            assert extra in extras, f"Dockerfile installs '.[{extra}]' but pyproject.toml has no such extra"


def test_the_model_it_builds_is_the_default_encoder():
    from common import model_assets

    (name,) = re.findall(r"from common\.model_assets import (\w+)", DOCKERFILE)
    assert callable(getattr(model_assets, name))
    assert name == "ensure_default_model"
    assert "VITRINE_CACHE=" in DOCKERFILE  # where it is built is where pods look (common.config.cache_dir)
