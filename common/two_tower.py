"""Two-tower retrieval: a content+id item tower, a history user tower, the training task (loss) and the export.

* Item tower: ``normalize(MLP(content vector) + id_embedding[i])``. The id embedding is used only for items seen
  in training and is dropped for a share of training rows (``id_dropout``), so the content path alone ranks
  well: a new item is served from its content vector (its id embedding is absent).
* User tower: the weighted mean of the item-tower vectors of the user's history (event weights from
  ``Interactions.matrix``; disliked items weigh negative), plus a learned user id embedding and a segment
  embedding when segments exist, through a residual MLP. During training the target item is left out of the
  history (leave-one-out), otherwise the task would be "find an item already in the history".
* Task: in-batch sampled softmax with logQ correction (``logits - log q(item)``, q = the item's share of the
  training pairs) or BCE against uniform random negatives (the source projects' loss). Softmax is the default:
  on ML-100K (temporal 80/20) it scored NDCG@10 0.182 vs 0.164 for BCE, and without logQ it fell from 0.165 to
  0.055 on the validation split (benchmarks/two_tower_quality.py).
* Steps are pure functions of (model, optimiser, batch); a ``Batch`` is built by ``make_batch`` from numpy
  inputs and a seeded generator, so a worker's shard and epoch fully determine its batches.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from common.interactions import TrainData

log = logging.getLogger(__name__)

LOSSES = ("softmax", "bce")
_EXPORT_CHUNK = 4096  # items per item-tower call when exporting
_USER_CHUNK = 512  # users per call when exporting (the batch's dense history is users x distinct items)


@dataclass(frozen=True)
class TwoTowerConfig:
    dim: int = 64  # size of the user and item vectors
    hidden: int = 256  # hidden width of the content MLP and of the user MLP
    id_dropout: float = 0.5  # share of training rows whose item id embedding is dropped (content must suffice)
    user_ids: bool = False  # learn a user id embedding beside the history (it overfitted on ML-100K)
    loss: str = "softmax"  # "softmax" (in-batch, logQ-corrected) or "bce" (random negatives)
    logq: bool = True  # subtract log q(item) from in-batch logits (softmax only)
    temperature: float = 0.1  # logits = cosine / temperature
    negatives: int = 8  # uniform random negatives per positive (bce only)
    epochs: int = 10  # passes over the positive pairs (20 overfitted on ML-100K)
    batch_size: int = 512  # positive pairs per step (per worker under Ray Train)
    lr: float = 2e-3  # Adam learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    seed: int = 0  # seeds the weights, the shuffles, the dropout masks and the negatives
    content_weight: float = 0.0  # weight of the same loss on content-only item vectors (an auxiliary task for
    #                              new items; id_dropout did better alone on the planted cold-start test)
    threads: int = 1  # torch threads while fitting in-process (1 avoids spin-waits on a shared, busy CPU)

    def __post_init__(self) -> None:
        for name in ("dim", "hidden", "epochs", "batch_size", "negatives", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"two-tower {name} must be an integer >= 1. Got {v!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"two-tower loss must be one of {', '.join(LOSSES)}. Got {self.loss!r}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ConfigError(f"two-tower id_dropout must be within [0, 1). Got {self.id_dropout!r}")
        for name in ("temperature", "lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"two-tower {name} must be a positive number. Got {v!r}")
        if not isinstance(self.content_weight, (int, float)) or not 0 <= self.content_weight < math.inf:
            raise ConfigError(f"two-tower content_weight must be a finite number >= 0. Got {self.content_weight!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ConfigError(f"two-tower weight_decay must be >= 0. Got {self.weight_decay!r}")
        if self.batch_size < 2 and self.loss == "softmax":
            raise ConfigError(f"in-batch softmax needs batch_size >= 2. Got {self.batch_size}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, eq=False)
class TowerInputs:
    """Everything the towers read, as numpy arrays aligned to ``Interactions`` (picklable, shipped to workers)."""

    content: np.ndarray | None  # [I, D] float32 content vectors, or None (id-only items: no cold start)
    known: np.ndarray  # [I] bool: items seen in training (only they have an id embedding)
    hist_indptr: np.ndarray  # [U + 1] CSR row pointers of each user's history
    hist_items: np.ndarray  # [nnz] int64 item indices
    hist_weights: np.ndarray  # [nnz] float32 summed event weights (negative = disliked)
    segments: np.ndarray | None  # [U] int64 segment codes, or None
    n_segments: int  # distinct segment codes
    pairs: np.ndarray  # [P, 2] int64 (user, item) positive training pairs
    pair_weights: np.ndarray  # [P] float32 the pair's weight in its user's history (left out when it is the target)
    item_log_q: np.ndarray  # [I] float32 log share of the pairs per item (-inf-free: floor for absent items)

    @property
    def n_users(self) -> int:
        return len(self.hist_indptr) - 1

    @property
    def n_items(self) -> int:
        return len(self.known)

    @property
    def content_dim(self) -> int:
        return 0 if self.content is None else int(self.content.shape[1])


def build_inputs(data: TrainData) -> TowerInputs:
    """TrainData -> TowerInputs (histories from the weight matrix, positives from ``Interactions.positives``)."""
    inter = data.interactions
    m = inter.matrix.tocsr()
    m.eliminate_zeros()
    content = None
    if data.item_vectors is not None:
        content = np.ascontiguousarray(data.item_vectors, dtype=np.float32)
        if content.shape[0] != inter.n_items:
            raise ConfigError(f"item_vectors has {content.shape[0]} rows but the catalogue has {inter.n_items} items")
    pos = inter.positives.tocoo()
    pairs = np.stack([pos.row, pos.col], axis=1).astype(np.int64)
    pair_weights = np.asarray(m[pos.row, pos.col]).ravel().astype(np.float32)
    counts = np.bincount(pos.col, minlength=inter.n_items).astype(np.float64)
    log_q = np.log(np.maximum(counts, 0.5) / max(len(pairs), 1)).astype(np.float32)
    segments, n_segments = None, 0
    if data.segments is not None:
        labels = data.segments.reindex(inter.users).fillna("unknown").astype(str).to_numpy()
        _, codes = np.unique(labels, return_inverse=True)
        segments, n_segments = codes.astype(np.int64), int(codes.max()) + 1
    return TowerInputs(content=content, known=np.asarray(inter.seen.sum(axis=0)).ravel() > 0,
                       hist_indptr=m.indptr.astype(np.int64), hist_items=m.indices.astype(np.int64),
                       hist_weights=m.data.astype(np.float32), segments=segments, n_segments=n_segments,
                       pairs=pairs, pair_weights=pair_weights, item_log_q=log_q)


# ----------------------------------------------------------------------------------------------- towers


class ItemTower(nn.Module):
    """Content MLP plus a learned id embedding; L2-normalised output."""

    def __init__(self, n_items: int, content_dim: int, cfg: TwoTowerConfig):
        super().__init__()
        self.content = (nn.Sequential(nn.Linear(content_dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.dim))
                        if content_dim else None)
        self.ids = nn.Embedding(n_items, cfg.dim)
        # With content the id embedding starts at zero: an unseen item's vector is then exactly its content's.
        nn.init.zeros_(self.ids.weight) if content_dim else nn.init.normal_(self.ids.weight, std=0.1)

    def forward(self, items: torch.Tensor, content: torch.Tensor | None, id_keep: torch.Tensor,
                with_content_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(vectors, the same items' content-only vectors when asked and content exists)."""
        out = self.ids(items) * id_keep[:, None]
        if self.content is None:
            return F.normalize(out, dim=-1), None
        from_content = self.content(content)
        only = F.normalize(from_content, dim=-1) if with_content_only else None
        return F.normalize(out + from_content, dim=-1), only


