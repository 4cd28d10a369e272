"""Block kernels against per-row dense solves written here."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from blockals import kernels
from blockals.kernels import RowSystems, init_factors, solve_cg, solve_cholesky, solve_nnls
from blockals.objectives import Objective
from blockals.routing import build_inblock


def solve_explicit(inblock, Y, reg, reg_scaling, batch_bytes=2**25):
    systems = Objective(Y.shape[1], reg, reg_scaling).systems(inblock, Y, None, None)
    return solve_cholesky(systems, batch_bytes=batch_bytes).X


def random_block(n_rows, n_src, rank, seed, heavy=0, empty=0):
    """An in-block with one source block, random counts (some heavy, some empty rows)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 12, n_rows)
    counts[:heavy] = rng.integers(n_src // 2, n_src, heavy)
    counts[heavy : heavy + empty] = 0
    dst = np.repeat(np.arange(n_rows), counts)
    src = np.concatenate([rng.choice(n_src, c, replace=False) for c in counts])
    rating = rng.integers(1, 11, dst.size) / 2.0
    inblock = build_inblock(dst, np.zeros_like(src), src, rating, n_rows, 1)
    Y_src = rng.standard_normal((n_src, rank))
    return inblock, Y_src[inblock.need_rows], (dst, src, rating), Y_src


def per_row_solution(n_rows, triples, Y_src, reg, reg_scaling):
    dst, src, rating = triples
    k = Y_src.shape[1]
    X = np.zeros((n_rows, k))
    for u in range(n_rows):
        m = dst == u
        if not m.any():
            continue
        F = Y_src[src[m]]
        w = m.sum() if reg_scaling == "count" else 1
        X[u] = np.linalg.solve(F.T @ F + reg * w * np.eye(k), F.T @ rating[m])
    return X


@pytest.mark.parametrize("reg_scaling", ["count", "none"])
@pytest.mark.parametrize("batch_bytes", [2**10, 2**25], ids=["tiny-batches", "default-batches"])
def test_solve_explicit_equals_per_row_solves(reg_scaling, batch_bytes):
    inblock, Y, triples, Y_src = random_block(300, 200, 8, seed=0, heavy=5, empty=7)
    X = solve_explicit(inblock, Y, 0.3, reg_scaling, batch_bytes=batch_bytes)
    np.testing.assert_allclose(X, per_row_solution(300, triples, Y_src, 0.3, reg_scaling), atol=1e-10)
    assert not X[5:12].any()  # rows without ratings stay zero


def test_float32_messages_give_float32_factors():
    inblock, Y, triples, Y_src = random_block(50, 40, 4, seed=1)
    X = solve_explicit(inblock, Y.astype(np.float32), 0.1, "count")
    assert X.dtype == np.float32
    np.testing.assert_allclose(X, per_row_solution(50, triples, Y_src, 0.1, "count"), rtol=1e-3, atol=1e-4)


def test_singular_rows_get_the_minimum_norm_solution():
    # reg = 0 and fewer ratings than rank: infinitely many minimizers.
    inblock, Y, (dst, src, rating), Y_src = random_block(20, 30, 16, seed=2)
    X = solve_explicit(inblock, Y, 0.0, "none")
    assert np.isfinite(X).all()
    for u in range(20):
        m = dst == u
        expected = np.linalg.lstsq(Y_src[src[m]], rating[m], rcond=None)[0]
        np.testing.assert_allclose(X[u], expected, atol=1e-8)


def shuffled_within_rows(inblock, seed):
    """The same in-block with each row's ratings in a random order."""
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(inblock.nnz), inblock.row))
    return dataclasses.replace(inblock, src_block=inblock.src_block[order], src_index=inblock.src_index[order],
                               rating=inblock.rating[order])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("tile_rows,group_rows", [(7, 5), (64, 40), (500, 7)])
