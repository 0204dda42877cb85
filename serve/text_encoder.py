"""TextEncoder deployment: the catalogue's text tower, batching concurrent queries into one forward pass.

It loads the encoder the embed job recorded in the catalogue's embeddings manifest, so query vectors live in the
same space as the stored item vectors; it takes a GPU when the cluster has one (see ``serve.app``).
"""
from __future__ import annotations

import logging

import numpy as np
from ray import serve

from common.artifacts import ArtifactStore
from common.config import from_mapping
from common.errors import ConfigError
from serve.config import ServeConfig
from serve.messages import load_in_replica

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 512  # longer queries are refused (the text tower reads a few dozen tokens anyway)


@serve.deployment
class TextEncoder:
    def __init__(self, cfg: ServeConfig) -> None:
        load_in_replica(self)
        from common.encoder import EncoderConfig, ItemEncoder

        manifest = ArtifactStore(cfg.artifacts_uri).manifest("embeddings", cfg.collection)
        self.encoder = ItemEncoder(from_mapping(EncoderConfig, manifest["encoder"]))
        self.identity = self.encoder.identity
        if manifest.get("encoder_identity") and manifest["encoder_identity"] != self.identity:
            raise ConfigError(f"the catalogue was embedded with {manifest['encoder_identity']}, "
                              f"but the text encoder loaded {self.identity}")
        self.encoder.warm_up()  # convert the tower now, not at the first search (and run queries on it)
        log.info("text encoder ready: %s, plan %s", self.identity, self.encoder.text_plan)

    def ready(self) -> dict[str, str]:
        return {"model": self.identity, "plan": self.encoder.text_plan}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _encode(self, queries: list[str]) -> list[np.ndarray]:
        return list(self.encoder.encode_texts(queries))

    async def encode(self, query: str) -> np.ndarray:
        """One query -> its unit vector in the catalogue's text space (batched with concurrent calls)."""
        query = (query or "").strip()
        if not query:
            raise ConfigError("the search query is empty")
        if len(query) > MAX_QUERY_CHARS:
            raise ConfigError(f"the search query is longer than {MAX_QUERY_CHARS} characters")
        return await self._encode(query)