class UserTower(nn.Module):
    """History mean (+ user id, + segment) through a residual MLP; L2-normalised output."""

    def __init__(self, n_users: int, n_segments: int, cfg: TwoTowerConfig):
        super().__init__()
        self.ids = nn.Embedding(n_users, cfg.dim) if cfg.user_ids else None
        self.segments = nn.Embedding(n_segments, cfg.dim) if n_segments else None
        for emb in (self.ids, self.segments):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.01)
        width = cfg.dim * (1 + (self.ids is not None) + (self.segments is not None))
        self.mlp = nn.Sequential(nn.Linear(width, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.dim))

    def forward(self, history: torch.Tensor, users: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
        parts = [history]
        if self.ids is not None:
            parts.append(self.ids(users))
        if self.segments is not None:
            parts.append(self.segments(segments))
        return F.normalize(history + self.mlp(torch.cat(parts, dim=-1)), dim=-1)


@dataclass(frozen=True, eq=False)
class Batch:
    """One step's tensors. Item-side rows are encoded once (``items``) and referred to by position."""

    items: torch.Tensor  # [n] int64 distinct item indices to encode
    content: torch.Tensor | None  # [n, D] their content vectors
    id_keep: torch.Tensor  # [n] float32 1 = use the id embedding
    users: torch.Tensor  # [B] int64
    segments: torch.Tensor | None  # [B] int64
    history: torch.Tensor  # [B, n] float32 history weights over ``items``, rows divided by their sum of |w|
    target_pos: torch.Tensor  # [B] positions into ``items`` of the positives (or [0] when only users are encoded)
    target_items: torch.Tensor  # [B] int64 absolute item indices of the positives
    target_log_q: torch.Tensor  # [B] float32 log q of the positives
    neg_pos: torch.Tensor | None  # [B, K] positions into ``items`` of random negatives (bce)

    def to(self, device: torch.device | str) -> Batch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


@dataclass(frozen=True, eq=False)
class TowerOutputs:
    """What the task scores: user vectors and their positives' (and negatives') item vectors."""

    users: torch.Tensor  # [B, d]
    positives: torch.Tensor  # [B, d]
    negatives: torch.Tensor | None  # [B, K, d] (bce)
    content_positives: torch.Tensor | None  # [B, d] the positives from content alone (training, with content)
    content_negatives: torch.Tensor | None  # [B, K, d]


class TwoTowerModel(nn.Module):
    """Both towers; ``forward(batch)`` -> TowerOutputs."""

    def __init__(self, n_users: int, n_items: int, content_dim: int, n_segments: int, cfg: TwoTowerConfig):
        super().__init__()
        self.item_tower = ItemTower(n_items, content_dim, cfg)
        self.user_tower = UserTower(n_users, n_segments, cfg)

    @classmethod
    def for_inputs(cls, inputs: TowerInputs, cfg: TwoTowerConfig) -> TwoTowerModel:
        torch.manual_seed(cfg.seed)
        return cls(inputs.n_users, inputs.n_items, inputs.content_dim, inputs.n_segments, cfg)

    def forward(self, batch: Batch) -> TowerOutputs:
        reps, only = self.item_tower(batch.items, batch.content, batch.id_keep, with_content_only=self.training)
        # A dense [B, n] product: on CPU it beats embedding_bag and sparse mm, whose backward passes sort.
        users = self.user_tower(batch.history @ reps, batch.users, batch.segments)
        neg = batch.neg_pos
        return TowerOutputs(users=users, positives=reps[batch.target_pos],
                            negatives=reps[neg] if neg is not None else None,
                            content_positives=only[batch.target_pos] if only is not None else None,
                            content_negatives=only[neg] if only is not None and neg is not None else None)


# ------------------------------------------------------------------------------------------ batches


def make_batch(inputs: TowerInputs, users: np.ndarray, targets: np.ndarray | None, target_weights: np.ndarray | None,
               cfg: TwoTowerConfig, rng: np.random.Generator | None) -> Batch:
    """Tensors for ``users`` (and their positive ``targets``); ``rng`` None = evaluation (no dropout, no negatives)."""
    starts, ends = inputs.hist_indptr[users], inputs.hist_indptr[users + 1]
    lengths = ends - starts
    flat = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    hist_items, hist_w = inputs.hist_items[flat], inputs.hist_weights[flat]
    hist_rows = np.repeat(np.arange(len(users)), lengths)
    neg = None
    parts = [hist_items]
    if targets is not None:
        parts.append(targets)
        if rng is not None and cfg.loss == "bce":
            neg = rng.integers(0, inputs.n_items, size=(len(targets), cfg.negatives))
            parts.append(neg.ravel())
    items, inverse = np.unique(np.concatenate(parts), return_inverse=True)
    split = np.cumsum([len(p) for p in parts])[:-1]
    pos = np.split(inverse, split)
    keep = inputs.known[items].astype(np.float32)
    if rng is not None and cfg.id_dropout > 0 and inputs.content is not None:
        keep *= (rng.random(len(items)) >= cfg.id_dropout).astype(np.float32)
    history = np.zeros((len(users), len(items)), np.float32)
    np.add.at(history, (hist_rows, pos[0]), hist_w)
    if targets is not None and target_weights is not None:  # leave the target out of its user's history
        history[np.arange(len(users)), pos[1]] -= target_weights
    norm = np.abs(history).sum(axis=1, keepdims=True)
    history /= np.maximum(norm, 1e-6)
    t = torch.from_numpy
    return Batch(
        items=t(items.astype(np.int64)),
        content=None if inputs.content is None else t(inputs.content[items]),
        id_keep=t(keep), users=t(users.astype(np.int64)),
        segments=None if inputs.segments is None else t(inputs.segments[users]),
        history=t(history),
        target_pos=t(pos[1].astype(np.int64)) if targets is not None else torch.zeros(0, dtype=torch.int64),
        target_items=t(targets.astype(np.int64)) if targets is not None else torch.zeros(0, dtype=torch.int64),
        target_log_q=t(inputs.item_log_q[targets]) if targets is not None else torch.zeros(0),
        neg_pos=t(pos[2].reshape(neg.shape).astype(np.int64)) if neg is not None else None,
    )


# ------------------------------------------------------------------------------------ training task


def in_batch_softmax_loss(users: torch.Tensor, items: torch.Tensor, item_ids: torch.Tensor,
                          log_q: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Cross-entropy of each user against its own positive, with the other rows' positives as negatives.

    ``logits[b, j] = u_b . v_j / T - log q_j``: popular items are over-represented as in-batch negatives, and the
    correction removes that bias (Yi et al. 2019). Another row holding the same item is not a negative (masked).
    """
    logits = users @ items.T / temperature
    if log_q is not None:
        logits = logits - log_q[None, :]
    same = item_ids[None, :] == item_ids[:, None]
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(users), device=logits.device))


def bce_loss(users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Binary cross-entropy: positives scored 1, random negatives ([B, K, d]) scored 0."""
    pos = (users * positives).sum(-1) / temperature
    neg = torch.einsum("bd,bkd->bk", users, negatives) / temperature
    return (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
            + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg), reduction="sum") / len(pos))


