"""Block kernels: factor initialization and the solvers of a whole block's rows.

Every ALS mode (:mod:`blockals.objectives`) reduces a half-step to, for each row ``u`` of
the destination block, the linear system::

    A_u x_u = b_u,   A_u = G + sum_{i in Omega_u} a_ui d_i d_i^T + diag(reg_u),
                     b_u = sum_{i in Omega_u} beta_ui d_i

where ``d_i`` is the design row built from the routed factor row of the rated item,
``a_ui`` and ``beta_ui`` come from the rating, ``G`` is an optional term shared by every row
(``Y^T Y`` in implicit mode) and ``reg_u`` is the row's ridge diagonal.

The per-row loops are compiled with numba: per-row work is small (a rank-64 row with 100
ratings is 400k multiply-adds), so NumPy's per-call dispatch on stacked small matrices
cost more than the arithmetic (docs/performance.md has the measurements). Each row's
``A_u`` is accumulated in the factors' precision: for rows of a few dozen ratings or
more, by BLAS GEMM on the gathered routed rows; for shorter ones, straight from the
routed rows four ratings per pass, so that the update of ``A_u`` stays in the vector
units. It is then solved by a double-precision Cholesky (:func:`solve_cholesky`); or
``A_u`` is applied without being formed (:func:`solve_cg`); or the formed systems are
solved under ``x >= 0`` (:func:`solve_nnls`). The loss at the solution is summed right
after each row's solve, while its routed rows are still in cache.

A block whose routed rows outgrow a core's share of the cache (an item block at scale
reads the factors of a million users) is built by :func:`solve_cholesky` in tiles
instead: a group of rows accumulates its systems together, a stretch of routed rows at a
time, so each stretch is read from memory once per group rather than once per rating
(``TILE_BYTES``; the in-block keeps each row's ratings in routed-row order for this). The compiled functions
release the GIL, so a multi-threaded Dask worker runs several blocks at once.

They are pure functions of one block; the engine calls them inside Dask tasks and the
tests call them directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from blockals.routing import InBlock, build_inblock

__all__ = [
    "RowSystems",
    "KernelArrays",
    "Solution",
    "solve",
    "init_factors",
    "solve_cholesky",
    "solve_cg",
    "solve_nnls",
    "precompile",
    "compile_for",
]

# Bytes of formed float64 systems one batch may hold (NNLS and the minimum-norm fallback).
BATCH_BYTES = 32 * 2**20
# Rows with at least this many ratings build A_u by GEMM on up to GEMM_CHUNK gathered
# rows at a time (docs/performance.md has the measurements behind both numbers).
GEMM_MIN_RATINGS = 32
# The tiled build (:func:`_cholesky_tiled`): bytes of routed rows per tile (a core's
# share of a last-level cache), bytes of a row group's accumulated systems (to stay in
# L2), the routed rows above which it is chosen (below, they stay in the last-level
# cache anyway and tiles only add passes: 10% slower at 20M ratings, 5 MiB of routed
# rows), and the fewest ratings a row must have per tile on average: enough for GEMM.
TILE_BYTES = 4 * 2**20
GROUP_BYTES = 512 * 2**10
TILED_ABOVE_BYTES = 16 * 2**20
TILE_MIN_RATINGS = GEMM_MIN_RATINGS
GEMM_CHUNK = 128
SIDE_TAGS = {"users": 0, "items": 1}
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Reassociation lets the dot products vectorize; NaN and inf keep their IEEE meaning.
_jit = numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract", "nsz"})
# Ratings ahead whose routed rows a gather loop asks the cache for. A block whose routed
# rows outgrow the cache (an item block of 1.38M users) otherwise waits on memory for
# every rating; the loops' arithmetic is too long for the out-of-order window to reach
# the next rating's load by itself (docs/performance.md has the measurements).
PREFETCH_AHEAD = 16


@intrinsic
def _prefetch(typingctx, rows, index):
    """Hint the cache to load the start of ``rows[index]`` (a 2-D C-contiguous array): no effect on results."""
    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        stride = builder.extract_value(ary.strides, 0)
        offset = builder.mul(args[1], stride)
        i8p = ir.IntType(8).as_pointer()
        ptr = builder.gep(builder.bitcast(ary.data, i8p), [offset])
        i32 = ir.IntType(32)
        fn = builder.module.declare_intrinsic("llvm.prefetch", (i8p,), ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
        # read, high temporal locality, data cache
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(rows, types.intp), codegen


# -- initialization -----------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mix (Steele et al.): adjacent counters give unrelated outputs."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _uniforms(seed: int, side: str, rows: np.ndarray, n: int) -> np.ndarray:
    """``n`` uniforms in (0, 1) per row, a function of (seed, side, global row) only."""
    key = _splitmix64(np.array([seed * 2 + SIDE_TAGS[side]], dtype=np.uint64))
    counter = rows.astype(np.uint64)[:, None] * np.uint64(n) + np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = _splitmix64(_splitmix64(counter) ^ key)
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def init_factors(
    rows: np.ndarray, rank: int, seed: int, side: str, dtype: str = "float32", kind: str = "normal"
) -> np.ndarray:
    """Initial factors of global rows ``rows``.

    ``kind="normal"`` draws uniform points on the unit sphere (a standard normal vector
    divided by its norm), as Spark does; ``"uniform"`` draws from U(0, 0.01), as
    implicit does. Unlike either, the draw depends only on ``(seed, side, global row)``,
    so the same seed gives the same model whatever the block and worker counts.
    """
    rows = np.asarray(rows)
    if kind == "uniform":
        return (0.01 * _uniforms(seed, side, rows, rank)).astype(dtype)
    u = _uniforms(seed, side, rows, 2 * rank)
    normal = np.sqrt(-2.0 * np.log(u[:, :rank])) * np.cos(2.0 * np.pi * u[:, rank:])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    return normal.astype(dtype)


# -- the systems of one block ----------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RowSystems:
    """The normal equations of every row of a block, in factored form.

    Attributes
    ----------
    inblock : InBlock
        The block's ratings (CSR by row).
    D : ndarray of shape (m, w)
        Design rows, one per routed factor row.
    col : ndarray of shape (nnz,)
        Row of ``D`` for each rating.
    beta : ndarray of shape (nnz,)
        Right-hand-side coefficient of each rating: float64, or the float32 ratings
        themselves, which the loops widen (explicit mode makes no copy of them).
    a : ndarray of shape (nnz,) or None
        Gram weight of each rating (None: all ones, stored as one).
    G : ndarray of shape (w, w) or None
        Term shared by every row's matrix.
    reg : ndarray of shape (n_rows, w)
        Ridge diagonal of each row.
    gamma : ndarray of shape (nnz,) or None
        Constant of each rating's loss term: the objective's sum over the observed pairs
        is ``sum (a s^2 - 2 beta s + gamma)`` at predictions ``s = d . x`` (None:
        ``beta^2``, computed in the loss pass).
    tau : ndarray of shape (nnz,)
        What ``train_rmse`` compares ``s`` with (float64 or float32, as ``beta``).
    """

    inblock: InBlock
    D: np.ndarray
    col: np.ndarray
    beta: np.ndarray
    a: np.ndarray | None
    G: np.ndarray | None
    reg: np.ndarray
    gamma: np.ndarray | None
    tau: np.ndarray

    @property
    def width(self) -> int:
        return self.D.shape[1]

    def kernel_arrays(self) -> KernelArrays:
        """The arrays in the layouts and types the compiled loops take.

        Missing weights become one 1 seen through a zero stride, a missing ``gamma`` an
        empty array and a missing ``G`` zeros: no ``nnz``-long array is made for them,
        since at scale each one is a fresh allocation at every solve.
        """
        D = np.ascontiguousarray(self.D)
        nnz = self.col.shape[0]
        return KernelArrays(
            indptr=self.inblock.indptr.astype(np.int64),
            col=np.ascontiguousarray(self.col),  # int32 or int64, as InBlock.col gives it
            D=D,
            a=(np.broadcast_to(np.ones(1, dtype=D.dtype), (nnz,)) if self.a is None
               else np.ascontiguousarray(self.a, dtype=D.dtype)),
            beta=_per_rating(self.beta),
            G=np.zeros((self.width, self.width)) if self.G is None else np.ascontiguousarray(self.G, dtype=np.float64),
            reg=np.ascontiguousarray(self.reg, dtype=np.float64),
            gamma=np.zeros(0) if self.gamma is None else np.ascontiguousarray(self.gamma, dtype=np.float64),
            tau=_per_rating(self.tau),
        )


def _per_rating(values: np.ndarray) -> np.ndarray:
    """float32 values as they are (the loops widen them), anything else as float64."""
    return np.ascontiguousarray(values, dtype=np.float32 if values.dtype == np.float32 else np.float64)


@dataclass(frozen=True, kw_only=True)
class KernelArrays:
    """:class:`RowSystems` as the compiled loops take it: contiguous, no None."""

    indptr: np.ndarray
    col: np.ndarray
    D: np.ndarray
    a: np.ndarray
    beta: np.ndarray
    G: np.ndarray
    reg: np.ndarray
    gamma: np.ndarray
    tau: np.ndarray

    @property
    def system(self) -> tuple[np.ndarray, ...]:
        """``(indptr, col, D, a, beta, G, reg)``: the arguments every loop over the systems starts with."""
        return self.indptr, self.col, self.D, self.a, self.beta, self.G, self.reg

    @property
    def loss(self) -> tuple[np.ndarray, ...]:
        """``(indptr, col, D, a, beta, gamma, tau)``: the arguments of a loss pass."""
        return self.indptr, self.col, self.D, self.a, self.beta, self.gamma, self.tau


@dataclass(frozen=True, kw_only=True)
class Solution:
    """A block's solved rows, and the loss sums at them when they were asked for.

    Attributes
    ----------
    X : ndarray of shape (n_rows, w)
        The solution, in the factors' precision.
    observed : float
        ``sum (a s^2 - 2 beta s + gamma)`` over the block's ratings at ``s = d . x``: the
        block's share of the objective's sum over observed pairs.
    sq_err : float
        ``sum (tau - s)^2``: the block's share of the training squared error.
    """

    X: np.ndarray
    observed: float = 0.0
    sq_err: float = 0.0


# -- compiled per-row loops ------------------------------------------------------------


@_jit
def _add_gram(A, D, col, a, start, end):
    """``A += sum_{p in [start, end)} a_p d_p d_p^T`` over the full square.

    Four ratings per pass: each element of ``A`` is loaded and stored once for four
    products, and the fixed-length inner loop vectorizes (a triangular loop with a
    moving start does not, and costs more than the doubled arithmetic it saves).
    """
    w = A.shape[0]
    p = start
    while p + 4 <= end:
        for t in range(p + PREFETCH_AHEAD, min(p + PREFETCH_AHEAD + 4, col.shape[0])):
            _prefetch(D, col[t])
        d0, d1, d2, d3 = D[col[p]], D[col[p + 1]], D[col[p + 2]], D[col[p + 3]]
        a0, a1, a2, a3 = a[p], a[p + 1], a[p + 2], a[p + 3]
        for j in range(w):
            c0, c1, c2, c3 = a0 * d0[j], a1 * d1[j], a2 * d2[j], a3 * d3[j]
            Aj = A[j]
            for l in range(w):
                Aj[l] += c0 * d0[l] + c1 * d1[l] + c2 * d2[l] + c3 * d3[l]
        p += 4
    while p < end:
        d0 = D[col[p]]
        for j in range(w):
            c0 = a[p] * d0[j]
            Aj = A[j]
            for l in range(w):
                Aj[l] += c0 * d0[l]
        p += 1


@_jit
def _add_gram_gemm(A, b, D, col, a, beta, start, end, E, F):
    """``A += sum a_p d_p d_p^T`` and ``b += sum beta_p d_p`` by BLAS GEMM.

    Up to ``F.shape[0]`` ratings at a time, their rows are gathered into ``F`` and
    ``[a d, beta]`` into ``E``; one product ``E^T F`` then holds the chunk's share of
    ``A`` in its first ``w`` rows and of ``b`` in its last. GEMM's register tiling reaches
    1.3-1.8x the four-ratings loop once a row has a few dozen ratings, and the panels are
    small enough that OpenBLAS keeps each product on one thread.
    """
    w = A.shape[0]
    chunk = F.shape[0]
    nnz = col.shape[0]
    for c0 in range(start, end, chunk):
        n = min(c0 + chunk, end) - c0
        for q in range(n):
            if c0 + q + PREFETCH_AHEAD < nnz:
                _prefetch(D, col[c0 + q + PREFETCH_AHEAD])
            d = D[col[c0 + q]]
            ap = a[c0 + q]
            for j in range(w):
                F[q, j] = d[j]
                E[q, j] = ap * d[j]
            E[q, w] = beta[c0 + q]
        P = np.dot(E[:n].T, F[:n])
        A += P[:w]
        for j in range(w):
            b[j] += P[w, j]


@_jit
def _scratch(D):
    """Buffers of :func:`_system`: ``A`` in the factors' precision, the GEMM panels ``E``
    and ``F`` (``w^2 * chunk <= 2^19``, at most ``GEMM_CHUNK`` ratings), ``M`` and ``b``."""
    w = D.shape[1]
    chunk = max(16, min(GEMM_CHUNK, 2**19 // (w * w)))
    return (np.empty((w, w), dtype=D.dtype), np.empty((chunk, w + 1), dtype=D.dtype),
            np.empty((chunk, w), dtype=D.dtype), np.empty((w, w)), np.empty(w))


@_jit
def _accumulate(A, b, D, col, a, beta, start, end, E, F):
    """``A += sum a_p d_p d_p^T`` and ``b += sum beta_p d_p`` over ratings ``[start, end)``:
    by GEMM from ``GEMM_MIN_RATINGS`` ratings, below that by the four-ratings loop, which
    wins where a GEMM call has too little to tile. ``E``, ``F`` are scratch."""
    if end - start >= GEMM_MIN_RATINGS:
        _add_gram_gemm(A, b, D, col, a, beta, start, end, E, F)
        return
    _add_gram(A, D, col, a, start, end)
    for p in range(start, end):
        d = D[col[p]]
        bp = np.float64(beta[p])
        for j in range(b.shape[0]):
            b[j] += bp * d[j]


@_jit
def _finish_system(u, A, G, reg, M):
    """``M = A + G + diag(reg_u)`` in float64."""
    w = A.shape[0]
    for j in range(w):
        for l in range(w):
            M[j, l] = A[j, l] + G[j, l]
        M[j, j] += reg[u, j]


@_jit
def _system(u, indptr, col, D, a, beta, G, reg, A, E, F, M, b):
    """Row ``u``'s ``A_u`` into ``M`` and ``b_u`` into ``b`` (float64); ``A``, ``E``, ``F`` are scratch."""
    A[:, :] = 0.0
    b[:] = 0.0
    _accumulate(A, b, D, col, a, beta, indptr[u], indptr[u + 1], E, F)
    _finish_system(u, A, G, reg, M)


