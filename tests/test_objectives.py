"""Every mode against its documented objective, computed densely in the tests."""

from __future__ import annotations

import numpy as np
import pytest

import blockals
from blockals.kernels import init_factors
from reference import (
    biased_objective,
    dense_biased_als,
    dense_weighted_als,
    reg_counts,
    weighted_objective,
    weights_and_targets,
)
from test_model import random_ratings, to_frame

RANK = 3
WEIGHTED_MODES = {
    "explicit": {},
    "implicit": {"implicit": True, "alpha": 2.0},
    "wals": {"weighting": "wals", "unobserved_weight": 0.3},
}


@pytest.fixture(scope="module")
def data():
    R, M = random_ratings(25, 18, 0.3, seed=11)
    # Implicit mode reads negative values as confident zeros and zeros as nothing.
    R_implicit = np.where(M, np.round(R - 1.5), 0.0)
    return R, M, R_implicit


def ratings_for(mode, data):
    R, M, R_implicit = data
    return (R_implicit if mode == "implicit" else R), M


def fit(R, M, tmp_path, client, blocks=(3, 2), **params):
    store = blockals.ingest(to_frame(R, M), tmp_path / "r.zarr", n_user_blocks=blocks[0], n_item_blocks=blocks[1], overwrite=True)
    return blockals.ALS(rank=RANK, seed=1, dtype="float64", **params).fit(store, client)


def X0(n):
    return init_factors(np.arange(n), RANK, 1, "users", "float64")


@pytest.mark.parametrize("reg_scaling", ["count", "none"])
@pytest.mark.parametrize("mode", list(WEIGHTED_MODES))
def test_weighted_modes_match_dense_reference(mode, reg_scaling, data, client2, tmp_path):
    R, M = ratings_for(mode, data)
    model = fit(R, M, tmp_path, client2, max_iter=4, reg=0.1, reg_scaling=reg_scaling, **WEIGHTED_MODES[mode])
    W, T = weights_and_targets(R, M, mode, alpha=2.0, w0=0.3)
    wu, wi = reg_counts(R, M, mode, reg_scaling)
    X, Y = dense_weighted_als(W, T, X0(R.shape[0]), 4, 0.1, wu, wi)
    np.testing.assert_allclose(model.user_factors_, X, atol=1e-6)
    np.testing.assert_allclose(model.item_factors_, Y, atol=1e-6)
    # history_ reports the documented objective, evaluated here over every (user, item) pair.
    assert model.history_[-1]["loss"] == pytest.approx(weighted_objective(W, T, X, Y, 0.1, wu, wi), rel=1e-6)
    losses = [h["loss"] for h in model.history_]
    assert all(b <= a * (1 + 1e-10) for a, b in zip(losses, losses[1:]))