def test_tiled_build_equals_per_row_solves(tile_rows, group_rows, dtype, monkeypatch):
    # Long rows reading many routed rows, as an item block at scale; tiles of a few routed
    # rows and small row groups force the tiled build onto a small block.
    rank, reg = 6, 0.3
    inblock, Y, (dst, src, rating), Y_src = random_block(40, 2000, rank, seed=6, heavy=30, empty=3)
    size = np.dtype(dtype).itemsize
    monkeypatch.setattr(kernels, "TILE_BYTES", tile_rows * rank * size)
    monkeypatch.setattr(kernels, "GROUP_BYTES", group_rows * (rank * rank * size + 8 * rank))
    monkeypatch.setattr(kernels, "TILED_ABOVE_BYTES", tile_rows * rank * size)
    monkeypatch.setattr(kernels, "TILE_MIN_RATINGS", 1)
    expected = per_row_solution(40, (dst, src, rating), Y_src, reg, "count")
    tol = {"atol": 1e-10} if dtype == np.float64 else {"rtol": 1e-3, "atol": 1e-4}
    for block, tiled in ((inblock, True), (shuffled_within_rows(inblock, 1), False)):
        systems = Objective(rank, reg, "count").systems(block, Y.astype(dtype), None, None)
        rows = np.flatnonzero(block.counts)
        assert kernels._tiling(systems.kernel_arrays(), rows) == ((tile_rows, group_rows) if tiled else None)
        solution = solve_cholesky(systems, loss=True)
        np.testing.assert_allclose(solution.X, expected, **tol)
        # The loss at the factors as stored, summed tile by tile.
        s = np.einsum("pk,pk->p", Y_src[src].astype(dtype).astype(np.float64), solution.X[dst].astype(np.float64))
        sq_err = float(((rating.astype(np.float32).astype(np.float64) - s) ** 2).sum())
        assert solution.sq_err == pytest.approx(sq_err, rel=1e-9)
        assert solution.observed == pytest.approx(sq_err, rel=1e-9)


@pytest.mark.parametrize("steps", [8, 12])
def test_cg_with_rank_steps_equals_the_exact_solve(steps):
    inblock, Y, triples, Y_src = random_block(200, 100, 8, seed=4, heavy=3)
    systems = Objective(8, 0.2, "count").systems(inblock, Y, None, None)
    x0 = np.random.default_rng(1).standard_normal((200, 8))
    np.testing.assert_allclose(solve_cg(systems, x0, steps).X, per_row_solution(200, triples, Y_src, 0.2, "count"), atol=1e-6)


@pytest.mark.parametrize("reg_scaling", ["count", "none"])
def test_solves_report_the_loss_at_their_solution(reg_scaling):
    inblock, Y, (dst, src, rating), Y_src = random_block(40, 30, 3, seed=3)
    obj = Objective(3, 0.5, reg_scaling)
    solution = solve_cholesky(obj.systems(inblock, Y, None, None), batch_bytes=2**10, loss=True)
    X = solution.X
    sse = sum((r - X[u] @ Y_src[i]) ** 2 for u, i, r in zip(dst, src, rating))
    assert solution.observed == pytest.approx(sse, rel=1e-10)
    assert solution.sq_err == pytest.approx(sse, rel=1e-10)
    w = np.bincount(dst, minlength=40) if reg_scaling == "count" else np.ones(40)
    assert obj.penalty(X, inblock) == pytest.approx(0.5 * float(w @ (X**2).sum(1)))