@_jit
def _segment_loss(x, start, end, col, D, a, beta, gamma, tau, acc):
    """Add ``sum (a s^2 - 2 beta s + gamma)`` over ratings ``[start, end)`` to ``acc[0]`` and
    ``sum (tau - s)^2`` to ``acc[1]``, at predictions ``s = d . x`` (``x`` float64)."""
    w = x.shape[0]
    observed = sq_err = 0.0
    for p in range(start, end):
        if p + PREFETCH_AHEAD < col.shape[0]:
            _prefetch(D, col[p + PREFETCH_AHEAD])
        d = D[col[p]]
        s = 0.0
        for j in range(w):
            s += d[j] * x[j]
        bp = np.float64(beta[p])
        observed += a[p] * s * s - 2.0 * bp * s + (gamma[p] if gamma.shape[0] else bp * bp)
        sq_err += (tau[p] - s) ** 2
    acc[0] += observed
    acc[1] += sq_err


@_jit
def _row_loss(u, x, indptr, col, D, a, beta, gamma, tau, acc):
    """Row ``u``'s loss terms (:func:`_segment_loss`), called right after the row's solve,
    while its routed rows are still in cache."""
    _segment_loss(x, indptr[u], indptr[u + 1], col, D, a, beta, gamma, tau, acc)


