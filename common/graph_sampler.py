"""The user-item bipartite graph and uniform fan-out neighbour sampling of mini-batch subgraphs for GraphSAGE.

Node layout: users first (``0 .. n_users-1``), then items (``n_users + i``). Edges are the positive interactions,
stored once per direction in a CSR adjacency, so a user's neighbours are items and an item's are users.

``sample_subgraph`` is hand-written (numpy only) because PyG's ``NeighborLoader``/``LinkNeighborLoader`` need the
compiled ``pyg-lib`` or ``torch-sparse`` packages, which do not install here (pyg-lib is not on the package index,
torch-sparse builds from source for ~12 minutes). When either is importable, ``make_sampler`` returns PyG's
``NeighborLoader``-backed sampler instead; both produce the same ``Subgraph`` contract.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from common.errors import ConfigError
from common.interactions import Interactions

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class BipartiteGraph:
    """Users and items as nodes of one graph, content features on both, and a symmetric CSR adjacency."""

    n_users: int
    n_items: int
    user_features: np.ndarray  # [U, D] float32: the mean of the user's liked items' features (zeros if none)
    item_features: np.ndarray  # [I, D] float32: content vectors (text/image tower)
    indptr: np.ndarray  # [N + 1] int64 CSR row pointers over N = U + I nodes
    indices: np.ndarray  # [E] int64 neighbour node ids (both directions of every positive edge)

    def __post_init__(self) -> None:
        if self.user_features.shape != (self.n_users, self.dim) or self.item_features.shape[0] != self.n_items:
            raise ConfigError(f"feature shapes {self.user_features.shape}, {self.item_features.shape} do not match "
                              f"{self.n_users} users and {self.n_items} items")
        if len(self.indptr) != self.n_nodes + 1:
            raise ConfigError(f"indptr has {len(self.indptr)} entries; {self.n_nodes + 1} expected")

    @property
    def dim(self) -> int:
        return int(self.item_features.shape[1])

    @property
    def n_nodes(self) -> int:
        return self.n_users + self.n_items

    @property
    def degree(self) -> np.ndarray:
        return np.diff(self.indptr)

    def features(self) -> np.ndarray:
        """[N, D] node features in node order (users, then items)."""
        return np.concatenate([self.user_features, self.item_features]).astype(np.float32, copy=False)

    def is_item(self) -> np.ndarray:
        """[N] bool node type."""
        return np.arange(self.n_nodes) >= self.n_users

    def edge_index(self) -> torch.Tensor:
        """[2, E] (source = neighbour, target = node) over the whole graph, for full-neighbourhood inference."""
        targets = np.repeat(np.arange(self.n_nodes, dtype=np.int64), self.degree)
        return torch.from_numpy(np.stack([self.indices, targets]))

    def user_item_edges(self) -> np.ndarray:
        """[E/2, 2] (user row, item column) of every positive edge."""
        u = np.repeat(np.arange(self.n_users, dtype=np.int64), self.degree[:self.n_users])
        i = self.indices[:self.indptr[self.n_users]] - self.n_users
        return np.stack([u, i], axis=1)

    @classmethod
    def build(cls, positives: sp.spmatrix, item_features: np.ndarray) -> BipartiteGraph:
        """From a [U, I] matrix (nonzero = edge) and [I, D] item features."""
        x = sp.csr_matrix(positives, dtype=np.float32)
        x.data[:] = 1.0
        x.eliminate_zeros()
        n_users, n_items = x.shape
        item_features = np.asarray(item_features, dtype=np.float32)
        if item_features.ndim != 2 or item_features.shape[0] != n_items:
            raise ConfigError(f"item features must be [{n_items}, D]. Got {item_features.shape}")
        counts = np.asarray(x.sum(axis=1)).ravel()
        user_features = np.asarray(x @ item_features) / np.maximum(counts, 1.0)[:, None]
        adj = sp.bmat([[None, x], [x.T, None]], format="csr")
        adj.sort_indices()
        return cls(n_users, n_items, user_features.astype(np.float32), item_features,
                   adj.indptr.astype(np.int64), adj.indices.astype(np.int64))

    @classmethod
    def from_interactions(cls, interactions: Interactions, item_vectors: np.ndarray) -> BipartiteGraph:
        """Positive interactions (summed weight > 0) as edges."""
        return cls.build(interactions.positives, item_vectors)

    def with_new_nodes(self, new_item_features: np.ndarray | None = None,
                       new_user_items: Sequence[Sequence[int]] = ()) -> BipartiteGraph:
        """Inductive extension: new items (content only, no edges yet) appended after the known items, and new
        users (one list of item columns each, known or new items) appended after the known users."""
        d = self.dim
        new_items = np.zeros((0, d), np.float32) if new_item_features is None else np.asarray(new_item_features,
                                                                                              np.float32)
        n_items = self.n_items + len(new_items)
        old = self.user_item_edges()
        rows = [old[:, 0]] + [np.full(len(items), self.n_users + k) for k, items in enumerate(new_user_items)]
        cols = [old[:, 1]] + [np.asarray(items, np.int64) for items in new_user_items]
        rows, cols = np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)
        if len(cols) and (cols.min() < 0 or cols.max() >= n_items):
            raise ConfigError(f"new users' items must be item columns in [0, {n_items}). Got {cols.min()}..{cols.max()}")
        x = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                          shape=(self.n_users + len(new_user_items), n_items))
        return BipartiteGraph.build(x, np.concatenate([self.item_features, new_items]))


@dataclass(frozen=True, eq=False)
class Subgraph:
    """A sampled computation graph: ``nodes[:n_seeds]`` are the unique seeds (first-occurrence order)."""

    nodes: np.ndarray  # [n] int64 global node ids; seeds first
    edge_index: torch.Tensor  # [2, e] int64 local (source = sampled neighbour, target = node it was sampled for)
    n_seeds: int  # unique seeds at the front of ``nodes``
    seed_index: np.ndarray  # [len(seeds)] local position of each requested seed (duplicates share one node)


def drop_edges(sub: Subgraph, pairs: np.ndarray) -> Subgraph:
    """``sub`` without the edges (either direction) between the global node pairs ``pairs`` [P, 2]: a batch's
    supervision edges, so the model cannot score a link by seeing it in the message-passing graph."""
    if len(pairs) == 0 or sub.edge_index.shape[1] == 0:
        return sub
    src, dst = sub.nodes[sub.edge_index[0].numpy()], sub.nodes[sub.edge_index[1].numpy()]
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    n = int(max(sub.nodes.max(), pairs.max())) + 1
    banned = np.minimum(pairs[:, 0], pairs[:, 1]) * n + np.maximum(pairs[:, 0], pairs[:, 1])
    keep = ~np.isin(lo * n + hi, banned)
    return Subgraph(sub.nodes, sub.edge_index[:, torch.from_numpy(keep)], sub.n_seeds, sub.seed_index)


def _sample_neighbours(graph: BipartiteGraph, targets: np.ndarray, fanout: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``fanout`` distinct neighbours per target, uniformly without replacement (all when ``fanout < 0`` or
    the degree is smaller). Returns (source node ids, target node ids), one pair per sampled edge."""
    start, deg = graph.indptr[targets], graph.degree[targets]
    owner = np.repeat(np.arange(len(targets)), deg)
    offset = np.arange(deg.sum()) - np.repeat(np.cumsum(deg) - deg, deg)
    if fanout >= 0:
        # Random keys, then the `fanout` smallest within each target: a uniform subset without replacement.
        keys = rng.random(len(owner))
        order = np.lexsort((keys, owner))
        rank = np.empty(len(order), np.int64)
        rank[order] = offset  # offsets run 0..deg-1 within each owner, and `order` keeps owners grouped in order
        keep = rank < fanout
        owner, offset = owner[keep], offset[keep]
    return graph.indices[start[owner] + offset], targets[owner]


