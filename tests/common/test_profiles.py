"""Mean and session profiles: the formulas against hand computations, batched vs per-user, the recommenders."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.errors import ConfigError
from common.events import EventWeights
from common.interactions import TrainData, build_interactions
from common.profiles import (
    EmptyProfileError,
    MeanProfileRecommender,
    ProfileConfig,
    SessionRecommender,
    SessionState,
    mean_profile,
    mean_profiles,
    session_update,
    session_vector,
)
from common.recommenders.base import top_k


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# ------------------------------------------------------------------------------------------- mean profile


def test_mean_profile_matches_a_hand_computation():
    # Liked: x (weight 1) and y (weight 3); disliked: z (weight -2). E_p = (x + 3y)/4 = (.25, .75, 0),
    # E_n = z = (0, 0, 1); with w_pos = 1, w_neg = 0.5: E = (.25, .75, -.5), normalised by sqrt(0.875).
    vectors = np.eye(3)
    got = mean_profile(vectors, [1.0, 3.0, -2.0], ProfileConfig(w_pos=1.0, w_neg=0.5))
    np.testing.assert_allclose(got, np.array([0.25, 0.75, -0.5]) / np.sqrt(0.875), rtol=1e-6)
    assert got.dtype == np.float32


def test_negative_side_is_a_mean_weighted_by_absolute_weight():
    # Two dislikes, -1 on x and -3 on y: E_n = (x + 3y)/4; only negatives: E = -E_n.
    got = mean_profile(np.eye(2), [-1.0, -3.0], ProfileConfig(w_pos=1.0, w_neg=1.0))
    np.testing.assert_allclose(got, -unit([1, 3]), rtol=1e-6)


def test_zero_weight_events_count_on_neither_side():
    with_zero = mean_profile(np.eye(3), [2.0, 0.0, -1.0])
    without = mean_profile(np.eye(3)[[0, 2]], [2.0, -1.0])
    np.testing.assert_allclose(with_zero, without, rtol=1e-6)


def test_a_user_without_weighted_events_has_no_profile():
    with pytest.raises(EmptyProfileError, match="no event"):
        mean_profile(np.eye(2), [0.0, 0.0])
    with pytest.raises(EmptyProfileError, match="cancel"):  # the same item liked and disliked, equal sides
        mean_profile(np.eye(2)[[0, 0]], [1.0, -1.0], ProfileConfig(w_pos=1.0, w_neg=1.0))


def test_profile_config_refuses_bad_weights_and_echoes_them():
    with pytest.raises(ConfigError, match="-1"):
        ProfileConfig(w_neg=-1)
    with pytest.raises(ConfigError, match="nan"):
        ProfileConfig(w_pos=float("nan"))
    with pytest.raises(ConfigError, match="both 0"):
        ProfileConfig(w_pos=0, w_neg=0)


def test_batched_profiles_equal_the_per_user_function_on_random_events():
    rng = np.random.default_rng(0)
    n_users, n_items, dim = 40, 25, 8
    items = rng.normal(size=(n_items, dim))
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    n = 400
    u = rng.integers(0, n_users, n)
    i = rng.integers(0, n_items, n)  # repeats: the same item several times for one user
    w = rng.choice([-3.0, -2.0, 0.0, 1.0, 2.0, 4.0], n)
    u[:3] = n_users - 1
    w[u == n_users - 1] = 0.0  # the last user with events: zero-weight events only
    cfg = ProfileConfig(w_pos=1.0, w_neg=0.7)
    batch = mean_profiles(u, i, w, items, n_users + 1, cfg)  # user n_users: no events at all
    for user in range(n_users + 1):
        mine = u == user
        assert batch.n_positive[user] == (w[mine] > 0).sum()
        assert batch.n_negative[user] == (w[mine] < 0).sum()
        try:
            expected = mean_profile(items[i[mine]], w[mine], cfg)
        except EmptyProfileError:
            assert not batch.ok[user] and not batch.vectors[user].any()
            continue
        assert batch.ok[user]
        np.testing.assert_allclose(batch.vectors[user], expected, atol=1e-6)
    assert not batch.ok[n_users - 1] and not batch.ok[n_users]
    assert batch.ok.sum() >= n_users - 5


# ------------------------------------------------------------------------------------------- session


def test_session_update_follows_the_formula_on_random_vectors():
    rng = np.random.default_rng(1)
    for _ in range(50):
        s, v = unit(rng.normal(size=6)), rng.normal(size=6) * rng.uniform(0.1, 5)  # v need not be unit
        u = unit(v)
        a1 = (np.dot(s, u) + 1) / 2
        a2 = 1 - a1
        assert 0 <= a1 <= 1 and 0 <= a2 <= 1
        np.testing.assert_allclose(session_update(s, v), unit(a1 * s + a2 * u), atol=1e-6)


def test_session_update_applies_f_before_mixing():
    s, v = unit([1, 0, 0]), np.array([0.0, 2.0, 0.0])

    def f(x):
        return np.array([x[1], 0.0, x[1]])  # maps v to (2, 0, 2), cos with s = 1/sqrt(2)

    u = unit([1, 0, 1])
    a1 = (1 / np.sqrt(2) + 1) / 2
    np.testing.assert_allclose(session_update(s, v, f), unit(a1 * s + (1 - a1) * u), atol=1e-6)


def test_a1_extremes_keep_a_similar_session_and_replace_an_opposite_one():
    s = unit([1, 1, 0])
    np.testing.assert_allclose(session_update(s, s * 3), s, atol=1e-6)  # a1 = 1: unchanged
    np.testing.assert_allclose(session_update(s, -s), -s, atol=1e-6)  # a1 = 0: the new item replaces it
    # orthogonal: a1 = a2 = 1/2, the bisector
    np.testing.assert_allclose(session_update(unit([1, 0]), [0, 1]), unit([1, 1]), atol=1e-6)


def test_the_first_event_starts_the_session_at_the_item():
    np.testing.assert_allclose(session_update(None, [0, 3, 4]), [0, 0.6, 0.8], atol=1e-6)
    state = SessionState().update(np.array([0, 3, 4]), 100.0)
    np.testing.assert_allclose(state.vector, [0, 0.6, 0.8], atol=1e-6)
    assert (state.count, state.last_ts) == (1, 100.0)


def test_a_fold_over_a_session_equals_repeated_updates():
    rng = np.random.default_rng(2)
    vs = rng.normal(size=(7, 5))
    s = None
    for v in vs:
        s = session_update(s, v)
    np.testing.assert_allclose(session_vector(vs), s, atol=1e-6)
    state = SessionState(timeout_s=60)
    for k, v in enumerate(vs):
        state = state.update(v, pd.Timestamp("2024-01-01", tz="UTC") + pd.Timedelta(seconds=30 * k))
    np.testing.assert_allclose(state.vector, s, atol=1e-6)
    assert state.count == 7


def test_inactivity_past_the_timeout_restarts_the_session():
    a, b, c = unit([1, 0, 0]), unit([0, 1, 0]), unit([0, 0, 1])
    state = SessionState(timeout_s=60).update(a, 0).update(b, 60)  # a gap of exactly the timeout: same session
    assert state.count == 2
    np.testing.assert_allclose(state.vector, unit([1, 1, 0]), atol=1e-6)
    restarted = state.update(c, 121)  # 61 s of silence
    assert (restarted.count, restarted.last_ts) == (1, 121.0)
    np.testing.assert_allclose(restarted.vector, c, atol=1e-6)
    late = state.update(c, 30)  # delivered late: joins the session, the clock does not go back
    assert (late.count, late.last_ts) == (3, 60.0)


def test_session_state_refuses_a_bad_timeout_and_bad_times():
    with pytest.raises(ConfigError, match="-5"):
        SessionState(timeout_s=-5)
    with pytest.raises(ConfigError, match="yesterday"):
        SessionState().update(np.ones(2), "yesterday")


# ------------------------------------------------------------------------------------------- recommenders

# Six items in two categories: A along the first axis, B along the second (slightly spread).
ITEMS = np.array(["a1", "a2", "a3", "b1", "b2", "b3"], dtype=object)
VECTORS = np.array([unit([1, 0.1 * k, 0.05]) for k in range(3)] + [unit([0.1 * k, 1, 0.05]) for k in range(3)],
                   dtype=np.float32)


def tiny_data(rows: list[tuple[str, str, str, int, str]]) -> TrainData:
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "event", "ts", "session_id"])
    events["ts"] = pd.to_datetime(events["ts"], unit="s", utc=True)
    events["button"] = None
    events = events.sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)
    users = np.asarray(sorted(events["user_id"].unique()), dtype=object)
    return TrainData(build_interactions(events, EventWeights(), users, ITEMS), events, item_vectors=VECTORS)


def test_a_user_who_likes_category_a_gets_a_items_first():
    data = tiny_data([("u1", "a1", "purchase", 1, "s1"), ("u1", "b1", "view", 2, "s1"),
                      ("u2", "b2", "wishlist", 1, "s2")])
    rec = MeanProfileRecommender().fit(data)
    ranked = top_k(rec.scores(np.arange(2)), 6)
    assert set(ITEMS[ranked[0, :3]]) == {"a1", "a2", "a3"}
    assert set(ITEMS[ranked[1, :3]]) == {"b1", "b2", "b3"}


def test_a_disliked_direction_is_pushed_away():
    base = [("u1", "a1", "view", 1, "s1"), ("u1", "b1", "view", 2, "s1")]
    liked_both = MeanProfileRecommender(ProfileConfig(w_neg=1.0)).fit(tiny_data(base))
    disliked_b = MeanProfileRecommender(ProfileConfig(w_neg=1.0)).fit(
        tiny_data(base + [("u1", "b2", "dislike", 3, "s1")]))
    b_items = [3, 4, 5]
    before = liked_both.scores(np.array([0]))[0]
    after = disliked_b.scores(np.array([0]))[0]
    assert (after[b_items] < before[b_items]).all()
    assert after[b_items].max() < after[[0, 1, 2]].min()


def test_users_without_a_profile_score_zero_everywhere():
    data = tiny_data([("u1", "a1", "view", 1, "s1"), ("u2", "b1", "dislike", 1, "s2")])
    rec = SessionRecommender().fit(data)  # u2 has no positive event: no session
    assert rec.has_profile.tolist() == [True, False]
    assert not rec.scores(np.array([1])).any()


def test_session_recommender_follows_the_last_session():
    # u1 liked A items long ago and B items in the last session.
    data = tiny_data([("u1", "a1", "purchase", 1, "s1"), ("u1", "a2", "purchase", 2, "s1"),
                      ("u1", "b1", "view", 9000, "s2"), ("u1", "b2", "view", 9001, "s2"),
                      ("u1", "a3", "dislike", 9002, "s2")])
    rec = SessionRecommender().fit(data)
    np.testing.assert_allclose(rec.profiles[0], session_vector(VECTORS[[3, 4]]), atol=1e-6)
    assert set(ITEMS[top_k(rec.scores(np.array([0])), 3)[0]]) == {"b1", "b2", "b3"}
    mean = MeanProfileRecommender().fit(data)  # ... while the mean profile still prefers A
    assert ITEMS[top_k(mean.scores(np.array([0])), 1)[0, 0]].startswith("a")


def test_recommenders_need_item_vectors():
    data = tiny_data([("u1", "a1", "view", 1, "s1")])
    bare = TrainData(data.interactions, data.events)
    with pytest.raises(ConfigError, match="item_vectors"):
        MeanProfileRecommender().fit(bare)