@_jit
def _cholesky_solve(M, b):
    """``b = M^{-1} b`` by Cholesky, in place; False where the factorization breaks down
    or the solution is not finite."""
    w = b.shape[0]
    try:
        R = np.linalg.cholesky(M)
    except Exception:
        return False
    for j in range(w):  # R y = b
        v = b[j]
        for i in range(j):
            v -= R[j, i] * b[i]
        b[j] = v / R[j, j]
    for j in range(w - 1, -1, -1):  # R^T x = y
        v = b[j]
        for i in range(j + 1, w):
            v -= R[i, j] * b[i]
        b[j] = v / R[j, j]
    return np.isfinite(b).all()


@_jit
def _cholesky_rows(rows, indptr, col, D, a, beta, G, reg, gamma, tau, X, ok, acc):
    """Solve the systems of ``rows`` by Cholesky, a row at a time; ``ok[k]`` is False where
    it broke down. With a non-empty ``acc``, each solved row's loss terms are added to it."""
    w = D.shape[1]
    A, E, F, M, b = _scratch(D)
    for k in range(rows.shape[0]):
        u = rows[k]
        _system(u, indptr, col, D, a, beta, G, reg, A, E, F, M, b)
        ok[k] = _cholesky_solve(M, b)
        if not ok[k]:
            continue
        for j in range(w):
            X[u, j] = b[j]
            b[j] = X[u, j]  # the loss is taken at the factors as stored
        if acc.shape[0]:
            _row_loss(u, b, indptr, col, D, a, beta, gamma, tau, acc)