def sample_subgraph(graph: BipartiteGraph, seeds: np.ndarray, fanouts: Sequence[int],
                    rng: np.random.Generator) -> Subgraph:
    """Hop-by-hop uniform fan-out sampling around ``seeds`` (global node ids), one hop per GNN layer.

    Hop ``h`` samples ``fanouts[h]`` neighbours for every node first reached at hop ``h - 1``, so each node's
    neighbours are drawn once and a seed's L-layer receptive field is covered, as PyG's NeighborLoader does.
    """
    seeds = np.asarray(seeds, np.int64)
    uniq, first = np.unique(seeds, return_index=True)
    ordered = uniq[np.argsort(first)]  # unique seeds in first-occurrence order
    local = np.full(graph.n_nodes, -1, np.int64)  # global id -> local position (-1: not in the subgraph yet)
    local[ordered] = np.arange(len(ordered))
    parts, frontier, n = [ordered], ordered, len(ordered)
    src_all, dst_all = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for fanout in fanouts:
        src, dst = _sample_neighbours(graph, frontier, fanout, rng)
        candidates = np.unique(src)
        frontier = candidates[local[candidates] < 0]
        local[frontier] = n + np.arange(len(frontier))
        n += len(frontier)
        parts.append(frontier)
        src_all.append(src)
        dst_all.append(dst)
    edges = np.stack([local[np.concatenate(src_all)], local[np.concatenate(dst_all)]])
    return Subgraph(np.concatenate(parts), torch.from_numpy(edges), len(ordered), local[seeds])


