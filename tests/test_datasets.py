"""The synthetic generator: deterministic, partition-independent, shaped like rating data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import blockals
from blockals.datasets import movielens_like, planted_model, synthetic_frame, synthetic_ratings

SIZE = dict(n_users=3000, n_items=800, n_ratings=60_000)


@pytest.fixture(scope="module")
def frame():
    return synthetic_frame(**SIZE, seed=3, noise=0.1)


def canonical(f: pd.DataFrame) -> pd.DataFrame:
    return f.sort_values(["user", "item"]).reset_index(drop=True)


def test_deterministic_and_independent_of_partitioning(frame):
    again = synthetic_frame(**SIZE, seed=3, noise=0.1, partition_size=7_000)
    pd.testing.assert_frame_equal(canonical(frame), canonical(again))
    other = synthetic_frame(**SIZE, seed=4, noise=0.1)
    assert not canonical(frame)[["user", "item"]].equals(canonical(other)[["user", "item"]])


def test_lazy_partitions():
    # Partitions hold whole chunks of 1024 users: 3000 users make at most 3.
    assert synthetic_ratings(**SIZE, partition_size=10_000).npartitions == 3
    lazy = synthetic_ratings(**SIZE)
    assert lazy.npartitions == 1
    assert list(lazy.columns) == ["user", "item", "rating", "timestamp"]


def test_shape_of_the_data(frame):
    assert len(frame) == SIZE["n_ratings"]
    assert not frame.duplicated(["user", "item"]).any()
    assert frame["user"].between(1, SIZE["n_users"]).all() and frame["item"].between(1, SIZE["n_items"]).all()
    assert frame["user"].nunique() == SIZE["n_users"]  # everyone rated something
    assert set(np.unique(frame["rating"])) <= set(np.arange(1, 11) / 2)
    assert frame["rating"].dtype == np.float32 and frame["user"].dtype == np.int64
    # Power laws: the most active tenth of users, and the most popular tenth of items,
    # hold far more than a tenth of the ratings.
    users = frame.groupby("user").size().sort_values(ascending=False)
    items = frame.groupby("item").size().sort_values(ascending=False)
    assert users.iloc[: len(users) // 10].sum() > 0.3 * len(frame)
    assert items.iloc[: len(items) // 10].sum() > 0.3 * len(frame)
    # Activity is not sorted by id: ids carry no information about rank.
    assert abs(np.corrcoef(users.index, users.to_numpy())[0, 1]) < 0.2


def test_ratings_follow_the_planted_model(frame):
    truth = planted_model(SIZE["n_users"], SIZE["n_items"], rank=8, seed=3)
    u, i = frame["user"].to_numpy() - 1, frame["item"].to_numpy() - 1
    mean = (truth["mu"] + truth["user_bias"][u] + truth["item_bias"][i]
            + np.einsum("ij,ij->i", truth["user_factors"][u], truth["item_factors"][i]))
    inside = (mean > 0.75) & (mean < 4.75)  # away from the clipping at 0.5 and 5
    assert np.corrcoef(mean[inside], frame["rating"].to_numpy()[inside])[0, 1] > 0.8


def test_movielens_like():
    f = movielens_like()
    assert len(f) == 100_000 and f["user"].nunique() == 943 and f["item"].max() == 1682


def test_make_store(tmp_path):
    store = blockals.datasets.make_store(tmp_path / "s.zarr", n_users=500, n_items=100, n_ratings=5_000,
                                         n_user_blocks=3, n_item_blocks=2)
    assert store.nnz == 5_000 and store.n_user_blocks == 3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_ratings": 0}, "n_ratings must be a positive integer"),
        ({"n_users": 2, "n_items": 2, "n_ratings": 5}, "exceeds n_users \\* n_items"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"noise": -1.0}, "noise must be a nonnegative number"),
        ({"partition_size": 0}, "partition_size must be a positive integer"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(blockals.InputError, match=match):
        synthetic_ratings(**{**SIZE, **kwargs})