@_jit
def _tile_ends(rows, indptr, col, pos, c1, ends):
    """``ends[i]``: where row ``rows[i]``'s ratings from ``pos[i]`` on reach routed row ``c1``."""
    for i in range(rows.shape[0]):
        e, end = pos[i], indptr[rows[i] + 1]
        while e < end and col[e] < c1:
            e += 1
        ends[i] = e


@_jit
def _cholesky_tiled(rows, indptr, col, D, a, beta, G, reg, gamma, tau, X, ok, acc, tile, group):
    """:func:`_cholesky_rows` with the routed rows read a tile at a time.

    Rows go in groups of ``group``; a group's systems are accumulated together, tile by
    tile of ``tile`` routed rows, so the tile and the group's ``A_u`` stay in cache while
    every rating that reads the tile is added, and the loss is summed the same way once
    the group is solved. Needs each row's ratings sorted by routed row (``col``).
    """
    w = D.shape[1]
    _, E, F, M, b = _scratch(D)
    x = np.empty(w)
    for k0 in range(0, rows.shape[0], group):
        part = rows[k0 : k0 + group]
        n = part.shape[0]
        As = np.zeros((n, w, w), dtype=D.dtype)
        bs = np.zeros((n, w))
        pos, ends = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        for i in range(n):
            pos[i] = indptr[part[i]]
        for c1 in range(tile, D.shape[0] + tile, tile):
            _tile_ends(part, indptr, col, pos, c1, ends)
            for i in range(n):
                if ends[i] > pos[i]:
                    _accumulate(As[i], bs[i], D, col, a, beta, pos[i], ends[i], E, F)
                    pos[i] = ends[i]
        for i in range(n):
            u = part[i]
            _finish_system(u, As[i], G, reg, M)
            b[:] = bs[i]
            ok[k0 + i] = _cholesky_solve(M, b)
            if ok[k0 + i]:
                for j in range(w):
                    X[u, j] = b[j]
        if not acc.shape[0]:
            continue
        for i in range(n):
            pos[i] = indptr[part[i]]
        for c1 in range(tile, D.shape[0] + tile, tile):
            _tile_ends(part, indptr, col, pos, c1, ends)
            for i in range(n):
                if ok[k0 + i] and ends[i] > pos[i]:
                    for j in range(w):
                        x[j] = X[part[i], j]  # the loss is taken at the factors as stored
                    _segment_loss(x, pos[i], ends[i], col, D, a, beta, gamma, tau, acc)
                pos[i] = ends[i]


