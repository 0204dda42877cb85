"""The ranking's popularity and recency features travel with a personal retrieval: the Retriever reads the event
history, so the Reranker ranks with the same version of it (an oracle against ItemStats over every event)."""
from __future__ import annotations

import pandas as pd

from common.event_log import History
from common.ranking import ItemStats
from tests.serve.conftest import serve_config


def test_a_personal_retrieval_carries_its_candidates_stats(shop):
    from serve.retriever import Retriever

    cfg = serve_config(shop)
    retriever = Retriever.func_or_class(cfg)
    user = str(shop["events"]["user_id"].iloc[0])
    found = retriever.for_user(user, 30)
    ids = {c.item_id for c in found.candidates}
    assert found.stats is not None and ids
    expected = ItemStats.from_events(History(cfg.events, cfg.event_log).read())  # the file and what was logged
    assert set(found.stats.popularity) == {i for i in ids if i in expected.popularity}
    for item in ids:
        assert found.stats.popularity.get(item) == expected.popularity.get(item)
        assert found.stats.recency.get(item) == expected.recency.get(item)
    assert any(found.stats.popularity.values())  # not all zero: the features carry information


def test_only_keeps_the_asked_items():
    stats = ItemStats.from_events(pd.DataFrame({
        "user_id": ["u1", "u1", "u2"], "item_id": ["a", "b", "a"], "event": ["purchase", "view", "purchase"],
        "ts": pd.to_datetime(["2026-01-01", "2026-01-02", "2026-01-20"], utc=True)}))
    part = stats.only(["a", "zzz"])
    assert part.popularity == {"a": stats.popularity["a"]} and part.recency == {"a": stats.recency["a"]}
