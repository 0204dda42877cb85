"""The interaction matrix and the evaluation splits."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.errors import ConfigError
from common.events import validate_events
from common.interactions import build_interactions, last_basket_split, temporal_split


def _events(rows) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "event", "ts", "order_id"])
    df["ts"] = pd.to_datetime(df["ts"], unit="s", utc=True)
    return validate_events(df).valid


def test_matrix_sums_weights_and_separates_liked_from_seen():
    ev = _events([("u", "a", "view", 1, None), ("u", "a", "purchase", 2, "o1"), ("u", "b", "dislike", 3, None),
                  ("v", "b", "view", 4, None)])
    inter = build_interactions(ev, items=np.array(["a", "b", "c"], object))
    assert inter.matrix.toarray().tolist() == [[5.0, -2.0, 0.0], [0.0, 1.0, 0.0]]
    assert inter.positives.toarray().tolist() == [[1, 0, 0], [0, 1, 0]]
    assert inter.seen.toarray().tolist() == [[1, 1, 0], [0, 1, 0]]
    assert inter.item_popularity().tolist() == [1, 1, 0]


def test_temporal_split_holds_out_each_users_latest_items():
    rows = [("u", f"i{t}", "view", t, None) for t in range(10)] + [("v", "x", "view", 1, None),
                                                                   ("v", "y", "view", 2, None)]
    rows.append(("u", "i1", "purchase", 50, None))  # a later event on a training item stays in training
    train, test = temporal_split(_events(rows), holdout=0.2)
    assert sorted(test.loc[test.user_id == "u", "item_id"]) == ["i8", "i9"]
    assert "i1" in set(train.loc[train.user_id == "u", "item_id"]) and len(train[train.item_id == "i1"]) == 2
    assert test.loc[test.user_id == "v", "item_id"].tolist() == []  # round(2 * 0.8) = 2 stay in training
    assert set(zip(train.user_id, train.item_id)).isdisjoint(zip(test.user_id, test.item_id))


def test_temporal_split_keeps_at_least_one_training_item():
    train, test = temporal_split(_events([("u", "a", "view", 1, None), ("u", "b", "view", 2, None)]), holdout=0.9)
    assert train.item_id.tolist() == ["a"] and test.item_id.tolist() == ["b"]


def test_last_basket_split_holds_out_each_users_latest_order():
    ev = _events([("u", "a", "purchase", 1, "o1"), ("u", "b", "purchase", 5, "o2"), ("u", "c", "purchase", 6, "o2"),
                  ("v", "a", "purchase", 2, "o3")])
    train, test = last_basket_split(ev)
    assert sorted(test.order_id.unique()) == ["o2", "o3"] and train.order_id.tolist() == ["o1"]


@pytest.mark.parametrize("holdout", [0, 1, 1.5])
def test_bad_holdout_is_refused(holdout):
    with pytest.raises(ConfigError, match=str(holdout)):
        temporal_split(_events([("u", "a", "view", 1, None)]), holdout=holdout)