@_jit
def _sorted_within_rows(indptr, col):
    for u in range(indptr.shape[0] - 1):
        for p in range(indptr[u] + 1, indptr[u + 1]):
            if col[p] < col[p - 1]:
                return False
    return True


@_jit
def _form_rows(rows, indptr, col, D, a, beta, G, reg, Ms, bs):
    """The float64 systems of ``rows`` into ``Ms[k]``, ``bs[k]``."""
    A, E, F, _, _ = _scratch(D)
    for k in range(rows.shape[0]):
        _system(rows[k], indptr, col, D, a, beta, G, reg, A, E, F, Ms[k], bs[k])


@_jit
def _apply(u, p, indptr, col, D, a, G, reg, out, pf, outf):
    """``out = A_u p`` without forming ``A_u``: ``G p + sum a (d . p) d + reg * p``.

    The pass over the ratings runs in the factors' precision (``pf``, ``outf``: scratch of
    ``D``'s dtype): float32 lanes are twice as many as float64 ones, and this pass is CG's
    whole cost on long rows.
    """
    w = p.shape[0]
    for j in range(w):
        pf[j] = p[j]
        outf[j] = 0.0
    q, end = indptr[u], indptr[u + 1]
    while q + 4 <= end:  # four independent dot products, one pass over outf
        for t in range(q + PREFETCH_AHEAD, min(q + PREFETCH_AHEAD + 4, col.shape[0])):
            _prefetch(D, col[t])
        d0, d1, d2, d3 = D[col[q]], D[col[q + 1]], D[col[q + 2]], D[col[q + 3]]
        t0, t1, t2, t3 = d0[0] * pf[0], d1[0] * pf[0], d2[0] * pf[0], d3[0] * pf[0]
        for j in range(1, w):
            t0 += d0[j] * pf[j]
            t1 += d1[j] * pf[j]
            t2 += d2[j] * pf[j]
            t3 += d3[j] * pf[j]
        t0, t1, t2, t3 = t0 * a[q], t1 * a[q + 1], t2 * a[q + 2], t3 * a[q + 3]
        for j in range(w):
            outf[j] += t0 * d0[j] + t1 * d1[j] + t2 * d2[j] + t3 * d3[j]
        q += 4
    while q < end:
        d = D[col[q]]
        t = d[0] * pf[0]
        for j in range(1, w):
            t += d[j] * pf[j]
        t *= a[q]
        for j in range(w):
            outf[j] += t * d[j]
        q += 1
    for j in range(w):
        acc = reg[u, j] * p[j] + outf[j]
        for l in range(w):
            acc += G[j, l] * p[l]
        out[j] = acc


