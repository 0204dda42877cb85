"""The profiles job end to end: embed a tiny catalogue, build user profiles into Milvus Lite and a Parquet artifact."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from common.encoder import EncoderConfig
from common.errors import ConfigError, NotFoundError
from common.events import EventWeights
from common.profiles import ProfileConfig, mean_profile
from common.vector_store import open_store
from jobs.build_profiles import ProfilesConfig, main, run
from jobs.embed_catalog import EmbedConfig
from jobs.embed_catalog import run as embed
from tests.jobs.test_embed_catalog import tiny_catalog

BASE = "profcat"
USERS = ["u1", "u2", "u3", "u4", "u5"]


def shopper_events(items: pd.DataFrame) -> pd.DataFrame:
    """Five users with a few events each on the catalogue's items, plus four rows that cannot be used."""
    by_cat = items.groupby("category")["item_id"].apply(list)
    cats = sorted(by_cat.index)
    t0 = pd.Timestamp("2024-05-01T10:00:00Z")
    rows = []
    for n, user in enumerate(USERS):
        liked, other = by_cat[cats[n % len(cats)]], by_cat[cats[(n + 3) % len(cats)]]
        plan = [(liked[0], "view"), (liked[0], "purchase"), (liked[1], "wishlist"), (other[0], "view"),
                (other[1], "dislike")] + ([(liked[1], "return")] if n % 2 else [])
        rows += [{"user_id": user, "item_id": item, "event": event, "ts": (t0 + pd.Timedelta(minutes=k)).isoformat()}
                 for k, (item, event) in enumerate(plan)]
    rows += [
        {"user_id": "u1", "item_id": by_cat[cats[0]][0], "event": "teleport", "ts": t0.isoformat()},
        {"user_id": "", "item_id": by_cat[cats[0]][0], "event": "view", "ts": t0.isoformat()},
        {"user_id": "u1", "item_id": "not-in-the-catalogue", "event": "view", "ts": t0.isoformat()},
        {"user_id": "u2", "item_id": by_cat[cats[0]][0], "event": "view", "ts": "not a time"},
    ]
    return pd.DataFrame(rows)


def write_jsonl(df: pd.DataFrame, path) -> str:
    df.to_json(path, orient="records", lines=True)
    return str(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local, store_dir):
    """The tiny catalogue embedded once, then profiles built once for the module."""
    tmp = tmp_path_factory.mktemp("profiles")
    items = tiny_catalog(tmp, per_class=2)
    items.to_parquet(tmp / "catalog.parquet", index=False)
    artifacts = str(tmp / "artifacts")
    embed(EmbedConfig(catalog=str(tmp / "catalog.parquet"), collection=BASE, store_uri=store_dir, batch_size=8,
                      artifacts_uri=artifacts, encoder=EncoderConfig(precision="fp32")))
    events = shopper_events(items)
    cfg = ProfilesConfig(events=write_jsonl(events, tmp / "events.jsonl"), collection=BASE, store_uri=store_dir,
                         artifacts_uri=artifacts)
    return {"tmp": tmp, "cfg": cfg, "events": events, "result": run(cfg)}


def snapshot_vectors(cfg: ProfilesConfig) -> dict[str, np.ndarray]:
    root = f"{cfg.artifacts_uri}/embeddings/{BASE}"
    with open(f"{root}/LATEST") as f:
        snap = pq.read_table(f"{root}/{f.read().strip()}/embeddings.parquet").to_pandas()
    return dict(zip(snap["item_id"], np.stack(snap["fused_vector"].to_numpy()).astype(np.float64)))


def stored(cfg: ProfilesConfig) -> dict[str, dict]:
    store = open_store(cfg.store_uri)
    return {r["item_id"]: r for r in store.get(f"{BASE}_users_fused", USERS, with_vectors=True)}


def test_every_user_gets_one_unit_vector_in_the_store_and_the_parquet(built):
    result = built["result"]
    assert (result.users, result.no_profile, result.collection) == (5, 0, f"{BASE}_users_fused")
    assert open_store(built["cfg"].store_uri).count(result.collection) == 5
    rows = stored(built["cfg"])
    assert sorted(rows) == USERS
    np.testing.assert_allclose([np.linalg.norm(r["vector"]) for r in rows.values()], 1.0, atol=1e-5)
    table = pq.read_table(result.profiles_uri).to_pandas()
    assert sorted(table["user_id"]) == USERS
    np.testing.assert_allclose(np.linalg.norm(np.stack(table["vector"].to_numpy()), axis=1), 1.0, atol=1e-5)


