"""Batch job: every user's mean profile (common.profiles) from the events and the embed job's item vectors.

Reads the events file (invalid rows and events on items missing from the snapshot are quarantined with a reason)
and one kind of item vectors (default ``fused``) from the latest published embeddings snapshot of a catalogue;
upserts one unit vector per user into the Milvus collection ``<catalogue>_users_<kind>`` (primary key
``item_id`` holds the user id; scalar fields ``n_positive``, ``n_negative`` and ``updated_at``, the time of the
user's latest event, so a rerun on the same events writes the same rows); users no longer in the events are
removed; then writes ``profiles/<catalogue>_users_<kind>/<version>/profiles.parquet`` and moves ``LATEST`` to it
only when everything succeeded.

Plain pandas + numpy, no Ray: the per-user computation is two sparse matrix products over the events (500 users
and 37k events take milliseconds; 10M events fit one machine's memory too), so Ray's start-up would cost more
than the work. Beyond one machine, the same ``mean_profiles`` would run per user-id range in Ray Data
``map_batches`` over events pre-grouped by user.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from common.artifacts import ArtifactStore
from common.config import default_artifacts_uri, default_events, default_store_uri, from_mapping, values_from_args
from common.errors import ConfigError
from common.events import EventWeights, load_events
from common.item_index import VECTOR_COLUMNS, VECTOR_KINDS, check_base_name
from common.item_table import read_snapshot
from common.profiles import ProfileConfig, mean_profiles
from common.vector_store import CollectionSpec, open_store

log = logging.getLogger(__name__)

KIND = "profiles"  # artifact kind
EMBEDDINGS = "embeddings"  # the embed job's artifact kind
USER_FIELDS = {"n_positive": "int", "n_negative": "int", "updated_at": "str"}


def users_collection(base: str, kind: str) -> str:
    """The collection (and artifact name) holding the user profiles built on ``kind`` vectors of catalogue ``base``."""
    if kind not in VECTOR_KINDS:
        raise ConfigError(f"vector kind must be one of {', '.join(VECTOR_KINDS)}. Got {kind!r}")
    return f"{check_base_name(base)}_users_{kind}"


@dataclass(frozen=True)
class ProfilesConfig:
    events: str = field(default_factory=default_events)  # events file (Parquet, CSV, JSON Lines); path or URI
    collection: str = "items"  # catalogue name: reads embeddings/<collection>, writes <collection>_users_<kind>
    kind: str = "fused"  # which item vectors the profiles live beside (one of VECTOR_KINDS)
    store_uri: str = field(default_factory=default_store_uri)  # a folder (embedded Milvus Lite) or http://host:19530
    artifacts_uri: str = field(default_factory=default_artifacts_uri)  # embeddings are read, profiles written here
    profile: ProfileConfig = field(default_factory=ProfileConfig)  # w_pos, w_neg
    weights: EventWeights = field(default_factory=EventWeights)  # event/button -> weight (negative = dislike)
    prune: bool = True  # remove users that no longer have a profile from the collection

    def __post_init__(self) -> None:
        users_collection(self.collection, self.kind)  # validates both
        if not isinstance(self.profile, ProfileConfig):
            raise ConfigError(f"profile must be a ProfileConfig. Got {self.profile!r}")
        if not isinstance(self.weights, EventWeights):
            raise ConfigError(f"weights must be EventWeights. Got {self.weights!r}")


@dataclass(frozen=True)
class ProfilesResult:
    collection: str  # the user collection written
    version: str  # artifact version written (profiles/<collection>/<version>)
    embeddings_version: str  # the item vectors' snapshot version that was read
    users: int  # users with a profile, now in the collection
    no_profile: int  # users whose events carry no taste (zero weights, or likes and dislikes cancelling)
    removed: int  # users removed from the collection (no longer in the events)
    events: int  # valid events used
    quarantined: int  # event rows quarantined
    seconds: float
    profiles_uri: str
    quarantine_uri: str | None

    def summary(self) -> str:
        return (f"profiles {self.collection}: users={self.users} no_profile={self.no_profile} "
                f"removed={self.removed} events={self.events} quarantined={self.quarantined} "
                f"seconds={self.seconds:.1f}")


@dataclass(frozen=True, eq=False)
class ItemSnapshot:
    """One kind of item vectors from a published embeddings version."""

    version: str
    model: str  # encoder identity recorded by the embed job
    item_ids: np.ndarray  # [I] str
    vectors: np.ndarray  # [I, D] float32


def read_item_vectors(artifacts: ArtifactStore, base: str, kind: str) -> ItemSnapshot:
    """The latest embeddings snapshot of catalogue ``base``; NotFoundError telling to run ``vitrine embed`` first."""
    manifest, table = read_snapshot(artifacts, base, ["item_id", VECTOR_COLUMNS[kind]])
    version = manifest["result"]["version"]
    vectors = np.asarray(table.column(VECTOR_COLUMNS[kind]).to_pylist(), dtype=np.float32)
    return ItemSnapshot(version=version, model=manifest["encoder_identity"],
                        item_ids=np.asarray(table.column("item_id").to_pylist(), dtype=object), vectors=vectors)


def _write_parquet(table: pa.Table, uri: str) -> None:
    fs, path = url_to_fs(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def compute_profiles(events: pd.DataFrame, items: ItemSnapshot, cfg: ProfilesConfig) -> pd.DataFrame:
    """One row per user with a profile: user_id, vector, n_positive, n_negative, updated_at (sorted by user)."""
    users = np.asarray(sorted(events["user_id"].unique()), dtype=object)
    u = pd.Index(users).get_indexer(events["user_id"])
    i = pd.Index(items.item_ids).get_indexer(events["item_id"])  # every valid event's item is known
    p = mean_profiles(u, i, cfg.weights.weigh(events), items.vectors, len(users), cfg.profile)
    last = events.groupby("user_id")["ts"].max().reindex(users)
    frame = pd.DataFrame({"user_id": users, "vector": list(p.vectors), "n_positive": p.n_positive,
                          "n_negative": p.n_negative,
                          "updated_at": last.map(lambda t: t.isoformat()).to_numpy()})
    return frame[p.ok].reset_index(drop=True)


def _profiles_table(profiles: pd.DataFrame) -> pa.Table:
    return pa.table({
        "user_id": pa.array(profiles["user_id"].tolist(), pa.string()),
        "vector": pa.array(list(profiles["vector"]), pa.list_(pa.float32())),
        "n_positive": pa.array(profiles["n_positive"].to_numpy(np.int64)),
        "n_negative": pa.array(profiles["n_negative"].to_numpy(np.int64)),
        "updated_at": pa.array(profiles["updated_at"].tolist(), pa.string()),
    })


def run(cfg: ProfilesConfig) -> ProfilesResult:
    """Build every user's profile and publish a new profiles version."""
    t0 = time.perf_counter()
    artifacts = ArtifactStore(cfg.artifacts_uri)
    items = read_item_vectors(artifacts, cfg.collection, cfg.kind)
    checked = load_events(cfg.events, known_items=set(items.item_ids))
    log.info("events %s: %s", cfg.events, checked.summary())
    profiles = compute_profiles(checked.valid, items, cfg)
    n_users = checked.valid["user_id"].nunique()

    name = users_collection(cfg.collection, cfg.kind)
    version = artifacts.new_version(KIND, name)
    profiles_uri = artifacts.path(KIND, name, version, "profiles.parquet")
    _write_parquet(_profiles_table(profiles), profiles_uri)
    quarantine_uri = None
    if len(checked.quarantine):
        quarantine_uri = artifacts.path(KIND, name, version, "quarantine", "rows.parquet")
        _write_parquet(pa.Table.from_pandas(checked.quarantine.astype({c: "string" for c in checked.quarantine
                                                                       if c != "reason"}), preserve_index=False),
                       quarantine_uri)

    with open_store(cfg.store_uri) as store:
        store.ensure_collection(CollectionSpec(name=name, dim=int(items.vectors.shape[1]), model=items.model,
                                               fields=dict(USER_FIELDS)))
        rows = [{"item_id": r.user_id, "vector": r.vector, "n_positive": int(r.n_positive),
                 "n_negative": int(r.n_negative), "updated_at": r.updated_at} for r in profiles.itertuples()]
        for start in range(0, len(rows), 1000):
            store.upsert(name, rows[start:start + 1000])
        removed = 0
        if cfg.prune:
            keep = set(profiles["user_id"])
            stale = [r["item_id"] for page in store.scan(name, []) for r in page if r["item_id"] not in keep]
            removed = store.delete(name, stale) if stale else 0
        store.flush(name)

    result = ProfilesResult(collection=name, version=version, embeddings_version=items.version,
                            users=len(profiles), no_profile=n_users - len(profiles), removed=removed,
                            events=len(checked.valid), quarantined=len(checked.quarantine),
                            seconds=time.perf_counter() - t0, profiles_uri=profiles_uri,
                            quarantine_uri=quarantine_uri)
    artifacts.publish(KIND, name, version, {
        "result": dataclasses.asdict(result),
        "events": cfg.events,
        "profile": dataclasses.asdict(cfg.profile),
        "weights": {"events": dict(cfg.weights.events), "buttons": dict(cfg.weights.buttons),
                    "rating_center": cfg.weights.rating_center},
        "kind": cfg.kind,
        "encoder_identity": items.model,
        "store_uri": cfg.store_uri,
    })
    return result


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="vitrine profiles", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file with ProfilesConfig settings (flags override it)")
    p.add_argument("--events", help="events file (Parquet, CSV, JSON Lines); default: the shipped sample's")
    p.add_argument("--collection", help="catalogue name (default: items)")
    p.add_argument("--store", dest="store_uri",
                   help="vector store: a folder (embedded Milvus Lite) or http://host:19530")
    p.add_argument("--artifacts", dest="artifacts_uri", help="artifact store folder or URI")
    p.add_argument("--kind", choices=VECTOR_KINDS, help="item vectors to build on (default: fused)")
    p.add_argument("--w-pos", type=float, help="weight of the liked side (default 1.0)")
    p.add_argument("--w-neg", type=float, help="weight of the disliked side (default 0.5)")
    p.add_argument("--no-prune", dest="prune", action="store_false", default=None,
                   help="keep users that are no longer in the events")
    return p


def config_from_args(args: argparse.Namespace) -> ProfilesConfig:
    values = values_from_args(args, ("events", "collection", "store_uri", "artifacts_uri", "kind", "prune"),
                              {"profile": ("w_pos", "w_neg")}, uris=("store_uri", "artifacts_uri", "events"))
    return from_mapping(ProfilesConfig, values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(config_from_args(args))
    print(result.summary())
    return 0