@_jit
def _residual(u, x, indptr, col, D, a, beta, G, reg, r, xf, rf):
    """``r = b_u - A_u x`` in one pass over the ratings, like :func:`_apply`."""
    w = x.shape[0]
    for j in range(w):
        xf[j] = x[j]
        rf[j] = 0.0
    for q in range(indptr[u], indptr[u + 1]):
        if q + PREFETCH_AHEAD < col.shape[0]:
            _prefetch(D, col[q + PREFETCH_AHEAD])
        d = D[col[q]]
        t = d[0] * xf[0]
        for j in range(1, w):
            t += d[j] * xf[j]
        t = np.float64(beta[q]) - a[q] * t
        for j in range(w):
            rf[j] += t * d[j]
    for j in range(w):
        acc = rf[j] - reg[u, j] * x[j]
        for l in range(w):
            acc -= G[j, l] * x[l]
        r[j] = acc


@_jit
def _loss_rows(rows, indptr, col, D, a, beta, gamma, tau, X, acc):
    """The loss terms of ``rows`` at ``X``, into ``acc``."""
    x = np.empty(D.shape[1])
    for k in range(rows.shape[0]):
        x[:] = X[rows[k]]
        _row_loss(rows[k], x, indptr, col, D, a, beta, gamma, tau, acc)


@_jit
def _cg_rows(indptr, col, D, a, beta, G, reg, gamma, tau, X0, steps, X, acc):
    w = D.shape[1]
    x, r, p, Ap = np.empty(w), np.empty(w), np.empty(w), np.empty(w)
    vf, outf = np.empty(w, dtype=D.dtype), np.empty(w, dtype=D.dtype)
    for u in range(indptr.shape[0] - 1):
        if indptr[u] == indptr[u + 1]:
            continue
        for j in range(w):
            x[j] = X0[u, j]
        _residual(u, x, indptr, col, D, a, beta, G, reg, r, vf, outf)
        p[:] = r
        rr = np.dot(r, r)
        for _ in range(steps):
            if rr <= 0.0:
                break
            _apply(u, p, indptr, col, D, a, G, reg, Ap, vf, outf)
            pAp = np.dot(p, Ap)
            if not pAp > 0.0:
                break
            alpha = rr / pAp
            x += alpha * p
            r -= alpha * Ap
            rr_new = np.dot(r, r)
            p[:] = r + (rr_new / rr) * p
            rr = rr_new
        for j in range(w):
            X[u, j] = x[j]
            x[j] = X[u, j]
        if acc.shape[0]:
            _row_loss(u, x, indptr, col, D, a, beta, gamma, tau, acc)


# -- solvers of a block -----------------------------------------------------------------


