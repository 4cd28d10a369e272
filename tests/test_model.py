"""The ALS estimator against a dense NumPy reference and Spark's synthetic targets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import blockals
from blockals.kernels import init_factors
from reference import dense_explicit_als, explicit_objective


def random_ratings(n_users, n_items, density, seed):
    """A random sparse matrix with every row and column rated at least once."""
    rng = np.random.default_rng(seed)
    M = rng.random((n_users, n_items)) < density
    M[np.arange(n_users), rng.integers(0, n_items, n_users)] = True
    M[rng.integers(0, n_users, n_items), np.arange(n_items)] = True
    R = np.where(M, rng.integers(1, 11, (n_users, n_items)) / 2.0, 0.0)
    return R, M


def to_frame(R, M, user_offset=1000, item_offset=0):
    u, i = np.nonzero(M)
    # Shuffled rows, ids that are not row numbers: the model must map ids itself.
    order = np.random.default_rng(0).permutation(u.size)
    return pd.DataFrame({"user": u[order] + user_offset, "item": i[order] * 3 + item_offset, "rating": R[u, i][order]})


@pytest.fixture(scope="module")
def small():
    return random_ratings(30, 20, 0.3, seed=1)


@pytest.mark.parametrize("blocks", [(1, 1), (3, 2), (7, 5)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("reg_scaling", ["count", "none"])
def test_matches_dense_reference(small, blocks, reg_scaling, client, tmp_path):
    R, M = small
    store = blockals.ingest(to_frame(R, M), tmp_path / "r.zarr", n_user_blocks=blocks[0], n_item_blocks=blocks[1])
    reg = 0.1
    model = blockals.ALS(rank=4, max_iter=5, reg=reg, reg_scaling=reg_scaling, seed=3, dtype="float64").fit(store, client)

    X0 = init_factors(np.arange(R.shape[0]), 4, 3, "users", "float64")
    X, Y = dense_explicit_als(R, M, X0, 5, reg, reg_scaling)
    np.testing.assert_allclose(model.user_factors_, X, atol=1e-4)
    np.testing.assert_allclose(model.item_factors_, Y, atol=1e-4)
    np.testing.assert_array_equal(model.user_ids_, np.arange(R.shape[0]) + 1000)
    np.testing.assert_array_equal(model.item_ids_, np.arange(R.shape[1]) * 3)
    # history_ reports the objective at the end of each iteration, as the formula gives it.
    assert len(model.history_) == 5
    expected = explicit_objective(R, M, X, Y, reg, reg_scaling)
    assert model.history_[-1]["loss"] == pytest.approx(expected, rel=1e-6)
    rmse = np.sqrt(((np.where(M, R - X @ Y.T, 0)) ** 2).sum() / M.sum())
    assert model.history_[-1]["train_rmse"] == pytest.approx(rmse, rel=1e-6)


def test_float32_close_to_reference(small, client2, tmp_path):
    R, M = small
    model = blockals.ALS(rank=4, max_iter=5, reg=0.1, seed=3).fit(
        blockals.ingest(to_frame(R, M), tmp_path / "r.zarr", n_user_blocks=3, n_item_blocks=2), client2
    )
    assert model.user_factors_.dtype == np.float32
    X, Y = dense_explicit_als(R, M, init_factors(np.arange(30), 4, 3, "users", "float64"), 5, 0.1)
    np.testing.assert_allclose(model.user_factors_ @ model.item_factors_.T, X @ Y.T, atol=2e-3)


def test_objective_never_increases(client2, tmp_path):
    R, M = random_ratings(80, 60, 0.15, seed=5)
    model = blockals.ALS(rank=6, max_iter=8, reg=0.05, seed=0, dtype="float64").fit(
        blockals.ingest(to_frame(R, M), tmp_path / "r.zarr", n_user_blocks=4, n_item_blocks=3), client2
    )
    losses = [h["loss"] for h in model.history_]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0]


def spark_test_data(n_users, n_items, rank, noise, seed):
    """Spark ALSSuite's genExplicitTestData: factors from U(-1, 1), 60% train, 30% test."""
    rng = np.random.default_rng(seed)
    U = rng.uniform(-1, 1, (n_users, rank))
    V = rng.uniform(-1, 1, (n_items, rank))
    x = rng.random((n_users, n_items))
    truth = U @ V.T
    u, i = np.nonzero(x < 0.6)
    train = pd.DataFrame({"user": u, "item": i, "rating": truth[u, i] + noise * rng.standard_normal(u.size)})
    u, i = np.nonzero((x >= 0.6) & (x < 0.9))
    test = pd.DataFrame({"user": u, "item": i, "rating": truth[u, i]})
    return train, test


BLOCK_SPLITS = [(1, 1), (2, 3), (4, 5)]


