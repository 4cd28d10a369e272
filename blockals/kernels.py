"""Block kernels: factor initialization, the normal equations of a whole block, the loss.

These are pure NumPy functions of one destination block's in-block and the factor rows
routed to it; the engine calls them inside Dask tasks and the tests call them directly.

Explicit ALS (Spark MLlib's ALS-WR) minimizes, over user factors ``x_u`` and item
factors ``y_i``::

    L(X, Y) = sum_{(u,i) in Omega} (r_ui - x_u . y_i)^2
              + reg * (sum_u w_u |x_u|^2 + sum_i w_i |y_i|^2)

with ``w = n`` (the row's rating count) when ``reg_scaling="count"`` and ``w = 1`` when
``reg_scaling="none"``. With ``Y`` fixed, each user's row solves its own ridge system::

    (Y_u^T Y_u + reg * w_u * I) x_u = Y_u^T r_u

where ``Y_u`` stacks the factors of the items ``u`` rated. A block builds all its
systems at once: rows are bucketed by rating count, each bucket's gathered factor rows are
zero-padded to one length, and ``Y_u^T Y_u`` for the whole bucket is one batched matrix
product; the bucket's systems are then solved together.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from blockals.routing import InBlock

__all__ = [
    "init_factors",
    "solve_explicit",
    "squared_error",
    "regularization",
    "reg_weights",
    "bucket_lengths",
]

# Bytes of gathered, padded factor rows one batch may hold.
BATCH_BYTES = 32 * 2**20
SIDE_TAGS = {"users": 0, "items": 1}
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


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


def init_factors(rows: np.ndarray, rank: int, seed: int, side: str, dtype: str = "float32") -> np.ndarray:
    """Initial factors of global rows ``rows``: uniform points on the unit sphere.

    As Spark does, each row is a standard normal vector divided by its norm; unlike
    Spark, the draw depends only on ``(seed, side, global row)``, so the same seed gives
    the same model whatever the block and worker counts.
    """
    u = _uniforms(seed, side, np.asarray(rows), 2 * rank)
    normal = np.sqrt(-2.0 * np.log(u[:, :rank])) * np.cos(2.0 * np.pi * u[:, rank:])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    return normal.astype(dtype)


def reg_weights(counts: np.ndarray, reg_scaling: str) -> np.ndarray:
    """``w`` of each row: its rating count (Spark's scaling) or 1."""
    if reg_scaling == "count":
        return counts.astype(np.float64)
    return np.ones(counts.shape[0], dtype=np.float64)


def bucket_lengths(max_count: int) -> np.ndarray:
    """Padded lengths 1, 2, 3, 4, 6, 8, 12, 16, ...: at most a third of a batch is padding."""
    lengths = [1, 2, 3]
    while lengths[-1] < max_count:
        lengths.append(lengths[-2] * 2)
    return np.array(lengths, dtype=np.int64)


def _batches(counts: np.ndarray, rank: int, itemsize: int, batch_bytes: int) -> Iterator[tuple[np.ndarray, int]]:
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
        per_batch = max(1, batch_bytes // (length * rank * itemsize))
        for start in range(0, rows.size, per_batch):
            yield rows[start : start + per_batch], length


def _gather(inblock: InBlock, col: np.ndarray, rows: np.ndarray, length: int, Y: np.ndarray):
    """Factor rows and ratings of ``rows``, zero-padded to ``length``: (n, L, k) and (n, L)."""
    start = inblock.indptr[rows]
    pos = start[:, None] + np.arange(length)
    valid = pos < inblock.indptr[rows + 1][:, None]
    pos = np.where(valid, pos, 0)
    Yg = Y[col[pos]]
    Yg[~valid] = 0
    r = np.where(valid, inblock.rating[pos], 0).astype(Y.dtype)
    return Yg, r


def _min_norm(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("nij,nj->ni", np.linalg.pinv(A, rcond=1e-10, hermitian=True), b)


def _solve(A: np.ndarray, b: np.ndarray, regularized: np.ndarray) -> np.ndarray:
    """Solve a batch of symmetric positive semi-definite systems.

    Rows with a positive ridge term are positive definite and solved directly. Rows
    without one (``reg = 0``, or a count-scaled row with no ratings) may be singular,
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


def solve_explicit(
    inblock: InBlock, Y: np.ndarray, reg: float, reg_scaling: str, batch_bytes: int = BATCH_BYTES
) -> np.ndarray:
    """Solve every row of a block for explicit ALS.

    Parameters
    ----------
    inblock : InBlock
        The destination block's ratings and routing.
    Y : ndarray of shape (n_received, rank)
        The routed factor rows, messages concatenated in source-block order.
    reg : float
        λ.
    reg_scaling : {"count", "none"}
        Whether λ is multiplied by each row's rating count.
    batch_bytes : int
        Bound on the gathered factor rows one batched product holds.

    Returns
    -------
    ndarray of shape (n_rows, rank)
        New factors; rows without ratings are zero.
    """
    rank = Y.shape[1]
    X = np.zeros((inblock.n_rows, rank), dtype=Y.dtype)
    counts = inblock.counts
    lam = reg * reg_weights(counts, reg_scaling)
    col = inblock.col
    diag = np.arange(rank)
    for rows, length in _batches(counts, rank, Y.dtype.itemsize, batch_bytes):
        Yg, r = _gather(inblock, col, rows, length, Y)
        YgT = Yg.transpose(0, 2, 1)
        A = np.matmul(YgT, Yg).astype(np.float64)
        b = np.matmul(YgT, r[..., None])[..., 0].astype(np.float64)
        A[:, diag, diag] += lam[rows, None]
        X[rows] = _solve(A, b, lam[rows] > 0)
    return X


def squared_error(inblock: InBlock, X: np.ndarray, Y: np.ndarray, chunk: int = 1 << 20) -> float:
    """``sum (r - x_u . y_i)^2`` over the block's ratings, in float64."""
    col, row = inblock.col, inblock.row
    total = 0.0
    for start in range(0, inblock.nnz, chunk):
        s = slice(start, start + chunk)
        pred = np.einsum("ij,ij->i", X[row[s]].astype(np.float64), Y[col[s]].astype(np.float64))
        total += float(np.sum((inblock.rating[s] - pred) ** 2))
    return total


def regularization(X: np.ndarray, counts: np.ndarray, reg_scaling: str) -> float:
    """``sum_u w_u |x_u|^2`` (without λ)."""
    norms = np.einsum("ij,ij->i", X.astype(np.float64), X.astype(np.float64))
    return float(reg_weights(counts, reg_scaling) @ norms)