@pytest.mark.parametrize("reg_scaling", ["count", "none"])
def test_biased_matches_dense_reference(reg_scaling, data, client2, tmp_path):
    R, M, _ = data
    model = fit(R, M, tmp_path, client2, max_iter=4, reg=0.1, bias_reg=0.05, biases=True, reg_scaling=reg_scaling)
    wu, wi = reg_counts(R, M, "explicit", reg_scaling)
    X, Y, bu, bi, mu = dense_biased_als(R, M, X0(R.shape[0]), 4, 0.1, 0.05, wu, wi)
    np.testing.assert_allclose(model.user_factors_, X, atol=1e-6)
    np.testing.assert_allclose(model.user_bias_, bu, atol=1e-6)
    np.testing.assert_allclose(model.item_bias_, bi, atol=1e-6)
    assert model.global_mean_ == pytest.approx(mu)
    expected = biased_objective(R, M, X, Y, bu, bi, mu, 0.1, 0.05, wu, wi)
    assert model.history_[-1]["loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("mode", list(WEIGHTED_MODES))
def test_each_half_step_is_optimal(mode, data, client2, tmp_path):
    """After one iteration, the gradient of the objective vanishes in the factors just solved."""
    R, M = ratings_for(mode, data)
    model = fit(R, M, tmp_path, client2, max_iter=1, reg=0.2, **WEIGHTED_MODES[mode])
    W, T = weights_and_targets(R, M, mode, alpha=2.0, w0=0.3)
    wu, wi = reg_counts(R, M, mode, "count")
    X, Y = model.user_factors_, model.item_factors_
    # d/dX of sum W (T - X Y^T)^2 + reg sum w |x|^2, and the same in Y at (X0, Y).
    grad_X = -2 * (W * (T - X @ Y.T)) @ Y + 2 * 0.2 * wu[:, None] * X
    grad_Y = -2 * (W * (T - X0(R.shape[0]) @ Y.T)).T @ X0(R.shape[0]) + 2 * 0.2 * wi[:, None] * Y
    assert np.abs(grad_X).max() < 1e-8 * max(1, np.abs(W * T).max())
    assert np.abs(grad_Y).max() < 1e-8 * max(1, np.abs(W * T).max())


def test_implicit_equals_weighted_least_squares_over_all_entries(client2, tmp_path):
    # A small dense count matrix: every pair is a rating, zeros included.
    rng = np.random.default_rng(3)
    R = rng.poisson(1.0, (12, 9)).astype(float)
    M = np.ones_like(R, dtype=bool)
    model = fit(R, M, tmp_path, client2, max_iter=3, reg=0.05, implicit=True, alpha=4.0, reg_scaling="none")
    C = 1 + 4.0 * R
    P = (R > 0).astype(float)
    X = X0(12)
    for _ in range(3):  # brute force: each row's weighted least squares over all entries
        Y = np.stack([np.linalg.solve(X.T @ (C[:, i, None] * X) + 0.05 * np.eye(RANK), X.T @ (C[:, i] * P[:, i])) for i in range(9)])
        X = np.stack([np.linalg.solve(Y.T @ (C[u, :, None] * Y) + 0.05 * np.eye(RANK), Y.T @ (C[u] * P[u])) for u in range(12)])
    np.testing.assert_allclose(model.user_factors_, X, atol=1e-8)
    np.testing.assert_allclose(model.item_factors_, Y, atol=1e-8)


def test_biases_are_recovered_and_help(client2, tmp_path):
    rng = np.random.default_rng(5)
    n_u, n_i = 200, 150
    bu, bi = rng.normal(0, 0.8, n_u), rng.normal(0, 0.8, n_i)
    M = rng.random((n_u, n_i)) < 0.15
    R = np.where(M, 3.5 + bu[:, None] + bi[None, :] + rng.normal(0, 0.1, (n_u, n_i)), 0.0)
    test = rng.random((n_u, n_i)) < 0.2
    train = M & ~test
    store = blockals.ingest(to_frame(R, train), tmp_path / "r.zarr", n_user_blocks=3, n_item_blocks=2)
    biased = blockals.ALS(rank=1, max_iter=10, reg=0.01, biases=True, seed=0).fit(store, client2)
    plain = blockals.ALS(rank=1, max_iter=10, reg=0.01, seed=0).fit(store, client2)
    # The model's biases absorb the mean shift of its own global mean, so compare centred.
    assert np.corrcoef(biased.user_bias_, bu)[0, 1] > 0.99
    assert np.corrcoef(biased.item_bias_, bi)[0, 1] > 0.99
    u, i = np.nonzero(test & M)
    truth = 3.5 + bu[u] + bi[i]

    def rmse(model):
        return np.sqrt(np.nanmean((model.predict(u + 1000, i * 3) - truth) ** 2))

    assert rmse(biased) < rmse(plain)


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_cg_with_rank_steps_matches_cholesky(mode, data, client2, tmp_path):
    R, M = ratings_for(mode, data)
    exact = fit(R, M, tmp_path, client2, max_iter=5, reg=0.1, **WEIGHTED_MODES[mode])
    cg = fit(R, M, tmp_path, client2, max_iter=5, reg=0.1, solver="cg", cg_steps=RANK + 2, **WEIGHTED_MODES[mode])
    np.testing.assert_allclose(cg.user_factors_, exact.user_factors_, atol=1e-4)
    np.testing.assert_allclose(cg.item_factors_, exact.item_factors_, atol=1e-4)


def test_three_cg_steps_reach_cholesky_objective(client2, tmp_path):
    R, M = random_ratings(120, 80, 0.1, seed=8)
    R = np.where(M, np.round(R), 0)
    params = {"rank": 8, "max_iter": 10, "reg": 0.05, "implicit": True, "alpha": 1.0, "seed": 0, "dtype": "float64"}
    store = blockals.ingest(to_frame(R, M), tmp_path / "r.zarr", n_user_blocks=3, n_item_blocks=3)
    exact = blockals.ALS(**params).fit(store, client2).history_[-1]["loss"]
    cg = blockals.ALS(solver="cg", cg_steps=3, **params).fit(store, client2).history_[-1]["loss"]
    assert abs(cg - exact) <= 0.01 * exact


@pytest.mark.parametrize("mode", ["explicit", "implicit", "biased"])
def test_nonnegative_factors_satisfy_kkt(mode, data, client2, tmp_path):
    R, M = ratings_for("implicit" if mode == "implicit" else "explicit", data)
    params = {"implicit": True, "alpha": 2.0} if mode == "implicit" else {"biases": mode == "biased"}
    model = fit(R, M, tmp_path, client2, max_iter=3, reg=0.1, nonnegative=True, **params)
    X, Y = model.user_factors_, model.item_factors_
    assert (X >= 0).all() and (Y >= 0).all()
    # KKT of each user's last solve: zero gradient where x > 0, nonnegative where x = 0.
    if mode == "biased":
        mu, bu, bi = model.global_mean_, model.user_bias_, model.item_bias_
        E = np.where(M, R - mu - bu[:, None] - bi[None, :] - X @ Y.T, 0.0)
        grad = -2 * E @ Y + 2 * 0.1 * M.sum(1)[:, None] * X
        assert np.abs(-2 * E.sum(1) + 2 * 0.1 * M.sum(1) * bu).max() < 1e-6
    else:
        W, T = weights_and_targets(R, M, "implicit" if mode == "implicit" else "explicit", alpha=2.0)
        wu, _ = reg_counts(R, M, "implicit" if mode == "implicit" else "explicit", "count")
        grad = -2 * (W * (T - X @ Y.T)) @ Y + 2 * 0.1 * wu[:, None] * X
    scale = np.abs(grad).max() + 1
    assert np.where(X > 0, np.abs(grad), 0).max() < 1e-6 * scale
    assert grad[X == 0].min(initial=0) > -1e-6 * scale
    assert (X == 0).any()  # the constraint is active somewhere: the test exercises it


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"implicit": True, "alpha": 2.0},
        {"biases": True},
        {"weighting": "wals", "unobserved_weight": 0.3},
        {"nonnegative": True},
        {"solver": "cg", "cg_steps": 2},
    ],
    ids=["explicit", "implicit", "biased", "wals", "nonnegative", "cg"],
)
def test_every_mode_is_independent_of_blocks_and_workers(params, data, client, tmp_path):
    R, M = ratings_for("implicit" if params.get("implicit") else "explicit", data)
    one = fit(R, M, tmp_path, client, blocks=(1, 1), max_iter=3, reg=0.1, **params)
    many = fit(R, M, tmp_path / "b", client, blocks=(4, 3), max_iter=3, reg=0.1, **params)
    np.testing.assert_allclose(one.user_factors_, many.user_factors_, atol=1e-9)
    np.testing.assert_allclose(one.item_factors_, many.item_factors_, atol=1e-9)


