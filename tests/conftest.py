"""Shared fixtures: one local Ray for the session, an embedded Milvus store, tiny catalogues."""
from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """The one Ray instance of the test session (in-process, 2 CPUs)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory):
    """An embedded Milvus Lite store folder for the session; its server is stopped at the end."""
    from common import milvus_local

    path = tmp_path_factory.mktemp("store") / "milvus"
    yield str(path)
    milvus_local.stop(str(path))


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly where CUDA is absent."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
