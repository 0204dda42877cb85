"""What the stages pass each other: the retriever's candidates and the reranker's ranking (plain dataclasses that
Ray pickles between replicas)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from common.business_rules import Ranked
from common.ranking import Candidate, ItemStats, UserContext


@dataclass
class Retrieval:
    """What the retriever found for one request (candidates carry fields, not vectors: the reranker holds the
    same vector table)."""

    strategy: str  # personal | session | popular | similar | bought_together | search
    candidates: list[Candidate]
    seen: list[str] = field(default_factory=list)  # items the user already interacted with (for the filter)
    context: UserContext = field(default_factory=UserContext)  # affinities and profile (ranking features)
    segment: str | None = None
    pinned_fields: dict[str, dict] = field(default_factory=dict)  # fields of pinned items (the filter places them)
    stats: ItemStats | None = None  # the candidates' popularity and recency (ranking features; personal strategies)


@dataclass
class Ranking:
    """The reranker's answer: every candidate best first, with what the business filter needs besides."""

    strategy: str  # as the retrieval's
    items: list[Ranked]  # best first; the business filter keeps k of them
    seen: list[str] = field(default_factory=list)  # the retrieval's seen items (excluded by the filter)
    segment: str | None = None
    pinned_fields: dict[str, dict] = field(default_factory=dict)  # the retrieval's pinned items' fields


def load_in_replica(deployment: object) -> None:
    """Import the module of ``deployment``'s class, with all it imports, in a Serve replica as it starts.

    A deployment's class travels to its replicas by value (the decorator leaves its module holding the Deployment,
    not the class), so the module's own imports never run there: the first request carrying a Retrieval or a
    Ranking imported common.ranking, pandas and scikit-learn while it waited (0.7 s measured in the
    BusinessFilter). Called first in every deployment's ``__init__``, it imports them at start-up, before the
    replica takes traffic, a replica added by autoscaling included.
    """
    importlib.import_module(type(deployment).__module__)
