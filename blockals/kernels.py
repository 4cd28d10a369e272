"""Block kernels: factor initialization and the batched solvers of a whole block's rows.

Every ALS mode (:mod:`blockals.objectives`) reduces a half-step to, for each row ``u`` of
the destination block, the linear system::

    A_u x_u = b_u,   A_u = G + sum_{i in Omega_u} a_ui d_i d_i^T + diag(reg_u),
                     b_u = sum_{i in Omega_u} beta_ui d_i

where ``d_i`` is the design row built from the routed factor row of the rated item,
``a_ui`` and ``beta_ui`` come from the rating, ``G`` is an optional term shared by every row
(``Y^T Y`` in implicit mode) and ``reg_u`` is the row's ridge diagonal. These functions
solve all rows of a block at once: rows are bucketed by rating count, each bucket's design
rows are gathered into a zero-padded ``(rows, L, w)`` tensor, and the systems are formed
with batched matrix products (:func:`solve_cholesky`), or applied without forming them
(:func:`solve_cg`), or solved under ``x >= 0`` (:func:`solve_nnls`).

They are pure NumPy functions of one block; the engine calls them inside Dask tasks and
the tests call them directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from blockals.routing import InBlock

__all__ = [
    "RowSystems",
    "solve",
    "init_factors",
    "solve_cholesky",
    "solve_cg",
    "solve_nnls",
    "bucket_lengths",
]

# Bytes of gathered, padded design rows one batch may hold.
BATCH_BYTES = 32 * 2**20
SIDE_TAGS = {"users": 0, "items": 1}
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


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


@dataclass(frozen=True)
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
        Right-hand-side coefficient of each rating.
    a : ndarray of shape (nnz,) or None
        Gram weight of each rating (None: all ones).
    G : ndarray of shape (w, w) or None
        Term shared by every row's matrix.
    reg : ndarray of shape (n_rows, w)
        Ridge diagonal of each row.
    gamma : ndarray of shape (nnz,)
        Constant of each rating's loss term: the objective's sum over the observed pairs
        is ``sum (a s^2 - 2 beta s + gamma)`` at predictions ``s = d . x``.
    tau : ndarray of shape (nnz,)
        What ``train_rmse`` compares ``s`` with.
    """

    inblock: InBlock
    D: np.ndarray
    col: np.ndarray
    beta: np.ndarray
    a: np.ndarray | None
    G: np.ndarray | None
    reg: np.ndarray
    gamma: np.ndarray
    tau: np.ndarray

    @property
    def width(self) -> int:
        return self.D.shape[1]


def bucket_lengths(max_count: int) -> np.ndarray:
    """Padded lengths 1, 2, 3, 4, 6, 8, 12, 16, ...: at most a third of a batch is padding."""
    lengths = [1, 2, 3]
    while lengths[-1] < max_count:
        lengths.append(lengths[-2] * 2)
    return np.array(lengths, dtype=np.int64)