def pyg_sampling_available() -> bool:
    """Whether PyG's compiled neighbour samplers (pyg-lib or torch-sparse) are importable."""
    try:
        import torch_geometric.typing as pyg_typing
    except ImportError:
        return False
    return bool(getattr(pyg_typing, "WITH_PYG_LIB", False) or getattr(pyg_typing, "WITH_TORCH_SPARSE", False))


def pyg_sample_subgraph(graph: BipartiteGraph, seeds: np.ndarray, fanouts: Sequence[int],
                        rng: np.random.Generator) -> Subgraph:
    """The same contract through PyG's ``NeighborLoader`` (needs pyg-lib or torch-sparse; its own RNG is torch's,
    seeded from ``rng``). Its batches put the seed nodes first, as ``Subgraph`` requires."""
    from torch_geometric.data import Data
    from torch_geometric.loader import NeighborLoader

    seeds = np.asarray(seeds, np.int64)
    uniq, first = np.unique(seeds, return_index=True)
    ordered = uniq[np.argsort(first)]
    torch.manual_seed(int(rng.integers(2**31)))
    data = Data(edge_index=graph.edge_index(), num_nodes=graph.n_nodes)
    loader = NeighborLoader(data, num_neighbors=list(fanouts), input_nodes=torch.from_numpy(ordered),
                            batch_size=len(ordered), shuffle=False)
    batch = next(iter(loader))
    nodes = batch.n_id.numpy().astype(np.int64)
    position = {int(n): k for k, n in enumerate(nodes)}
    seed_index = np.asarray([position[int(s)] for s in seeds], np.int64)
    return Subgraph(nodes, batch.edge_index.long(), len(ordered), seed_index)


SamplerFn = Callable[[BipartiteGraph, np.ndarray, Sequence[int], np.random.Generator], Subgraph]


def make_sampler(prefer: str = "auto") -> SamplerFn:
    """``"auto"``: PyG's sampler when its compiled backend is importable, else the hand-written one;
    ``"numpy"``: always the hand-written one; ``"pyg"``: PyG or an error."""
    if prefer not in ("auto", "numpy", "pyg"):
        raise ConfigError(f"sampler must be one of auto, numpy, pyg. Got {prefer!r}")
    if prefer == "numpy" or (prefer == "auto" and not pyg_sampling_available()):
        return sample_subgraph
    if not pyg_sampling_available():
        raise ConfigError("sampler='pyg' needs pyg-lib or torch-sparse installed; use sampler='numpy' or 'auto'")
    return pyg_sample_subgraph
