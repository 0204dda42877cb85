"""ensure_ray: one retry when a local Ray start times out, and no retry for other errors."""
from __future__ import annotations

import pytest
import ray

from jobs import ray_runtime


def test_a_local_start_that_times_out_is_retried_once(monkeypatch):
    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_y")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "init", fake_init)
    ray_runtime.ensure_ray()
    assert len(calls) == 2 and calls[1]["address"] == "local"


def test_other_start_errors_are_not_retried(monkeypatch):
    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("something else")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    with pytest.raises(RuntimeError, match="something else"):
        ray_runtime.ensure_ray()
    assert len(calls) == 1