def _batches(counts: np.ndarray, width: int, itemsize: int, batch_bytes: int) -> Iterator[tuple[np.ndarray, int]]:
    """Groups of rows with similar counts, and the padded length of each group."""
    nonempty = np.flatnonzero(counts)
    if nonempty.size == 0:
        return
    lengths = bucket_lengths(int(counts.max()))
    bucket = np.searchsorted(lengths, counts[nonempty])
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(lengths.size + 1))
    for k in range(lengths.size):
        rows = nonempty[order[bounds[k] : bounds[k + 1]]]
        if rows.size == 0:
            continue
        length = int(lengths[k])
        per_batch = max(1, batch_bytes // (length * width * itemsize))
        for start in range(0, rows.size, per_batch):
            yield rows[start : start + per_batch], length


@dataclass
class _Batch:
    rows: np.ndarray
    pos: np.ndarray  # (n, L) rating positions, padding pointing at any rating
    valid: np.ndarray  # (n, L) which positions are ratings
    Dg: np.ndarray  # (n, L, w) design rows, zero-padded
    ag: np.ndarray | None  # (n, L) Gram weights, zero-padded
    bg: np.ndarray  # (n, L) right-hand-side coefficients, zero-padded


def _gathered(sys: RowSystems, batch_bytes: int) -> Iterator[_Batch]:
    indptr = sys.inblock.indptr
    # Padding gathers an appended zero row, so no masking pass over the batch is needed.
    m = sys.D.shape[0]
    D = np.vstack([sys.D, np.zeros((1, sys.width), dtype=sys.D.dtype)])
    for rows, length in _batches(sys.inblock.counts, sys.width, sys.D.dtype.itemsize, batch_bytes):
        pos = indptr[rows][:, None] + np.arange(length)
        valid = pos < indptr[rows + 1][:, None]
        pos = np.where(valid, pos, 0)  # padding points at any rating, masked below
        Dg = D[np.where(valid, sys.col[pos], m)]
        ag = None if sys.a is None else np.where(valid, sys.a[pos], 0).astype(sys.D.dtype)
        bg = np.where(valid, sys.beta[pos], 0).astype(sys.D.dtype)
        yield _Batch(rows, pos, valid, Dg, ag, bg)


def _add_loss(sys: RowSystems, batch: _Batch, x: np.ndarray, terms: dict[str, float] | None) -> None:
    """Add a batch's observed-pair loss and squared error at the solution ``x``."""
    if terms is None:
        return
    s = np.einsum("nlw,nw->nl", batch.Dg, x.astype(batch.Dg.dtype)).astype(np.float64)[batch.valid]
    pos = batch.pos[batch.valid]
    a = 1.0 if sys.a is None else sys.a[pos]
    terms["observed"] = terms.get("observed", 0.0) + float(np.sum(a * s * s - 2 * sys.beta[pos] * s + sys.gamma[pos]))
    terms["sq_err"] = terms.get("sq_err", 0.0) + float(np.sum((sys.tau[pos] - s) ** 2))


def _form(sys: RowSystems, batch: _Batch) -> tuple[np.ndarray, np.ndarray]:
    """``A`` and ``b`` of a batch's rows, in float64."""
    DgT = batch.Dg.transpose(0, 2, 1)
    weighted = batch.Dg if batch.ag is None else batch.Dg * batch.ag[..., None]
    A = np.matmul(DgT, weighted).astype(np.float64)
    b = np.matmul(DgT, batch.bg[..., None])[..., 0].astype(np.float64)
    if sys.G is not None:
        A += sys.G
    diag = np.arange(sys.width)
    A[:, diag, diag] += sys.reg[batch.rows]
    return A, b


def _min_norm(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("nij,nj->ni", np.linalg.pinv(A, rcond=1e-10, hermitian=True), b)


def _solve(A: np.ndarray, b: np.ndarray, regularized: np.ndarray) -> np.ndarray:
    """Solve a batch of symmetric positive semi-definite systems.

    Rows with a positive ridge diagonal are positive definite and solved directly. Rows
    without one (``reg = 0``, or a count-scaled row without ratings) may be singular,
    where LU returns garbage rather than failing; they get the minimum-norm solution.
    """
    x = np.empty_like(b)
    if regularized.any():
        try:
            x[regularized] = np.linalg.solve(A[regularized], b[regularized][..., None])[..., 0]
        except np.linalg.LinAlgError:
            x[regularized] = _min_norm(A[regularized], b[regularized])
    if not regularized.all():
        x[~regularized] = _min_norm(A[~regularized], b[~regularized])
    return x


def solve_cholesky(sys: RowSystems, batch_bytes: int = BATCH_BYTES, terms: dict[str, float] | None = None) -> np.ndarray:
    """Exact solve of every row's system; rows without ratings get zeros.

    Each batch's matrices are formed with one batched product ``D_g^T (a D_g)`` and
    solved together in double precision. When ``terms`` is given, the observed-pair
    loss and squared error at the solution are added to it from the same gathered rows.
    """
    X = np.zeros((sys.inblock.n_rows, sys.width), dtype=sys.D.dtype)
    for batch in _gathered(sys, batch_bytes):
        A, b = _form(sys, batch)
        x = _solve(A, b, (sys.reg[batch.rows] > 0).all(axis=1))
        X[batch.rows] = x
        _add_loss(sys, batch, x, terms)
    return X


def solve_cg(
    sys: RowSystems, x0: np.ndarray, steps: int, batch_bytes: int = BATCH_BYTES, terms: dict[str, float] | None = None
) -> np.ndarray:
    """``steps`` conjugate-gradient steps per row, warm-started at ``x0``.

    The matrices are never formed: ``A p = G p + D_g^T (a * (D_g p)) + reg * p`` costs
    ``O(L w)`` per row instead of ``O(L w^2)``. With ``steps >= w`` it is exact (up to
    rounding).
    """
    X = np.zeros((sys.inblock.n_rows, sys.width), dtype=sys.D.dtype)
    for batch in _gathered(sys, batch_bytes):
        reg = sys.reg[batch.rows].astype(sys.D.dtype)

        def matvec(p: np.ndarray) -> np.ndarray:
            t = np.einsum("nlw,nw->nl", batch.Dg, p)
            if batch.ag is not None:
                t *= batch.ag
            out = np.einsum("nlw,nl->nw", batch.Dg, t) + reg * p
            return out if sys.G is None else out + p @ sys.G.astype(p.dtype)

        x = x0[batch.rows].astype(sys.D.dtype)
        r = np.einsum("nlw,nl->nw", batch.Dg, batch.bg) - matvec(x)
        p = r.copy()
        rr = np.einsum("nw,nw->n", r, r)
        for _ in range(steps):
            Ap = matvec(p)
            pAp = np.einsum("nw,nw->n", p, Ap)
            alpha = np.divide(rr, pAp, out=np.zeros_like(rr), where=pAp > 0)
            x += alpha[:, None] * p
            r -= alpha[:, None] * Ap
            rr_new = np.einsum("nw,nw->n", r, r)
            beta = np.divide(rr_new, rr, out=np.zeros_like(rr), where=rr > 0)
            p = r + beta[:, None] * p
            rr = rr_new
        X[batch.rows] = x
        _add_loss(sys, batch, x, terms)
    return X


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
        polished = _solve(Af, b * free, np.ones(n, dtype=bool))
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
    batch_bytes: int = BATCH_BYTES, terms: dict[str, float] | None = None,
) -> np.ndarray:
    """Every row's system solved with ``x[bounded] >= 0`` (nonnegative least squares).

    ``bounded`` marks the constrained coordinates (a learned bias stays free).
    """
    X = np.zeros((sys.inblock.n_rows, sys.width), dtype=sys.D.dtype)
    for batch in _gathered(sys, batch_bytes):
        A, b = _form(sys, batch)
        x = _nnls_batch(A, b, x0[batch.rows].astype(np.float64), bounded, tol, max_rounds)
        X[batch.rows] = x
        _add_loss(sys, batch, x, terms)
    return X


def solve(
    sys: RowSystems, x0: np.ndarray, rank: int, solver: str, cg_steps: int, nonnegative: bool,
    terms: dict[str, float] | None = None,
) -> np.ndarray:
    """Solve a block's systems the way a configuration asks.

    ``x0`` (the rows' previous values) warm-starts CG and NNLS; with ``nonnegative`` the
    first ``rank`` coordinates are constrained, the rest (a bias) stay free.
    """
    if nonnegative:
        return solve_nnls(sys, x0, np.arange(sys.width) < rank, terms=terms)
    if solver == "cg":
        return solve_cg(sys, x0, cg_steps, terms=terms)
    return solve_cholesky(sys, terms=terms)
