"""The half-step core: one block solved against fixed routed rows, for every mode, against
per-row dense solves and loss formulas written here."""

from __future__ import annotations

import numpy as np
import pytest

import blockals
from blockals import kernels
from blockals.halfstep import gram, routed_rows, solve_block
from blockals.params import parse_params
from blockals.routing import build_inblock

N_ROWS, N_SRC, RANK = 9, 14, 3
MODES = {
    "explicit": {},
    "biased": {"biases": True, "bias_reg": 0.3},
    "implicit": {"implicit": True, "alpha": 2.0},
    "wals": {"weighting": "wals", "unobserved_weight": 0.2},
    "nonnegative": {"nonnegative": True},
    "cg": {"solver": "cg", "cg_steps": 3 * (RANK + 1)},
}


@pytest.fixture(scope="module")
def block():
    """A destination block (one row without ratings) and the whole other side."""
    rng = np.random.default_rng(4)
    counts = rng.integers(1, 8, N_ROWS)
    counts[4] = 0
    dst = np.repeat(np.arange(N_ROWS), counts)
    src = np.concatenate([rng.choice(N_SRC, c, replace=False) for c in counts])
    rating = np.round(rng.normal(1.0, 2.0, dst.size)) / 2
    Y = rng.standard_normal((N_SRC, RANK))
    extra = rng.random(N_SRC) + 0.5  # the other side's carried column: a bias or a WALS weight
    return dst, src, rating, Y, extra


def dense(dst, src, rating, Y, extra, mode, reg):
    """Each row's system, written from the objectives' formulas, solved densely."""
    w0, alpha, bias_reg, mu = 0.2, 2.0, 0.3, 0.7
    own_weights = np.arange(1, N_ROWS + 1) / 3.0
    k = RANK
    X = np.zeros((N_ROWS, k + (mode in ("biased", "wals"))))
    for u in range(N_ROWS):
        m = dst == u
        y, r = Y[src[m]], rating[m]
        if mode == "biased":
            D, t = np.hstack([y, np.ones((y.shape[0], 1))]), r - mu - extra[src[m]]
            ridge = np.r_[np.full(k, reg), bias_reg] * m.sum()
            A, b = D.T @ D + np.diag(ridge), D.T @ t
        elif mode == "implicit":
            c, p = 1 + alpha * np.abs(r), (r > 0) * 1.0
            A = Y.T @ Y + y.T @ ((c - 1)[:, None] * y) + reg * (r > 0).sum() * np.eye(k)
            b = y.T @ (c * p)
        elif mode == "wals":
            a = own_weights[u] * extra[src[m]]
            A = w0 * Y.T @ Y + y.T @ (a[:, None] * y) + reg * m.sum() * np.eye(k)
            b = y.T @ ((w0 + a) * r)
        else:
            A, b = y.T @ y + reg * m.sum() * np.eye(k), y.T @ r
        if not m.any() and mode != "wals" and mode != "implicit":
            continue
        if mode == "nonnegative":
            from scipy.optimize import nnls

            L = np.linalg.cholesky(A)
            X[u] = nnls(L.T, np.linalg.solve(L, b))[0]
        else:
            x = np.linalg.solve(A, b)
            X[u, : x.size] = x
        if mode == "wals":
            X[u, k] = own_weights[u]
    return X


@pytest.mark.parametrize("mode", list(MODES))
def test_solve_block_equals_dense_per_row_solves(block, mode):
    dst, src, rating, Y, extra = block
    reg = 0.15
    config = parse_params({"rank": RANK, "reg": reg, "dtype": "float64", **MODES[mode]}).config
    obj = config.objective(0.7)
    inblock = build_inblock(dst, np.zeros_like(src), src, rating, N_ROWS, 1)
    carried = np.hstack([Y, extra[:, None]]) if obj.width > RANK else Y
    weights = np.arange(1, N_ROWS + 1) / 3.0 if mode == "wals" else None
    G = gram(carried, RANK) if obj.gram_weight else None
    previous = np.full((N_ROWS, obj.width), 0.1)  # CG and NNLS start here
    solved = solve_block(inblock, carried[inblock.need_rows], obj, config, G=G, previous=previous, weights=weights)

    expected = dense(dst, src, rating.astype(np.float32).astype(np.float64), Y, extra, mode, reg)
    if mode == "implicit" or mode == "wals":
        expected[4] = 0.0  # a row without ratings is left at zero, whatever G says
        expected[4, RANK:] = solved.factors[4, RANK:]
    np.testing.assert_allclose(solved.factors, expected, atol=1e-7)

    # Loss terms: the objective's sums at the solved factors, from the formulas.
    X, k = solved.factors, RANK
    r = rating.astype(np.float32).astype(np.float64)
    s = np.einsum("pj,pj->p", X[dst, :k], Y[src])
    w = np.bincount(dst, minlength=N_ROWS).astype(float)
    if mode == "biased":
        pred = s + X[dst, k] + extra[src]
        observed = np.sum((r - 0.7 - pred) ** 2)
        sq_err = observed
        penalty = reg * w @ (X[:, :k] ** 2).sum(1) + 0.3 * w @ X[:, k] ** 2
    elif mode == "implicit":
        c, p = 1 + 2.0 * np.abs(r), (r > 0) * 1.0
        observed = np.sum(c * (p - s) ** 2 - s**2)  # the all-pairs part s^2 lives in the Gram term
        sq_err = np.sum((p - s) ** 2)
        w = np.bincount(dst[r > 0], minlength=N_ROWS).astype(float)
        penalty = reg * w @ (X[:, :k] ** 2).sum(1)
    elif mode == "wals":
        W = 0.2 + X[dst, k] * extra[src]
        observed = np.sum(W * (r - s) ** 2 - 0.2 * s**2)
        sq_err = np.sum((r - s) ** 2)
        penalty = reg * w @ (X[:, :k] ** 2).sum(1)
    else:
        observed = sq_err = np.sum((r - s) ** 2)
        penalty = reg * w @ (X[:, :k] ** 2).sum(1)
    terms = solved.terms
    assert terms.observed == pytest.approx(observed, rel=1e-9)
    assert terms.sq_err == pytest.approx(sq_err, rel=1e-9)
    assert terms.penalty == pytest.approx(penalty, rel=1e-9)
    if obj.gram_weight:
        np.testing.assert_allclose(terms.gram, X[:, :k].T @ X[:, :k], rtol=1e-12)
    else:
        assert terms.gram is None