def test_wals_with_given_weights(data, client2, tmp_path):
    R, M, _ = data
    rng = np.random.default_rng(2)
    row_w, col_w = rng.uniform(0.5, 2, R.shape[0]), 1.5
    model = fit(R, M, tmp_path, client2, max_iter=3, reg=0.1, reg_scaling="none", weighting="wals",
                unobserved_weight=0.2, row_weights=row_w, col_weights=col_w)
    W, T = weights_and_targets(R, M, "wals", w0=0.2, row_w=row_w, col_w=np.full(R.shape[1], col_w))
    ones_u, ones_i = np.ones(R.shape[0]), np.ones(R.shape[1])
    X, Y = dense_weighted_als(W, T, X0(R.shape[0]), 3, 0.1, ones_u, ones_i)
    np.testing.assert_allclose(model.user_factors_, X, atol=1e-6)
    assert model.history_[-1]["loss"] == pytest.approx(weighted_objective(W, T, X, Y, 0.1, ones_u, ones_i), rel=1e-6)


def test_init_options(data, client2, tmp_path):
    R, M, _ = data
    given = np.random.default_rng(4).standard_normal((R.shape[0], RANK))
    model = fit(R, M, tmp_path, client2, max_iter=2, reg=0.1, init=given)
    W, T = weights_and_targets(R, M, "explicit")
    wu, wi = reg_counts(R, M, "explicit", "count")
    X, _ = dense_weighted_als(W, T, given, 2, 0.1, wu, wi)
    np.testing.assert_allclose(model.user_factors_, X, atol=1e-6)
    uniform = fit(R, M, tmp_path, client2, max_iter=2, reg=0.1, init="uniform")
    X, _ = dense_weighted_als(W, T, init_factors(np.arange(R.shape[0]), RANK, 1, "users", "float64", "uniform"), 2, 0.1, wu, wi)
    np.testing.assert_allclose(uniform.user_factors_, X, atol=1e-6)
    with pytest.raises(blockals.InputError, match="init for users must be a finite array of shape"):
        fit(R, M, tmp_path, client2, max_iter=1, init=given[:-1])