def task_loss(out: TowerOutputs, batch: Batch, cfg: TwoTowerConfig) -> torch.Tensor:
    """The configured loss on the full item vectors, plus ``content_weight`` times the same loss on content-only
    item vectors (so an item without an id embedding, a new one, is still ranked well)."""

    def one(positives: torch.Tensor, negatives: torch.Tensor | None) -> torch.Tensor:
        if cfg.loss == "bce":
            return bce_loss(out.users, positives, negatives, cfg.temperature)
        return in_batch_softmax_loss(out.users, positives, batch.target_items,
                                     batch.target_log_q if cfg.logq else None, cfg.temperature)

    loss = one(out.positives, out.negatives)
    if cfg.content_weight > 0 and out.content_positives is not None:
        loss = loss + cfg.content_weight * one(out.content_positives, out.content_negatives)
    return loss


def make_optimizer(model: nn.Module, cfg: TwoTowerConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, cfg: TwoTowerConfig) -> float:
    """One gradient step on one batch; returns the loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = task_loss(model(batch), batch, cfg)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def epoch_pairs(n_pairs: int, epoch: int, rank: int, world: int, seed: int) -> np.ndarray:
    """This worker's pair indices for ``epoch``: one shared shuffle, then an equal-sized shard per rank (the
    remainder is dropped so every rank runs the same number of steps, which DDP requires)."""
    order = np.random.default_rng([seed, epoch]).permutation(n_pairs)
    per = n_pairs // world
    return order[rank * per:(rank + 1) * per]


def run_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: TowerInputs, cfg: TwoTowerConfig,
              epoch: int, rank: int = 0, world: int = 1, device: torch.device | None = None) -> float:
    """One pass over this rank's shard of the pairs; returns the mean loss."""
    rows = epoch_pairs(len(inputs.pairs), epoch, rank, world, cfg.seed)
    rng = np.random.default_rng([cfg.seed, epoch, rank, 1])
    losses = []
    for start in range(0, len(rows) - 1, cfg.batch_size):
        chunk = rows[start:start + cfg.batch_size]
        if len(chunk) < 2 and cfg.loss == "softmax":
            break
        pairs = inputs.pairs[chunk]
        batch = make_batch(inputs, pairs[:, 0], pairs[:, 1], inputs.pair_weights[chunk], cfg, rng)
        if device is not None and device.type != "cpu":
            batch = batch.to(device)
        losses.append(train_step(model, optimizer, batch, cfg))
    return float(np.mean(losses)) if losses else float("nan")


