"""The synthetic generator: deterministic, partition-independent, shaped like rating data."""

from __future__ import annotations


import dask
import numpy as np
import pandas as pd
import pytest

import blockals
from blockals import datasets
from blockals.datasets import CHUNK_USERS, movielens_like, planted_model, synthetic_frame, synthetic_ratings

SIZE = dict(n_users=3000, n_items=800, n_ratings=60_000)


@pytest.fixture(scope="module")
def frame():
    return synthetic_frame(**SIZE, seed=3, noise=0.1)


def planted_score(f: pd.DataFrame, truth: dict) -> np.ndarray:
    u, i = f["user"].to_numpy() - 1, f["item"].to_numpy() - 1
    return (truth["mu"] + truth["user_bias"][u] + truth["item_bias"][i]
            + np.einsum("ij,ij->i", truth["user_factors"][u], truth["item_factors"][i]))


def test_deterministic_by_seed_and_independent_of_partitioning(frame):
    assert frame["user"].is_monotonic_increasing and not frame.duplicated(["user", "item"]).any()
    sorted_by_pair = frame.sort_values(["user", "item"], ignore_index=True)
    pd.testing.assert_frame_equal(frame, sorted_by_pair)
    # 3000 users are 3 chunks: one partition each, then all in one.
    for partition_size in (7_000, 10**9):
        again = synthetic_frame(**SIZE, seed=3, noise=0.1, partition_size=partition_size)
        pd.testing.assert_frame_equal(frame, again)
    other = synthetic_frame(**SIZE, seed=4, noise=0.1)
    assert len(other) == len(frame)
    assert not frame[["user", "item"]].equals(other[["user", "item"]])
    assert not np.array_equal(frame["rating"], other["rating"])


