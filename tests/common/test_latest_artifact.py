"""LatestArtifact: a serving replica's rules or ranker follow what the jobs publish, without a redeploy."""
from __future__ import annotations

import json
import time

import pytest

from common.artifacts import ArtifactStore, LatestArtifact
from common.errors import ConfigError


def _publish(store: ArtifactStore, payload: str) -> str:
    version = store.new_version("rules", "items")
    with open(store.path("rules", "items", version, "payload.json"), "w") as f:
        json.dump({"payload": payload}, f)
    store.publish("rules", "items", version, {"payload": payload})
    return version


def _load(store: ArtifactStore):
    def load(version: str) -> str:
        with open(store.path("rules", "items", version, "payload.json")) as f:
            payload = json.load(f)["payload"]
        if payload == "broken":
            raise ValueError("not a rules table")
        return payload
    return load


def test_nothing_published_then_a_first_and_a_newer_version(tmp_path):
    store = ArtifactStore(str(tmp_path))
    watched = LatestArtifact(store, "rules", "items", _load(store), check_s=0)
    assert (watched.value, watched.version, watched.refresh()) == (None, None, False)
    v1 = _publish(store, "one")
    assert watched.refresh() and (watched.value, watched.version) == ("one", v1)
    assert not watched.refresh()  # nothing newer
    v2 = _publish(store, "two")
    assert watched.refresh() and (watched.value, watched.version, watched.refreshes) == ("two", v2, 2)


def test_a_version_that_fails_to_load_leaves_the_current_one_serving(tmp_path):
    store = ArtifactStore(str(tmp_path))
    v1 = _publish(store, "one")
    watched = LatestArtifact(store, "rules", "items", _load(store), check_s=0)
    _publish(store, "broken")
    assert not watched.refresh() and (watched.value, watched.version, watched.failures) == ("one", v1, 1)
    v3 = _publish(store, "three")
    assert watched.refresh() and (watched.value, watched.version) == ("three", v3)


def test_the_background_look_swaps_in_a_newer_version(tmp_path):
    store = ArtifactStore(str(tmp_path))
    _publish(store, "one")
    watched = LatestArtifact(store, "rules", "items", _load(store), check_s=0.05)
    try:
        assert watched.value == "one"
        v2 = _publish(store, "two")
        deadline = time.monotonic() + 30
        while watched.version != v2:
            assert time.monotonic() < deadline, "the newer version was not picked up"
            time.sleep(0.05)
        assert watched.value == "two"
    finally:
        watched.close()


def test_a_first_version_that_fails_to_load_fails_loudly_and_check_s_is_bounded(tmp_path):
    store = ArtifactStore(str(tmp_path))
    _publish(store, "broken")
    with pytest.raises(ValueError, match="rules table"):
        LatestArtifact(store, "rules", "items", _load(store), check_s=0)
    for bad in (-1, 86_401, True, "30"):
        with pytest.raises(ConfigError, match="refresh interval"):
            LatestArtifact(store, "rules", "items", _load(store), check_s=bad)