def test_a_stored_profile_is_the_mean_profile_of_the_users_events(built):
    vectors = snapshot_vectors(built["cfg"])
    good = built["events"].iloc[:-4]  # the last four rows are the bad ones
    rows = stored(built["cfg"])
    for user in ("u1", "u2"):  # u2 also returned an item
        mine = good[good["user_id"] == user]
        w = EventWeights().weigh(mine)
        expected = mean_profile(np.stack([vectors[i] for i in mine["item_id"]]), w, ProfileConfig())
        np.testing.assert_allclose(rows[user]["vector"], expected, atol=1e-5)
        assert rows[user]["n_positive"] == int((w > 0).sum())
        assert rows[user]["n_negative"] == int((w < 0).sum())
        assert rows[user]["updated_at"] == pd.Timestamp(mine["ts"].max()).isoformat()


def test_bad_rows_are_quarantined_with_reasons(built):
    result = built["result"]
    assert (result.quarantined, result.events) == (4, len(built["events"]) - 4)
    reasons = pq.read_table(result.quarantine_uri).to_pandas()["reason"].tolist()
    assert sorted(r.split(" '")[0] for r in reasons) == ["bad ts", "missing user_id", "unknown event",
                                                         "unknown item"]


def test_a_rerun_from_the_command_line_gives_the_same_vectors_and_count(built):
    cfg = built["cfg"]
    before = stored(cfg)
    first = pq.read_table(built["result"].profiles_uri).to_pandas()
    assert main(["--events", cfg.events, "--collection", BASE, "--store", cfg.store_uri,
                 "--artifacts", cfg.artifacts_uri]) == 0
    after = stored(cfg)
    assert open_store(cfg.store_uri).count(f"{BASE}_users_fused") == 5
    for user in USERS:
        np.testing.assert_array_equal(after[user]["vector"], before[user]["vector"])
        assert after[user]["updated_at"] == before[user]["updated_at"]
    root = f"{cfg.artifacts_uri}/profiles/{BASE}_users_fused"
    with open(f"{root}/LATEST") as f:
        latest = f.read().strip()
    assert latest != built["result"].version
    again = pq.read_table(f"{root}/{latest}/profiles.parquet").to_pandas()
    np.testing.assert_array_equal(np.stack(again["vector"]), np.stack(first["vector"]))
    manifest = json.loads(open(f"{root}/{latest}/manifest.json").read())
    assert manifest["result"]["users"] == 5 and manifest["profile"] == {"w_pos": 1.0, "w_neg": 0.5}


def test_a_user_who_left_the_events_is_removed_and_weights_change_vectors(built, tmp_path):
    cfg = built["cfg"]
    fewer = write_jsonl(built["events"][built["events"]["user_id"] != "u5"], tmp_path / "fewer.jsonl")
    result = run(ProfilesConfig(**{**cfg.__dict__, "events": fewer, "profile": ProfileConfig(w_neg=0.0)}))
    assert (result.users, result.removed) == (4, 1)
    rows = stored(cfg)
    assert sorted(rows) == USERS[:4]
    vectors = snapshot_vectors(cfg)
    good = built["events"].iloc[:-4]
    mine = good[good["user_id"] == "u1"]
    liked = mine[mine["event"].isin(["view", "purchase", "wishlist"])]  # w_neg = 0: only the liked side
    w = EventWeights().weigh(liked)
    expected = (w[:, None] * np.stack([vectors[i] for i in liked["item_id"]])).sum(0)
    np.testing.assert_allclose(rows["u1"]["vector"], expected / np.linalg.norm(expected), atol=1e-5)
    run(cfg)  # back to the module's state for any later test
    assert open_store(cfg.store_uri).count(f"{BASE}_users_fused") == 5


def test_without_an_embeddings_snapshot_the_error_says_to_run_embed(built, tmp_path):
    cfg = ProfilesConfig(**{**built["cfg"].__dict__, "artifacts_uri": str(tmp_path / "empty")})
    with pytest.raises(NotFoundError, match="vitrine embed"):
        run(cfg)


def test_bad_settings_are_refused_with_the_value_echoed(tmp_path):
    with pytest.raises(ConfigError, match="'bogus'"):
        ProfilesConfig(kind="bogus")
    with pytest.raises(ConfigError, match="-2"):
        main(["--w-neg", "-2", "--artifacts", str(tmp_path)])
    with pytest.raises(ConfigError, match="'1x'"):
        ProfilesConfig(collection="1x")
