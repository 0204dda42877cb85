"""The reranker's pieces: candidates, item stats, user context, features, the model's artifact and MMR."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from common.artifacts import ArtifactStore
from common.errors import ConfigError, NotFoundError
from common.events import EVENT_TYPES, EventWeights
from common.ranking import (
    FEATURES,
    SOURCES,
    AffinitySums,
    Candidate,
    ItemStats,
    Ranker,
    UserContext,
    affinity_sums,
    feature_matrix,
    load_latest_ranker,
    merge_candidates,
    mmr,
    stack_vectors,
    user_context,
)

T0 = pd.Timestamp("2025-03-01T00:00:00Z")


def events(rows: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    """(user, item, event, days after T0) -> events in the common.events schema (the columns weigh() reads)."""
    return pd.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                         "event": [r[2] for r in rows], "ts": [T0 + pd.Timedelta(days=r[3]) for r in rows],
                         "button": [None] * len(rows), "value": [np.nan] * len(rows)})


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


# ------------------------------------------------------------------------------------------- candidates


def test_add_keeps_the_best_score_per_source_and_every_reason():
    c = Candidate("a")
    c.add("rules", 2.0, {"source": "rules", "because": "x", "lift": 2.0})
    c.add("rules", 1.5, {"source": "rules", "because": "y", "lift": 1.5})
    assert c.scores == {"rules": 2.0} and [r["because"] for r in c.reasons] == ["x", "y"]
    with pytest.raises(ConfigError, match="'bogus'"):
        c.add("bogus", 1.0, {})


def test_merge_is_a_union_in_first_seen_order_without_touching_the_inputs():
    a = Candidate("a", {"profile": 0.5}, [{"source": "profile"}], {"price": 10.0})
    b1, b2 = Candidate("b", {"item": 0.2}), Candidate("b", {"item": 0.4, "popular": 0.9}, vector=unit([1, 0]))
    merged = merge_candidates([[a, b1], [b2, Candidate("a", {"profile": 0.1}, [{"source": "x"}], {"price": 99.0})]])
    assert [c.item_id for c in merged] == ["a", "b"]
    assert merged[0].scores == {"profile": 0.5} and len(merged[0].reasons) == 2
    assert merged[0].fields == {"price": 10.0}  # first known value wins
    assert merged[1].scores == {"item": 0.4, "popular": 0.9} and merged[1].vector is not None
    assert b1.scores == {"item": 0.2} and len(a.reasons) == 1


# ------------------------------------------------------------------------------------------- stats and context


def test_item_stats_popularity_is_log_weighted_positive_events_over_the_max_and_recency_a_share():
    ev = events([("u", "a", "purchase", 0), ("v", "a", "purchase", 9), ("u", "b", "view", 9),
                 ("u", "c", "dislike", 9), ("v", "b", "view", 1)])
    stats = ItemStats.from_events(ev, window_days=7)
    assert stats.popularity["a"] == pytest.approx(1.0)
    assert stats.popularity["b"] == pytest.approx(np.log1p(2.0) / np.log1p(8.0))
    assert stats.popularity["c"] == 0.0  # only a dislike
    assert stats.recency == pytest.approx({"a": 0.5, "b": 0.5, "c": 1.0})
    assert ItemStats.from_events(ev.iloc[:0]).popularity == {}


def test_user_context_shares_positive_weight_and_ignores_dislikes():
    fields = {"a": {"category": "Coat", "brand": "X", "price": 100.0}, "b": {"category": "Bag", "brand": "Y",
                                                                              "price": 20.0},
              "c": {"category": "Dress", "brand": "X", "price": 500.0}}
    ev = events([("u", "a", "purchase", 0), ("u", "b", "view", 1), ("u", "c", "dislike", 2)])
    ctx = user_context(ev, fields)
    assert ctx.category_affinity == pytest.approx({"Coat": 0.8, "Bag": 0.2})
    assert ctx.brand_affinity == pytest.approx({"X": 0.8, "Y": 0.2})
    assert ctx.mean_price == pytest.approx((4 * 100 + 1 * 20) / 5)
    empty = user_context(ev.iloc[:0], fields)
    assert (empty.category_affinity, empty.brand_affinity, empty.mean_price, empty.profile) == ({}, {}, None, None)


def _messy_catalogue(rng: np.random.Generator) -> dict[str, dict | None]:
    """Items with missing, empty and non-string categories/brands and unusable prices (None, NaN, < 0, inf)."""
    keys = ["Coat", "Bag", "Dress", None, "", np.nan, 7]
    prices = [10.0, 99.5, 250.0, 0.0, None, np.nan, -5.0, np.inf, "12.5"]
    fields: dict[str, dict | None] = {f"i{i}": {"category": keys[rng.integers(len(keys))],
                                                "brand": keys[rng.integers(len(keys))],
                                                "price": prices[rng.integers(len(prices))]} for i in range(25)}
    fields["i0"], fields["i1"] = None, {}
    return fields


def _random_events(rng: np.random.Generator, users: list[str], n: int) -> pd.DataFrame:
    """Events of every kind on catalogue items and on items the catalogue lacks ("gone*"), some buttons set."""
    items = [f"i{i}" for i in range(25)] + ["gone0", "gone1"]
    return pd.DataFrame({"user_id": rng.choice(users, n), "item_id": rng.choice(items, n),
                         "event": rng.choice(EVENT_TYPES, n),
                         "ts": T0 + pd.to_timedelta(rng.integers(0, 10**6, n), unit="s"),
                         "button": rng.choice(np.array([None, None, None, "not_interested", "heart"], dtype=object), n),
                         "value": np.where(rng.random(n) < 0.7, rng.integers(1, 6, n).astype(float), np.nan)})


def _assert_same_context(got: UserContext, want: UserContext) -> None:
    assert got.category_affinity == pytest.approx(want.category_affinity, rel=1e-9)
    assert got.brand_affinity == pytest.approx(want.brand_affinity, rel=1e-9)
    assert (got.mean_price is None) == (want.mean_price is None)
    if want.mean_price is not None:
        assert got.mean_price == pytest.approx(want.mean_price, rel=1e-9)
    assert got.profile is want.profile


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weights", [None, EventWeights(rating_center=3.0)], ids=["default", "rating_center"])
def test_affinity_sums_give_the_user_context_of_every_user(seed, weights):
    rng = np.random.default_rng(seed)
    fields = _messy_catalogue(rng)
    ev = _random_events(rng, [f"u{u}" for u in range(6)], 300)
    ev = pd.concat([ev, events([("neg", "i2", "dislike", 0), ("neg", "i3", "return", 1)])], ignore_index=True)
    sums = affinity_sums(ev, fields, weights)
    assert set(sums) == set(ev["user_id"])
    profile = unit([1, 2])
    for user, mine in ev.groupby("user_id"):
        _assert_same_context(sums[user].context(profile), user_context(mine, fields, profile, weights))
    assert sums["neg"] == AffinitySums()
    neg = sums["neg"].context(profile)
    assert (neg.category_affinity, neg.brand_affinity, neg.mean_price, neg.profile) == ({}, {}, None, profile)
    assert affinity_sums(ev.iloc[:0], fields) == {}


@pytest.mark.parametrize("seed", range(4))
def test_affinity_sums_plus_live_views_is_the_context_of_the_concatenated_frame(seed):
    rng = np.random.default_rng(seed)
    fields = _messy_catalogue(rng)
    ev = _random_events(rng, ["u0", "u1", "u2"], 120)
    sums = affinity_sums(ev, fields)
    view = EventWeights().events["view"]
    live = list(rng.choice([f"i{i}" for i in range(25)] + ["gone0"], 8)) + ["i4", "i4"]  # a repeat counts twice
    frame = pd.DataFrame({"item_id": live, "event": "view", "button": None, "value": None})
    for user, offline in ev.groupby("user_id"):
        want = user_context(pd.concat([offline[frame.columns], frame], ignore_index=True), fields)
        _assert_same_context(sums[user].plus(live, fields, view).context(), want)
    _assert_same_context(AffinitySums().plus(live, fields, view).context(), user_context(frame, fields))
    assert sums["u0"].plus(live, fields, -1.0) is sums["u0"] and sums["u0"].plus([], fields, view) is sums["u0"]


# ------------------------------------------------------------------------------------------- features


def _cands() -> list[Candidate]:
    a = Candidate("a", fields={"category": "Coat", "brand": "X", "price": 100.0}, vector=unit([1, 1, 0]))
    a.add("profile", 0.7, {"source": "profile"})
    a.add("rules", 3.0, {"source": "rules"})
    b = Candidate("b", fields={"category": "Bag", "price": None})
    b.add("popular", 0.4, {"source": "popular"})
    return [a, b]


def test_feature_matrix_shape_absent_sources_and_user_item_cosine():
    ctx = UserContext(category_affinity={"Coat": 0.8}, brand_affinity={"X": 0.5}, mean_price=50.0,
                      profile=unit([1, 0, 0]))
    stats = ItemStats(popularity={"a": 0.3, "b": 0.4}, recency={"a": 1.0})
    x = feature_matrix(_cands(), ctx, stats)
    assert x.shape == (2, len(FEATURES)) and x.dtype == np.float32 and np.isfinite(x).all()
    col = {f: x[:, j] for j, f in enumerate(FEATURES)}
    for s in SOURCES:
        if s not in ("profile", "rules"):
            assert col[f"score_{s}"][0] == 0 and col[f"has_{s}"][0] == 0
    assert col["score_profile"][0] == pytest.approx(0.7) and col["has_profile"].tolist() == [1, 0]
    assert col["score_rules"][0] == pytest.approx(np.log1p(3.0))
    assert col["n_sources"].tolist() == [2, 1]
    assert col["user_item_cosine"][0] == pytest.approx(float(unit([1, 0, 0]) @ unit([1, 1, 0])))
    assert col["user_item_cosine"][1] == 0  # no vector
    assert col["price_gap"][0] == pytest.approx(abs(np.log1p(100) - np.log1p(50)), rel=1e-5)
    assert col["log_price"][1] == 0 and col["price_gap"][1] == 0
    assert col["category_affinity"].tolist() == pytest.approx([0.8, 0.0])
    assert col["recency"].tolist() == [1.0, 0.0]


def test_feature_matrix_selects_columns_by_name_and_refuses_unknown_ones():
    ctx, stats = UserContext(), ItemStats(popularity={}, recency={})
    x = feature_matrix(_cands(), ctx, stats, features=("n_sources", "score_profile"))
    np.testing.assert_allclose(x, [[2, 0.7], [1, 0]], rtol=1e-6)
    assert feature_matrix([], ctx, stats).shape == (0, len(FEATURES))
    with pytest.raises(ConfigError, match="wishful"):
        feature_matrix(_cands(), ctx, stats, features=("wishful",))


# ------------------------------------------------------------------------------------------- MMR


def test_mmr_with_lambda_one_or_no_vectors_is_the_score_order():
    rng = np.random.default_rng(0)
    s, v = rng.normal(size=20), rng.normal(size=(20, 4))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert mmr(s, v, 5, lam=1.0).tolist() == np.argsort(-s)[:5].tolist()
    assert mmr(s, None, 30).tolist() == np.argsort(-s).tolist()


def test_mmr_picks_a_different_item_after_a_near_duplicate():
    v = np.array([unit([1, 0]), unit([1, 0]), unit([0, 1])])
    assert mmr(np.array([1.0, 0.99, 0.9]), v, 2, lam=0.5).tolist() == [0, 2]
    assert mmr(np.array([1.0, 0.99, 0.9]), v, 2, lam=1.0).tolist() == [0, 1]


def _mmr_loop(scores, vectors, k, lam):
    s = (scores - scores.min()) / (scores.max() - scores.min())
    picked: list[int] = []
    while len(picked) < min(k, len(s)):
        best, best_value = None, -np.inf
        for i in range(len(s)):
            if i in picked:
                continue
            sim = max((float(vectors[i] @ vectors[j]) for j in picked), default=0.0)
            value = lam * s[i] - (1 - lam) * sim if picked else lam * s[i]
            if value > best_value:
                best, best_value = i, value
        picked.append(best)
    return picked


@pytest.mark.parametrize("seed", range(5))
def test_mmr_matches_a_brute_force_loop(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 25))
    s = rng.normal(size=n) * 10 + 3  # any scale: mmr normalises
    v = rng.normal(size=(n, 5))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    lam = float(rng.uniform(0.2, 0.95))
    assert mmr(s, v, 8, lam).tolist() == _mmr_loop(s, v, 8, lam)


@pytest.mark.parametrize("seed", range(5))
def test_mmr_top_diversifies_the_head_and_orders_the_rest_by_score(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(12, 40))
    s = np.round(rng.normal(size=n), 1)  # rounded: some ties, which go to the lower index
    v = rng.normal(size=(n, 6))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    k = int(rng.integers(8, n + 1))
    full = mmr(s, v, k, 0.6).tolist()
    assert mmr(s, v, k, 0.6, top=k).tolist() == full and mmr(s, v, k, 0.6, top=k + 5).tolist() == full
    for m in (0, 1, 5):
        head = mmr(s, v, k, 0.6, top=m).tolist()
        assert head[:m] == full[:m] and len(head) == k
        assert head[m:] == [i for i in np.argsort(-s, kind="stable").tolist() if i not in full[:m]][:k - m]
    with pytest.raises(ConfigError, match="top"):
        mmr(s, v, k, top=-1)


def test_stack_vectors_fills_unknown_rows_with_zeros():
    cands = [Candidate("a", vector=unit([1, 0])), Candidate("b")]
    assert stack_vectors(cands).tolist() == [[1, 0], [0, 0]]
    assert stack_vectors([Candidate("c")]) is None


# ------------------------------------------------------------------------------------------- the model


def _xy(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(400, len(FEATURES))).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 3] + rng.normal(scale=0.5, size=400) > 0.8).astype(int)
    return x, y


@pytest.mark.parametrize("model", ["hgb", "logreg"])
def test_ranker_save_load_gives_identical_scores(tmp_path, model):
    x, y = _xy()
    ranker = Ranker(model, identity="ranker:items/v1").fit(x, y)
    ranker.save(str(tmp_path / "r"))
    again = Ranker.load(str(tmp_path / "r"))
    assert again.features == FEATURES and again.identity == "ranker:items/v1"
    np.testing.assert_array_equal(again.score(x), ranker.score(x))
    assert np.corrcoef(ranker.score(x), x[:, 0])[0, 1] > 0.5  # it learned the planted signal


def test_ranker_load_refuses_another_sklearn_version(tmp_path):
    x, y = _xy()
    Ranker("logreg").fit(x, y).save(str(tmp_path))
    meta = json.loads((tmp_path / "ranker.json").read_text())
    meta["sklearn_version"] = "0.0.1"
    (tmp_path / "ranker.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"0\.0\.1"):
        Ranker.load(str(tmp_path))


def test_ranker_validates_its_inputs():
    with pytest.raises(ConfigError, match="'forest'"):
        Ranker("forest")
    with pytest.raises(ConfigError, match="both 0 and 1"):
        Ranker().fit(np.zeros((3, len(FEATURES))), np.zeros(3))
    with pytest.raises(ConfigError, match=r"\[2, 3\]"):
        Ranker().fit(*_xy()).score(np.zeros((2, 3)))


def test_load_latest_ranker_says_which_job_to_run(tmp_path):
    with pytest.raises(NotFoundError, match=r"no ranker for catalogue 'items' under .*vitrine train ranker"):
        load_latest_ranker(str(tmp_path))


def test_load_latest_ranker_follows_the_latest_pointer(tmp_path):
    store = ArtifactStore(str(tmp_path))
    version = store.new_version("ranker", "items")
    Ranker("logreg", identity=f"ranker:items/{version}").fit(*_xy()).save(store.path("ranker", "items", version))
    store.publish("ranker", "items", version, {"result": {"version": version}})
    assert load_latest_ranker(str(tmp_path)).identity == f"ranker:items/{version}"
    assert load_latest_ranker(str(tmp_path), version=version).identity == f"ranker:items/{version}"