def test_lazy_until_computed(monkeypatch):
    calls = []
    real = datasets._chunk
    monkeypatch.setattr(datasets, "_chunk", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    lazy = synthetic_ratings(**SIZE, partition_size=10_000)
    # Every chunk of 1024 users holds more than 10k ratings: one partition per chunk.
    assert lazy.npartitions == -(-SIZE["n_users"] // CHUNK_USERS) == 3
    assert dict(lazy.dtypes) == {"user": np.int64, "item": np.int64, "rating": np.float32, "timestamp": np.int64}
    assert not lazy.known_divisions
    assert calls == []
    with dask.config.set(scheduler="sync"):
        second = lazy.partitions[1].compute()
    assert calls == [1]
    assert second["user"].between(CHUNK_USERS + 1, 2 * CHUNK_USERS).all()
    assert synthetic_ratings(**SIZE).npartitions == 1


def test_partitions_are_whole_chunks_under_partition_size():
    lazy = synthetic_ratings(n_users=5 * CHUNK_USERS, n_items=500, n_ratings=100_000, partition_size=45_000)
    with dask.config.set(scheduler="sync"):
        sizes = lazy.map_partitions(len).compute().tolist()
        users = lazy.map_partitions(lambda p: p["user"].agg(["min", "max"]).tolist()).compute().tolist()
    assert sum(sizes) == 100_000 and 1 < len(sizes) <= 5
    assert all(size <= 45_000 for size in sizes)
    for (lo, hi), (next_lo, _) in zip(users, users[1:] + [(5 * CHUNK_USERS + 1, 0)]):
        assert (lo - 1) % CHUNK_USERS == 0 and next_lo == hi + 1  # disjoint runs of whole chunks


def test_counts_scale_and_dtypes(frame):
    assert len(frame) == SIZE["n_ratings"]
    assert list(frame.columns) == ["user", "item", "rating", "timestamp"]
    assert list(frame.dtypes) == [np.int64, np.int64, np.float32, np.int64]
    assert set(frame["user"]) == set(range(1, SIZE["n_users"] + 1))  # everyone rated something
    assert set(frame["item"]) == set(range(1, SIZE["n_items"] + 1))  # and every item was rated
    assert set(np.unique(frame["rating"])) <= set(np.arange(1, 11) / 2)
    assert frame["rating"].nunique() >= 8
    per_user = frame.groupby("user").size()
    assert per_user.max() <= SIZE["n_items"]
    # Timestamps: seconds in 2000-2010, each user's within a window of a few years at most.
    assert frame["timestamp"].between(946_684_800, 1_293_840_000).all()
    spans = frame.groupby("user")["timestamp"].agg(np.ptp)
    assert spans.max() < 6 * 365 * 86_400 and spans[per_user > 1].median() > 86_400


def test_power_laws_and_shuffled_ids(frame):
    users = frame.groupby("user").size().sort_values(ascending=False)
    items = frame.groupby("item").size().sort_values(ascending=False)
    # The most active tenth of users and the most popular tenth of items hold far more
    # than a tenth of the ratings.
    assert users.iloc[: len(users) // 10].sum() > 0.3 * len(frame)
    assert items.iloc[: len(items) // 10].sum() > 0.3 * len(frame)
    assert users.iloc[0] > 10 * users.median()
    # Ids carry no rank: activity and popularity are uncorrelated with the id.
    assert abs(np.corrcoef(users.index, users.to_numpy())[0, 1]) < 0.1
    assert abs(np.corrcoef(items.index, items.to_numpy())[0, 1]) < 0.1
    # The exponents steer the skew: exponent 0 is uniform.
    flat = synthetic_frame(**SIZE, user_exponent=0.0, item_exponent=0.0)
    assert flat.groupby("user").size().max() - flat.groupby("user").size().min() <= 1
    assert flat.groupby("item").size().max() < 2 * len(flat) / SIZE["n_items"]


def test_ratings_follow_the_planted_model(frame):
    truth = planted_model(SIZE["n_users"], SIZE["n_items"], rank=8, seed=3)
    assert truth["user_factors"].shape == (SIZE["n_users"], 8) and truth["item_factors"].shape == (SIZE["n_items"], 8)
    assert np.array_equal(truth["user_ids"], np.arange(1, SIZE["n_users"] + 1))
    score = planted_score(frame, truth)
    assert np.corrcoef(score, frame["rating"])[0, 1] > 0.8
    # The interaction matters: ratings correlate less with mu + biases alone.
    u, i = frame["user"].to_numpy() - 1, frame["item"].to_numpy() - 1
    biases = truth["user_bias"][u] + truth["item_bias"][i]
    assert np.corrcoef(biases, frame["rating"])[0, 1] < np.corrcoef(score, frame["rating"])[0, 1] - 0.1


def test_noiseless_ratings_are_the_rounded_clipped_score():
    f = synthetic_frame(500, 300, 20_000, noise=0.0, rank=4, seed=9)
    score = planted_score(f, planted_model(500, 300, rank=4, seed=9))
    expected = np.clip(np.round(2 * score) / 2, 0.5, 5.0)
    tie = np.abs(2 * score - np.floor(2 * score) - 0.5) < 1e-9  # round-half cases may differ in the last bit
    assert np.array_equal(f["rating"].to_numpy()[~tie], expected[~tie])
    # The planted model does not depend on n_users: chunk-wise draws for users, one draw for items.
    bigger = planted_model(5000, 300, rank=4, seed=9)
    small = planted_model(500, 300, rank=4, seed=9)
    assert np.array_equal(bigger["user_factors"][:500], small["user_factors"])
    assert np.array_equal(bigger["item_bias"], small["item_bias"])


@pytest.mark.parametrize("heavy", [False, True])
def test_item_sampling_is_weighted_without_replacement(heavy):
    # Both samplers (light users: draws with replacement; heavy users: exponential keys)
    # give each item the inclusion frequency of numpy's weighted sampling without replacement.
    n, k, users = 12, 5, 20_000
    items = datasets._item_side(0, n, 2, 1.0)
    if heavy:
        items["distinct"] = np.zeros_like(items["distinct"])  # everyone takes the heavy path
    assert (k > np.interp(n, items["draws"], items["distinct"])) == heavy
    none = np.zeros(0, np.int64)
    keys = datasets._sample_items(np.random.default_rng(1), np.full(users, k), none, none, items)
    assert len(keys) == len(np.unique(keys)) == users * k
    got = np.bincount(keys % n, minlength=n) / users
    rng = np.random.default_rng(2)
    want = np.bincount(np.concatenate([rng.choice(n, k, replace=False, p=items["popularity"]) for _ in range(users)]),
                       minlength=n) / users
    assert np.abs(got - want).max() < 0.02


@pytest.mark.parametrize(
    "n_users,n_items,n_ratings",
    [(7, 5, 35), (10, 10, 10), (50, 40, 1_500), (300, 2_000, 2_000), (300, 2_000, 1_000), (4, 1, 4)],
    ids=["full", "one-each", "dense", "items-as-ratings", "fewer-ratings-than-items", "one-item"],
)
def test_exact_counts_at_the_edges(n_users, n_items, n_ratings):
    f = synthetic_frame(n_users, n_items, n_ratings, seed=1)
    assert len(f) == n_ratings and not f.duplicated(["user", "item"]).any()
    per_user = f.groupby("user").size()
    assert len(per_user) == n_users and per_user.max() <= n_items
    if n_ratings >= n_items:
        assert f["item"].nunique() == n_items
    else:
        assert f["item"].between(1, n_items).all() and f["item"].nunique() < n_items


def test_movielens_like():
    f = movielens_like()
    assert len(f) == 100_000
    assert f["user"].nunique() == f["user"].max() == 943 and f["item"].nunique() == f["item"].max() == 1682
    assert 3.0 < f["rating"].mean() < 4.0 and 0.8 < f["rating"].std() < 1.3
    pd.testing.assert_frame_equal(f, movielens_like(seed=0))


def test_the_default_million_ratings():
    # Speed is measured in benchmarks/, not asserted here; this checks the size at scale.
    f = synthetic_frame()
    assert len(f) == 1_000_000 and not f.duplicated(["user", "item"]).any()


def test_200m_ratings_stay_lazy():
    lazy = synthetic_ratings(1_400_000, 60_000, 200_000_000)
    assert 200 <= lazy.npartitions <= 1_400_000 // CHUNK_USERS + 1


def test_make_store(tmp_path):
    store = datasets.make_store(tmp_path / "s.zarr", n_users=500, n_items=100, n_ratings=5_000,
                                n_user_blocks=3, n_item_blocks=2)
    assert store.nnz == 5_000 and store.n_user_blocks == 3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_ratings": 0}, "n_ratings must be a positive integer, got 0"),
        ({"n_users": 2.5}, "n_users must be a positive integer, got 2.5"),
        ({"n_items": True}, "n_items must be a positive integer"),
        ({"n_users": 2, "n_items": 2, "n_ratings": 5}, "n_ratings=5 exceeds n_users \\* n_items = 4"),
        ({"n_users": 10, "n_items": 2, "n_ratings": 5}, "n_ratings=5 is below n_users=10"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"noise": -1.0}, "noise must be a finite nonnegative number"),
        ({"noise": float("nan")}, "noise must be a finite nonnegative number"),
        ({"item_exponent": -0.5}, "item_exponent must be a finite nonnegative number"),
        ({"user_exponent": "1"}, "user_exponent must be a finite nonnegative number"),
        ({"seed": -1}, "seed must be a nonnegative integer"),
        ({"partition_size": 0}, "partition_size must be a positive integer"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as error:
        synthetic_ratings(**{**SIZE, **kwargs})
    assert isinstance(error.value, blockals.InputError)
    assert str(error.value).count(". ") == 0 and str(error.value).endswith(".")