@pytest.mark.parametrize("blocks", BLOCK_SPLITS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize(
    "rank,noise,max_iter,reg,target",
    # Spark's suite asserts these after 1 and 4 iterations on its own draw; on other draws
    # Spark itself needs more (0.33 after one iteration on this one), so the targets are
    # checked once ALS has converged.
    [(1, 0.0, 10, 1e-5, 0.001), (2, 0.01, 20, 0.01, 0.03)],
    ids=["rank1-exact", "rank2-noisy"],
)
def test_spark_synthetic_targets(blocks, rank, noise, max_iter, reg, target, client2, tmp_path):
    train, test = spark_test_data(20, 40, rank, noise, seed=0)
    store = blockals.ingest(train, tmp_path / "r.zarr", n_user_blocks=blocks[0], n_item_blocks=blocks[1])
    model = blockals.ALS(rank=rank, max_iter=max_iter, reg=reg, seed=0, dtype="float64").fit(store, client2)
    pred = model.predict(test["user"], test["item"])
    assert not np.isnan(pred).any()
    rmse = np.sqrt(np.mean((pred - test["rating"].to_numpy()) ** 2))
    assert rmse < target


@pytest.mark.parametrize("blocks", BLOCK_SPLITS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("rank", [1, 2])
def test_fully_observed_low_rank_is_exact_after_one_iteration(blocks, rank, client2, tmp_path):
    # Closed form: with every entry of R = U V^T observed and reg -> 0, the item step
    # gives Y spanning V's columns and the user step then reproduces R exactly.
    rng = np.random.default_rng(4)
    R = rng.uniform(-1, 1, (20, rank)) @ rng.uniform(-1, 1, (40, rank)).T
    M = np.ones_like(R, dtype=bool)
    store = blockals.ingest(to_frame(R, M), tmp_path / "r.zarr", n_user_blocks=blocks[0], n_item_blocks=blocks[1])
    model = blockals.ALS(rank=rank, max_iter=1, reg=1e-10, seed=0, dtype="float64").fit(store, client2)
    assert model.history_[0]["train_rmse"] < 1e-6


def test_fit_accepts_a_dataframe_and_predicts_by_id(client2):
    df = pd.DataFrame({"user": ["ann", "bob", "ann", "cid"], "item": [10, 10, 20, 20], "rating": [5.0, 3.0, 4.0, 1.0]})
    model = blockals.ALS(rank=2, max_iter=3, reg=0.01, dtype="float64").fit(df, client2)
    assert list(model.user_ids_) == ["ann", "bob", "cid"]
    pred = model.predict(["ann", "zed", "cid"], [10, 10, 99])
    assert np.isfinite(pred[0]) and np.isnan(pred[1]) and np.isnan(pred[2])
    np.testing.assert_array_equal(model.predict(["ann", "zed", "cid"], [10, 10, 99], cold_start="drop"), pred[:1])
    with pytest.raises(blockals.InputError, match="cold_start must be one of"):
        model.predict(["ann"], [10], cold_start="zero")
    manual = model.user_factors_[0].astype(float) @ model.item_factors_[0].astype(float)
    assert pred[0] == pytest.approx(manual)


def test_save_load_roundtrip(small, client2, tmp_path):
    R, M = small
    model = blockals.ALS(rank=3, max_iter=2, seed=1).fit(blockals.ingest(to_frame(R, M), tmp_path / "r.zarr"), client2)
    model.save(tmp_path / "model")
    loaded = blockals.ALS.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.user_factors_, model.user_factors_)
    np.testing.assert_array_equal(loaded.item_ids_, model.item_ids_)
    assert loaded.history_ == model.history_
    assert loaded.get_params() == model.get_params()
    users, items = to_frame(R, M)[["user", "item"]].to_numpy().T
    np.testing.assert_array_equal(loaded.predict(users, items), model.predict(users, items))


@pytest.mark.parametrize(
    "params,match",
    [
        ({"rank": 0}, "rank must be at least 1"),
        ({"rank": 2.5}, "rank must be an integer"),
        ({"reg": -1.0}, "reg must be at least 0"),
        ({"reg": float("nan")}, "reg must be a finite number"),
        ({"max_iter": 0}, "max_iter must be at least 1"),
        ({"reg_scaling": "rows"}, "reg_scaling must be one of"),
        ({"solver": "magic"}, "solver must be one of"),
        ({"dtype": "float16"}, "dtype must be one of"),
        ({"seed": -3}, "seed must be at least 0"),
    ],
)
def test_parameters_validated_in_fit(params, match, small, tmp_path):
    R, M = small
    model = blockals.ALS(**params)  # __init__ only stores
    with pytest.raises(blockals.InputError, match=match):
        model.fit(to_frame(R, M))