def test_init_is_unit_norm_isotropic_and_a_function_of_the_row():
    X = init_factors(np.arange(20_000), 8, seed=5, side="users", dtype="float64")
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-12)
    # A uniform point on the sphere has mean 0 and covariance I / k.
    assert np.abs(X.mean(0)).max() < 0.01
    np.testing.assert_allclose(np.cov(X.T), np.eye(8) / 8, atol=0.01)
    rows = np.array([19_999, 3, 12_345])
    np.testing.assert_array_equal(init_factors(rows, 8, 5, "users", "float64"), X[rows])
    assert not np.allclose(init_factors(rows, 8, 6, "users", "float64"), X[rows])
    assert not np.allclose(init_factors(rows, 8, 5, "items", "float64"), X[rows])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weighted_wide_systems_equal_dense_solves(dtype):
    # Rank 64 with per-rating weights and a shared G (the implicit form), counts 1..150:
    # every remainder of the four-ratings-per-pass Gram loop, short and long rows.
    inblock, Y, (dst, src, rating), Y_src = random_block(150, 160, 64, seed=7, heavy=20)
    rng = np.random.default_rng(8)
    a = rng.random(inblock.nnz) * 3
    G = Y_src.T @ Y_src / 10
    reg = np.full((150, 64), 0.4)
    beta = inblock.rating.astype(np.float64) * 2
    systems = RowSystems(inblock=inblock, D=Y.astype(dtype), col=inblock.col, beta=beta, a=a, G=G, reg=reg, gamma=beta,
                         tau=beta)
    # The in-block sorts each row's ratings by source; the same order as (dst, src) sorted.
    order = np.lexsort((src, dst))
    expected = np.zeros((150, 64))
    for u in range(150):
        in_row = dst[order] == u
        m = order[in_row]
        F = Y_src[src[m]].astype(dtype).astype(np.float64)
        wts = a[np.flatnonzero(in_row)]
        A = G + F.T @ (wts[:, None] * F) + 0.4 * np.eye(64)
        expected[u] = np.linalg.solve(A, F.T @ (2 * rating[m]))
    tol = 1e-3 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(solve_cholesky(systems).X, expected, rtol=tol, atol=tol)
    x0 = rng.standard_normal((150, 64))
    np.testing.assert_allclose(solve_cg(systems, x0, 100).X, expected, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("width", [1, 7, 10])
@pytest.mark.parametrize("weighted", [False, True], ids=["unit-weights", "weighted"])
def test_every_solver_reports_its_loss_for_any_row_length(width, weighted):
    # Every remainder of the four-ratings-per-pass loop, rows either side of the GEMM
    # threshold and of its chunk length, an empty row, and widths that are not a multiple
    # of the vector length.
    lengths = np.array([1, 2, 3, 4, 5, 6, 7, 8, 31, 32, 33, 127, 128, 129, 300, 0, 9])
    rng = np.random.default_rng(11)
    n_src = 320
    dst = np.repeat(np.arange(lengths.size), lengths)
    src = np.concatenate([rng.choice(n_src, n, replace=False) for n in lengths])
    inblock = build_inblock(dst, np.zeros_like(src), src, rng.integers(1, 11, dst.size) / 2.0, lengths.size, 1)
    Y_src = rng.standard_normal((n_src, width))
    Y = Y_src[inblock.need_rows]
    a = rng.random(inblock.nnz) * 2 if weighted else None
    beta = inblock.rating.astype(np.float64) * 1.5
    gamma, tau = rng.random(inblock.nnz), rng.random(inblock.nnz)
    reg = np.full((lengths.size, width), 0.3)
    systems = RowSystems(inblock=inblock, D=Y, col=inblock.col, beta=beta, a=a, G=None, reg=reg, gamma=gamma, tau=tau)

    wts = np.ones(inblock.nnz) if a is None else a
    F = Y[inblock.col]
    expected = np.zeros((lengths.size, width))
    for u in np.flatnonzero(lengths):
        m = inblock.row == u
        A = F[m].T @ (wts[m, None] * F[m]) + 0.3 * np.eye(width)
        expected[u] = np.linalg.solve(A, F[m].T @ beta[m])

    def loss(X):
        s = np.einsum("pj,pj->p", F, X[inblock.row])
        return float(np.sum(wts * s * s - 2 * beta * s + gamma)), float(np.sum((tau - s) ** 2))

    x0 = rng.standard_normal((lengths.size, width))
    bounded = np.zeros(width, dtype=bool)  # no active bound: NNLS is the exact solve
    for solution in (
        solve_cholesky(systems, loss=True),
        solve_cg(systems, x0, 3 * width, loss=True),
        solve_nnls(systems, x0, bounded, loss=True),
    ):
        np.testing.assert_allclose(solution.X, expected, rtol=1e-8, atol=1e-8)
        observed, sq_err = loss(solution.X)
        assert solution.observed == pytest.approx(observed, rel=1e-9)
        assert solution.sq_err == pytest.approx(sq_err, rel=1e-9)
