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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def object_storage():
    """Real object storage APIs on loopback: an S3 server (moto) and a GCS emulator, each with a bucket.

    Yields ``{"s3": "s3://vitrine-test", "gs": "gs://vitrine-test"}``; the clients find them through the
    environment a cluster would set (``AWS_ENDPOINT_URL``, ``STORAGE_EMULATOR_HOST``), restored afterwards."""
    pytest.importorskip("moto", reason="the S3 server comes from the dev extra (moto[server])")
    pytest.importorskip("gcp_storage_emulator", reason="the GCS emulator comes from the dev extra")
    from gcp_storage_emulator.server import create_server
    from moto.server import ThreadedMotoServer

    s3_port, gcs_port = _free_port(), _free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    s3.start()
    gcs = create_server("127.0.0.1", gcs_port, in_memory=True, default_bucket="vitrine-test")
    gcs.start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{s3_port}")
        env.setenv("AWS_ACCESS_KEY_ID", "test")
        env.setenv("AWS_SECRET_ACCESS_KEY", "test")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{gcs_port}")
        import fsspec
        import gcsfs.core

        # gcsfs >= 2026 serves gs:// with a class that first asks the Storage Control gRPC API for the bucket's
        # layout, which the emulator lacks (a 60 s timeout per bucket): use the plain JSON-API class here.
        env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        before = {p: fsspec.get_filesystem_class(p) for p in ("gs", "gcs")}
        for p in before:
            fsspec.register_implementation(p, gcsfs.core.GCSFileSystem, clobber=True)
        conf = {p: fsspec.config.conf.get(p) for p in ("gs", "gcs")}
        for p in conf:  # no credentials to look up (google.auth would probe the cloud metadata server first)
            fsspec.config.conf[p] = {**(conf[p] or {}), "token": "anon"}
        fsspec.filesystem("s3").mkdir("vitrine-test")
        try:
            yield {"s3": "s3://vitrine-test", "gs": "gs://vitrine-test"}
        finally:
            for cls in (fsspec.get_filesystem_class("s3"), gcsfs.core.GCSFileSystem):
                cls.clear_instance_cache()
            for p, cls in before.items():
                fsspec.register_implementation(p, cls, clobber=True)
                fsspec.config.conf.pop(p) if conf[p] is None else fsspec.config.conf.update({p: conf[p]})
            gcs.stop()
            s3.stop()