def _chunks(rows: np.ndarray, width: int, batch_bytes: int) -> Iterator[np.ndarray]:
    per_batch = max(1, batch_bytes // (8 * width * (width + 1)))
    for start in range(0, rows.size, per_batch):
        yield rows[start : start + per_batch]


def _formed(arrays: KernelArrays, rows: np.ndarray, batch_bytes: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The float64 systems of ``rows``, a batch at a time."""
    width = arrays.D.shape[1]
    for chunk in _chunks(rows, width, batch_bytes):
        Ms = np.empty((chunk.size, width, width))
        bs = np.empty((chunk.size, width))
        _form_rows(chunk, *arrays.system, Ms, bs)
        yield chunk, Ms, bs


def _loss_sums(loss: bool) -> np.ndarray:
    """Where the loops add the loss sums: ``[observed, sq_err]``, or empty when none is wanted."""
    return np.zeros(2) if loss else np.zeros(0)


def _solution(X: np.ndarray, acc: np.ndarray) -> Solution:
    if acc.size:
        return Solution(X=X, observed=float(acc[0]), sq_err=float(acc[1]))
    return Solution(X=X)


def _min_norm(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("nij,nj->ni", np.linalg.pinv(A, rcond=1e-10, hermitian=True), b)


def _solve_batch(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve a batch of positive semi-definite systems, minimum-norm where LU breaks down."""
    try:
        return np.linalg.solve(A, b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return _min_norm(A, b)


def _tiling(arrays: KernelArrays, rows: np.ndarray) -> tuple[int, int] | None:
    """``(tile, group)`` of :func:`_cholesky_tiled` (routed rows per tile, rows per group),
    or None where a row at a time is as fast.

    Tiling pays where the routed rows outgrow the cache and a row's ratings in one tile
    are enough to be worth a pass: an item block at scale (a few hundred items, each rated
    by thousands of the million users it reads). It needs each row's ratings in routed-row
    order, which stores written since 2026-12-03 keep (FORMAT.md); older ones are solved a
    row at a time.
    """
    D = arrays.D
    w = D.shape[1]
    tile = max(1, TILE_BYTES // (D.itemsize * w))
    n_tiles = -(-D.shape[0] // tile)
    nnz = arrays.col.shape[0]
    if D.nbytes <= TILED_ABOVE_BYTES or nnz < TILE_MIN_RATINGS * n_tiles * max(1, rows.size):
        return None
    if not _sorted_within_rows(arrays.indptr, arrays.col):
        return None
    return tile, max(1, GROUP_BYTES // (w * w * D.itemsize + 8 * w))


def solve_cholesky(sys: RowSystems, batch_bytes: int = BATCH_BYTES, loss: bool = False) -> Solution:
    """Exact solve of every row's system; rows without ratings get zeros.

    Rows with a positive ridge diagonal are positive definite and solved by Cholesky.
    Rows without one (``reg = 0``, or a count-scaled row with no positive rating) may be
    singular, where a factorization returns garbage rather than failing; they, and any
    row whose factorization breaks down, get the minimum-norm solution. With ``loss``,
    the observed-pair loss and squared error at the solution come with it.
    """
    arrays = sys.kernel_arrays()
    acc = _loss_sums(loss)
    X = np.zeros((sys.inblock.n_rows, sys.width), dtype=sys.D.dtype)
    nonempty = sys.inblock.counts > 0
    regularized = (sys.reg > 0).all(axis=1)
    rows = np.flatnonzero(nonempty & regularized)
    ok = np.ones(rows.size, dtype=bool)
    tiling = _tiling(arrays, rows)
    if tiling is None:
        _cholesky_rows(rows, *arrays.system, arrays.gamma, arrays.tau, X, ok, acc)
    else:
        _cholesky_tiled(rows, *arrays.system, arrays.gamma, arrays.tau, X, ok, acc, *tiling)
    singular = np.concatenate([rows[~ok], np.flatnonzero(nonempty & ~regularized)])
    for chunk, Ms, bs in _formed(arrays, singular, batch_bytes):
        X[chunk] = _min_norm(Ms, bs)
    if acc.size and singular.size:
        _loss_rows(singular, *arrays.loss, X, acc)
    return _solution(X, acc)


def solve_cg(sys: RowSystems, x0: np.ndarray, steps: int, loss: bool = False) -> Solution:
    """``steps`` conjugate-gradient steps per row, warm-started at ``x0``.

    The matrices are never formed: ``A p = G p + sum a (d . p) d + reg * p`` costs
    ``O(L w + w^2)`` per row instead of ``O(L w^2)``. With ``steps >= w`` it is exact (up
    to rounding).
    """
    arrays = sys.kernel_arrays()
    acc = _loss_sums(loss)
    X = np.zeros((sys.inblock.n_rows, sys.width), dtype=sys.D.dtype)
    _cg_rows(*arrays.system, arrays.gamma, arrays.tau, np.ascontiguousarray(x0, dtype=np.float64), steps, X, acc)
    return _solution(X, acc)


def _nnls_batch(A: np.ndarray, b: np.ndarray, x: np.ndarray, bounded: np.ndarray, tol: float, max_rounds: int) -> np.ndarray:
    """Minimize ``x^T A x / 2 - b^T x`` subject to ``x[bounded] >= 0``, for a batch.

    Projected coordinate descent finds the active set; each round then solves the
    free coordinates exactly with the active ones held at zero, and keeps that solution
    where it is feasible. Rows stop once the KKT conditions hold to ``tol`` (relative to
    the scale of ``b``).
    """
    n, w = b.shape
    diag = np.einsum("nii->ni", A)
    scale = np.maximum(np.abs(b).max(axis=1, initial=0.0), 1e-300)
    x = np.where(bounded, np.maximum(x, 0.0), x)
    for _ in range(max_rounds):
        for _sweep in range(2):
            for j in range(w):
                g = np.einsum("ni,ni->n", A[:, j, :], x) - b[:, j]
                step = np.divide(g, diag[:, j], out=np.zeros(n), where=diag[:, j] > 0)
                x[:, j] -= step
                if bounded[j]:
                    np.maximum(x[:, j], 0.0, out=x[:, j])
        free = ~bounded[None, :] | (x > 0)
        mask = free[:, :, None] & free[:, None, :]
        Af = np.where(mask, A, 0.0)
        Af[:, np.arange(w), np.arange(w)] += ~free
        polished = _solve_batch(Af, b * free)
        # Move toward the exact free-set solution as far as feasibility allows (the
        # Lawson-Hanson step): where it is feasible, all the way.
        blocked = bounded[None, :] & (polished < 0) & free
        ratio = np.where(blocked, x / np.where(blocked, x - polished, 1.0), 1.0)
        t = np.clip(ratio.min(axis=1), 0.0, 1.0)[:, None]
        x += t * (polished - x)
        x[bounded[None, :] & (x < 0)] = 0.0
        g = np.einsum("nij,nj->ni", A, x) - b
        violation = np.where(free, np.abs(g), np.maximum(-g, 0.0)).max(axis=1) / scale
        if (violation <= tol).all():
            break
    return x


def solve_nnls(
    sys: RowSystems, x0: np.ndarray, bounded: np.ndarray, tol: float = 1e-9, max_rounds: int = 100,
    batch_bytes: int = BATCH_BYTES, loss: bool = False,
) -> Solution:
    """Every row's system solved with ``x[bounded] >= 0`` (nonnegative least squares).

    ``bounded`` marks the constrained coordinates (a learned bias stays free).
    """
    arrays = sys.kernel_arrays()
    X = np.zeros((sys.inblock.n_rows, sys.width), dtype=sys.D.dtype)
    rated = np.flatnonzero(sys.inblock.counts)
    for rows, A, b in _formed(arrays, rated, batch_bytes):
        X[rows] = _nnls_batch(A, b, x0[rows].astype(np.float64), bounded, tol, max_rounds)
    acc = _loss_sums(loss)
    if acc.size:
        _loss_rows(rated, *arrays.loss, X, acc)
    return _solution(X, acc)


def solve(
    sys: RowSystems, x0: np.ndarray, rank: int, solver: str, cg_steps: int, nonnegative: bool, loss: bool = False,
) -> Solution:
    """Solve a block's systems the way a configuration asks.

    ``x0`` (the rows' previous values) warm-starts CG and NNLS; with ``nonnegative`` the
    first ``rank`` coordinates are constrained, the rest (a bias) stay free.
    """
    if nonnegative:
        return solve_nnls(sys, x0, np.arange(sys.width) < rank, loss=loss)
    if solver == "cg":
        return solve_cg(sys, x0, cg_steps, loss=loss)
    return solve_cholesky(sys, loss=loss)


def compile_for(sys: RowSystems, solver: str, nonnegative: bool) -> None:
    """Compile (or load from numba's cache) the loops that solve systems typed like ``sys``
    (its factor dtype and the terms it has) with ``solver``, on every path a block of any
    size may take."""
    x0 = np.zeros((sys.inblock.n_rows, sys.width))
    if nonnegative:
        solve_nnls(sys, x0, np.ones(sys.width, dtype=bool), loss=True)
    elif solver == "cg":
        solve_cg(sys, x0, 1, loss=True)
    else:
        solve_cholesky(sys, loss=True)
        arrays = sys.kernel_arrays()  # the tiled build, which a block this small never chooses
        _sorted_within_rows(arrays.indptr, arrays.col)
        _cholesky_tiled(np.zeros(1, dtype=np.int64), *arrays.system, arrays.gamma, arrays.tau,
                        np.zeros((1, sys.width), dtype=sys.D.dtype), np.ones(1, dtype=bool), np.zeros(2), 2, 1)


def precompile() -> None:
    """Compile the per-row loops of every mode and solver for float32 and float64 factors,
    or load them from cache.

    numba caches compiled code beside this module (or in ``NUMBA_CACHE_DIR``); images
    call this once at build time so that workers start without compiling.
    """
    inblock = build_inblock(np.zeros(5, int), np.zeros(5, int), np.arange(5), np.ones(5), 1, 1)
    ones = np.ones(5)
    # Explicit mode passes the float32 ratings as they are and no loss constants; the
    # other modes float64 terms and per-rating weights.
    variants = ({"beta": inblock.rating, "a": None, "gamma": None, "tau": inblock.rating},
                {"beta": ones, "a": ones, "gamma": ones, "tau": ones},
                {"beta": ones, "a": None, "gamma": None, "tau": ones})
    for dtype in (np.float32, np.float64):
        for terms in variants:
            sys = RowSystems(inblock=inblock, D=np.eye(5, 2, dtype=dtype), col=inblock.col, G=None,
                             reg=np.ones((1, 2)), **terms)
            for solver, nonnegative in (("cholesky", False), ("cg", False), ("cholesky", True)):
                compile_for(sys, solver, nonnegative)
