"""One kind of item vectors and the items' ranking fields from the embed job's latest snapshot, held in memory.

Serving reads item vectors on every request (the seeds of item-to-item retrieval, diversity, the user-item
feature); fetching them from Milvus costs a round trip and pymilvus turns each float into a Python object
(150 candidates x 384 floats per request). The snapshot is the same vectors the store holds, written by the same
job run, so a replica loads it at start and again for each newer snapshot (``watch_snapshots``; ~1.5 KB an item
at 384-d). Prices and stock, which change without
re-embedding, are not served from here: they come fresh from the store with every search.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from common.artifacts import ArtifactStore, LatestArtifact
from common.errors import NotFoundError
from common.item_index import VECTOR_COLUMNS

RANKING_FIELDS = ("category", "brand", "price")  # what user affinities and price features read


def read_snapshot(artifacts: ArtifactStore, collection: str, columns: list[str],
                  version: str | None = None) -> tuple[dict, pa.Table]:
    """The embed job's latest published snapshot of ``collection`` (or ``version``): its manifest and the asked
    ``columns``; NotFoundError telling to run ``vitrine embed`` first."""
    try:
        manifest = artifacts.manifest("embeddings", collection, version)
    except NotFoundError as e:
        raise NotFoundError(f"no embeddings snapshot for catalogue {collection!r} under {artifacts.root}: "
                            f"run `vitrine embed --collection {collection}` first") from e
    fs, path = url_to_fs(artifacts.path("embeddings", collection, manifest["result"]["version"],
                                        "embeddings.parquet"))
    with fs.open(path, "rb") as f:
        return manifest, pq.read_table(f, columns=columns)


@dataclass(frozen=True, eq=False)
class ItemTable:
    version: str  # the embeddings snapshot version
    model: str  # encoder identity of the vectors
    ids: np.ndarray  # [N] item ids
    vectors: np.ndarray  # [N, D] float32, unit
    index: Mapping[str, int]  # item id -> row
    fields: Mapping[str, Mapping]  # item id -> {category, brand, price}

    @classmethod
    def load(cls, artifacts_uri: str, collection: str, kind: str = "fused", version: str | None = None) -> ItemTable:
        """The latest snapshot (or ``version``) of the catalogue's ``kind`` vectors and ranking fields."""
        manifest, table = read_snapshot(ArtifactStore(artifacts_uri), collection,
                                        ["item_id", *RANKING_FIELDS, VECTOR_COLUMNS[kind]], version)
        version = manifest["result"]["version"]
        ids = np.asarray(table.column("item_id").to_pylist(), dtype=object)
        column = table.column(VECTOR_COLUMNS[kind]).combine_chunks()
        vectors = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        vectors = vectors.reshape(len(ids), -1) if len(ids) else np.zeros((0, 0), np.float32)
        columns = {name: table.column(name).to_pylist() for name in RANKING_FIELDS}
        fields = {i: {name: columns[name][r] for name in RANKING_FIELDS} for r, i in enumerate(ids)}
        return cls(version=version, model=manifest["encoder_identity"], ids=ids, vectors=vectors,
                   index={i: r for r, i in enumerate(ids)}, fields=fields)

    def vector(self, item_id: str) -> np.ndarray | None:
        row = self.index.get(item_id)
        return None if row is None else self.vectors[row]

    def lookup(self, ids: Iterable[str]) -> tuple[list[str], np.ndarray]:
        """The ids present in the table (in order) and their vectors."""
        found = [i for i in ids if i in self.index]
        rows = np.fromiter((self.index[i] for i in found), dtype=np.int64, count=len(found))
        return found, self.vectors[rows]


def watch_snapshots(artifacts_uri: str, collection: str, kind: str, check_s: float) -> LatestArtifact[ItemTable]:
    """The catalogue's item table, swapped for each newer snapshot the embed job publishes (new and changed items
    reach a running service); a snapshot of another encoder is refused (its vectors live in another space than
    the sessions and profiles already stored): that needs a restart. NotFoundError when nothing was embedded."""
    artifacts = ArtifactStore(artifacts_uri)
    current: list[ItemTable] = []

    def load(version: str) -> ItemTable:
        table = ItemTable.load(artifacts_uri, collection, kind, version)
        if current and table.model != current[0].model:
            raise ValueError(f"snapshot {version} was embedded by {table.model}, the service serves "
                             f"{current[0].model}: restart the service to change the encoder")
        current[:] = [table]
        return table

    tables = LatestArtifact(artifacts, "embeddings", collection, load, check_s)
    if tables.value is None:
        read_snapshot(artifacts, collection, ["item_id"])  # raises the NotFoundError that names the fix
    return tables
