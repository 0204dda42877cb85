"""BusinessFilter deployment: the shop's rules (stock, seen items, price band, categories, caps, pinned and
boosted items) applied last, and pushed down into retrieval as a Milvus filter where they can be.

The rules are the deployment's ``user_config``: ``serve deploy`` / ``serve.run`` with new rules calls
``reconfigure`` on the running replicas, so they change without a redeploy.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from ray import serve

from common.business_rules import BusinessRules, apply_rules
from serve.messages import Ranking, load_in_replica

log = logging.getLogger(__name__)


@serve.deployment
class BusinessFilter:
    def __init__(self) -> None:
        load_in_replica(self)
        self.rules = BusinessRules()

    def reconfigure(self, config: Mapping[str, Any] | None) -> None:
        """New rules from ``user_config`` (validated: a bad config fails the update and keeps the old rules)."""
        self.rules = BusinessRules.from_mapping(config or {})
        log.info("business rules: %s", self.rules)

    def current(self) -> BusinessRules:
        return self.rules

    def replica(self) -> str:
        """This replica's id (a reconfigure keeps it; a restart would not)."""
        return serve.get_replica_context().replica_id.unique_id

    def effective(self, overrides: Mapping[str, Any] | None = None) -> BusinessRules:
        """The configured rules narrowed by one request's parameters."""
        return self.rules.merged(overrides or {}) if overrides else self.rules

    def apply(self, ranking: Ranking, k: int, overrides: Mapping[str, Any] | None = None,
              use_pinned: bool = False) -> Ranking:
        """The ``k`` results the rules allow, pinned items first (only where ``use_pinned``)."""
        rules = self.effective(overrides)
        if not use_pinned and rules.pinned:
            rules = dataclasses.replace(rules, pinned=())
        kept = apply_rules(ranking.items, rules, k, seen=ranking.seen, pinned_fields=ranking.pinned_fields)
        return dataclasses.replace(ranking, items=kept, seen=[], pinned_fields={})