# ------------------------------------------------------------------------------------------- export


@torch.no_grad()
def export_item_vectors(model: TwoTowerModel, inputs: TowerInputs) -> np.ndarray:
    """[I, d] float32 L2-normalised item vectors; unseen items from content alone."""
    model.eval()
    out = []
    for start in range(0, inputs.n_items, _EXPORT_CHUNK):
        idx = np.arange(start, min(start + _EXPORT_CHUNK, inputs.n_items))
        content = None if inputs.content is None else torch.from_numpy(inputs.content[idx])
        out.append(model.item_tower(torch.from_numpy(idx), content,
                                    torch.from_numpy(inputs.known[idx].astype(np.float32)))[0])
    return torch.cat(out).numpy().astype(np.float32)


@torch.no_grad()
def export_user_vectors(model: TwoTowerModel, inputs: TowerInputs, users: np.ndarray | None = None) -> np.ndarray:
    """[U, d] float32 L2-normalised user vectors from each user's whole history."""
    model.eval()
    users = np.arange(inputs.n_users) if users is None else np.asarray(users, dtype=np.int64)
    out = []
    for start in range(0, len(users), _USER_CHUNK):
        batch = make_batch(inputs, users[start:start + _USER_CHUNK], None, None, TwoTowerConfig(), None)
        out.append(model(batch).users)
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, model.item_tower.ids.embedding_dim),
                                                                            np.float32)