@pytest.mark.parametrize(
    "params,match",
    [
        ({"alpha": -1.0}, "alpha must be at least 0"),
        ({"biases": True, "implicit": True}, "cannot be combined with implicit"),
        ({"weighting": "wals", "implicit": True}, "weighting='wals' is its own objective"),
        ({"nonnegative": True, "solver": "cg"}, "use solver='cholesky'"),
        ({"cg_steps": 0, "solver": "cg"}, "cg_steps must be at least 1"),
        ({"weighting": "tf"}, "weighting must be one of"),
        ({"row_weights": "rows", "weighting": "wals"}, "row_weights must be 'counts'"),
        ({"init": "zeros"}, "init must be one of"),
        ({"bias_reg": -0.1, "biases": True}, "bias_reg must be at least 0"),
    ],
)
def test_mode_parameters_validated(params, match, data):
    R, M, _ = data
    with pytest.raises(blockals.InputError, match=match):
        blockals.ALS(**params).fit(to_frame(R, M))


@pytest.mark.parametrize("reg_scaling", ["count", "none"])
@pytest.mark.parametrize("extra", [{"nonnegative": True}, {"solver": "cg", "cg_steps": 2}], ids=["nonnegative", "cg"])
@pytest.mark.parametrize("mode", list(WEIGHTED_MODES))
def test_reported_loss_is_the_formula_for_constrained_and_approximate_solves(mode, extra, reg_scaling, data, client2, tmp_path):
    R, M = ratings_for(mode, data)
    model = fit(R, M, tmp_path, client2, max_iter=3, reg=0.1, reg_scaling=reg_scaling, **WEIGHTED_MODES[mode], **extra)
    W, T = weights_and_targets(R, M, mode, alpha=2.0, w0=0.3)
    wu, wi = reg_counts(R, M, mode, reg_scaling)
    expected = weighted_objective(W, T, model.user_factors_, model.item_factors_, 0.1, wu, wi)
    assert model.history_[-1]["loss"] == pytest.approx(expected, rel=1e-6)


def test_biased_half_step_is_optimal(data, client2, tmp_path):
    R, M, _ = data
    model = fit(R, M, tmp_path, client2, max_iter=2, reg=0.1, bias_reg=0.03, biases=True)
    X, Y, bu, bi, mu = model.user_factors_, model.item_factors_, model.user_bias_, model.item_bias_, model.global_mean_
    E = np.where(M, R - mu - bu[:, None] - bi[None, :] - X @ Y.T, 0.0)
    n = M.sum(1)
    assert np.abs(-2 * E @ Y + 2 * 0.1 * n[:, None] * X).max() < 1e-8
    assert np.abs(-2 * E.sum(1) + 2 * 0.03 * n * bu).max() < 1e-8