@pytest.mark.parametrize("whole", [(False, False, False), (True, False, True), (True, True, True)],
                         ids=["slices", "mixed", "whole"])
def test_routed_rows_point_every_rating_at_its_source_row(whole):
    """Messages are slices ``Y_j[out(j -> b)]`` or whole blocks ``Y_j``; either way the
    rating's row of the concatenation is its source row's factors."""
    rng = np.random.default_rng(8)
    sizes = [6, 4, 5]  # source block 1 sends nothing: its message is missing, not empty
    blocks = [rng.standard_normal((n, RANK)) for n in sizes]
    dst = np.repeat(np.arange(4), 3)
    src_block = np.array([0, 2, 0, 2, 2, 0, 0, 2, 0, 2, 0, 2])
    src_local = np.array([5, 1, 2, 4, 0, 0, 3, 1, 1, 3, 4, 2])
    inblock = build_inblock(dst, src_block, src_local, np.ones(dst.size), 4, 3)
    messages = [blocks[j] if whole[j] else blocks[j][inblock.out_block(j)] for j in (0, 2)]
    M = routed_rows(inblock, messages, np.array(whole), RANK, "float64")
    order = np.lexsort((src_local, src_block, dst))  # the in-block's rating order
    expected = np.stack([blocks[j][i] for j, i in zip(src_block[order], src_local[order])])
    np.testing.assert_array_equal(M[inblock.col], expected)


def test_routed_rows_of_a_block_without_ratings():
    inblock = build_inblock(np.zeros(0, int), np.zeros(0, int), np.zeros(0, int), np.zeros(0), 2, 3)
    M = routed_rows(inblock, [], np.zeros(3, bool), 4, "float32")
    assert M.shape == (0, 4) and M.dtype == np.float32


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_an_ingested_item_block_built_in_tiles_equals_dense_solves(mode, tmp_path, monkeypatch):
    # Items rated by thousands of users, as at scale; tiles of 50 routed rows and groups of
    # 2 rows make the solve take the tiled build on a block this small.
    rng = np.random.default_rng(7)
    n_users, n_items, reg = 3000, 12, 0.1
    mask = rng.random((n_users, n_items)) < 0.5
    mask[:, 0] = True  # every user has a rating, so global user index = id
    users, items = np.nonzero(mask)
    rating = rng.integers(1, 11, users.size) / 2.0
    store = blockals.ingest((users, items, rating), tmp_path / "r.zarr", n_user_blocks=3, n_item_blocks=2)
    inblock = store.inblock("items", 0)
    Y = rng.standard_normal((n_users, RANK))
    messages = [Y[store.rows("users", j)] for j in range(store.n_user_blocks)]
    M = routed_rows(inblock, messages, np.ones(store.n_user_blocks, dtype=bool), RANK, "float64")
    monkeypatch.setattr(kernels, "TILE_BYTES", 50 * RANK * 8)
    monkeypatch.setattr(kernels, "TILED_ABOVE_BYTES", 50 * RANK * 8)
    monkeypatch.setattr(kernels, "GROUP_BYTES", 2 * (RANK * RANK * 8 + 8 * RANK))
    monkeypatch.setattr(kernels, "TILE_MIN_RATINGS", 1)
    config = parse_params({"rank": RANK, "reg": reg, "dtype": "float64", **MODES[mode]}).config
    obj = config.objective(float(store.stats["rating_mean"]))
    G = gram(Y, RANK) if obj.gram_weight else None
    arrays = obj.systems(inblock, M, G, None).kernel_arrays()
    assert kernels._tiling(arrays, np.flatnonzero(inblock.counts)) == (50, 2)

    solved = solve_block(inblock, M, obj, config, G=G)
    expected = np.zeros((inblock.n_rows, RANK))
    for row, item in enumerate(store.rows("items", 0)):
        y, r = Y[mask[:, item]], rating[items == item]  # users in increasing order either way
        if mode == "implicit":
            c, p = 1 + 2.0 * np.abs(r), (r > 0) * 1.0
            A, b = Y.T @ Y + y.T @ ((c - 1)[:, None] * y) + reg * (r > 0).sum() * np.eye(RANK), y.T @ (c * p)
        else:
            A, b = y.T @ y + reg * r.size * np.eye(RANK), y.T @ r
        expected[row] = np.linalg.solve(A, b)
    np.testing.assert_allclose(solved.factors, expected, atol=1e-9)