# ------------------------------------------------------------------------------------- recommender


class TwoTowerRecommender:
    """The Recommender protocol over a two-tower model trained in this process (tests, evaluation)."""

    def __init__(self, cfg: TwoTowerConfig | None = None):
        self.cfg = cfg or TwoTowerConfig()
        self.name = f"two-tower-{self.cfg.loss}"
        self.losses: list[float] = []

    def fit(self, data: TrainData) -> TwoTowerRecommender:
        if data.item_vectors is None:
            log.warning("two-tower without item content vectors: id embeddings only, no cold-start items")
        self.inputs = build_inputs(data)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.cfg.threads)
        try:
            self.model = TwoTowerModel.for_inputs(self.inputs, self.cfg)
            optimizer = make_optimizer(self.model, self.cfg)
            self.losses = [run_epoch(self.model, optimizer, self.inputs, self.cfg, e) for e in range(self.cfg.epochs)]
            self.item_vectors = export_item_vectors(self.model, self.inputs)
            self.user_vectors = export_user_vectors(self.model, self.inputs)
        finally:
            torch.set_num_threads(threads)
        log.info("two-tower (%s) trained %d epochs, last loss %.4f", self.cfg.loss, self.cfg.epochs, self.losses[-1])
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return (self.user_vectors[np.asarray(users)] @ self.item_vectors.T).astype(np.float32)
