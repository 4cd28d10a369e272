"""Ids to dense indices, and rows to blocks.

Original ids (int64 or strings) are sorted and numbered ``0 .. n - 1``; that number is a
row's *global index*. Rows are then dealt to blocks so that both the number of rows and
the number of ratings per block are balanced: rows are taken in order of decreasing rating
count and dealt in a snake (``0, 1, .., B-1, B-1, .., 1, 0, 0, 1, ..``), which keeps row
counts within one of each other and, because each round pairs heavy with light rows,
keeps rating counts close even under a power-law popularity. Inside a block, rows are
numbered by increasing global index (their *local index*), so a block's row order does not
depend on how the other blocks were cut.
"""

from __future__ import annotations

import numpy as np

from blockals.errors import InputError

__all__ = [
    "assign_blocks",
    "default_n_blocks",
    "parse_n_blocks",
    "block_bytes",
    "BYTES_PER_RATING",
]

# Bytes a block's solve spends per rating it holds: value, routing, the coefficients of
# its system and its loss terms (see blockals/kernels.py).
BYTES_PER_RATING = 80
# Bytes per factor row a block receives: rank 64, float32, held twice (as received and
# concatenated). A block receives at most one row per rating, and at most every row of
# the other side.
BYTES_PER_MESSAGE_ROW = 2 * 64 * 4

# Default working-set budget of one block solve; small enough that several blocks fit
# in a 2 GiB worker at once, large enough that per-task overhead stays negligible.
DEFAULT_BLOCK_BUDGET = 256 * 2**20


def block_bytes(nnz: int, n_other: int) -> int:
    """Working set of a block solve over ``nnz`` ratings, the other side having ``n_other`` rows."""
    return nnz * BYTES_PER_RATING + min(nnz, n_other) * BYTES_PER_MESSAGE_ROW


def default_n_blocks(n_rows: int, nnz: int, budget: int = DEFAULT_BLOCK_BUDGET, n_other: int | None = None) -> int:
    """Fewest blocks for one side whose solves, of ``ceil(nnz / blocks)`` ratings each, fit ``budget``.

    Fewer, larger blocks mean fewer tasks and less routing, so the smallest count that
    fits is the best. ``n_other`` (rows of the other side; default: unbounded) caps the
    routed rows a block can receive. At least two blocks (so two workers have something to
    do) when there are two rows, and never more blocks than rows.

    When every row of the other side would fill more than half the budget (say 1.4M
    users at rank 64 for an item block), no block count fits short of blocks holding fewer
    ratings than the other side has rows, and those route almost every rating's row to
    its own block: tens of times the traffic. The count is then set by the ratings
    alone, half the budget's worth per block, and the messages come on top (the two rules
    agree where the messages fill exactly half).
    """
    crowded = n_other is not None and n_other * BYTES_PER_MESSAGE_ROW > budget // 2
    n_other = nnz if n_other is None else n_other
    lo, hi = 1, max(1, n_rows)  # block_bytes(ceil(nnz / b)) does not grow with b
    while lo < hi:
        mid = (lo + hi) // 2
        if block_bytes(-(-nnz // mid), n_other) <= budget:
            hi = mid
        else:
            lo = mid + 1
    if crowded:
        lo = min(lo, -(-nnz // max(1, budget // 2 // BYTES_PER_RATING)))
    return int(max(1, min(n_rows, max(2, lo))))


def parse_n_blocks(value: object, name: str, n_rows: int) -> int:
    """Validate a user-given block count against the number of rows it splits."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be a positive integer, got {value!r}.")
    if value < 1:
        raise InputError(f"{name} must be a positive integer, got {value}.")
    if value > n_rows:
        side = "users" if "user" in name else "items"
        raise InputError(
            f"{name}={value} is larger than the number of {side} ({n_rows}); "
            f"a block needs at least one row."
        )
    return int(value)


def assign_blocks(counts: np.ndarray, n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Deal rows to blocks, balancing rows and ratings.

    Parameters
    ----------
    counts : ndarray of shape (n_rows,)
        Ratings per row, indexed by global index.
    n_blocks : int
        Number of blocks, ``1 <= n_blocks <= n_rows``.

    Returns
    -------
    block : ndarray of int32, shape (n_rows,)
        Block of each row.
    local : ndarray of int32, shape (n_rows,)
        Index of each row inside its block (blocks list rows by increasing global index).

    Examples
    --------
    >>> block, local = assign_blocks(np.array([5, 1, 4, 2]), 2)
    >>> block.tolist(), local.tolist()
    ([0, 0, 1, 1], [0, 1, 0, 1])
    """
    counts = np.asarray(counts)
    if counts.dtype.kind in "ub":  # -counts would wrap around and deal empty rows first
        counts = counts.astype(np.int64)
    n = counts.shape[0]
    # Stable sort: ties keep global order, so the deal is a function of the counts alone.
    order = np.argsort(-counts, kind="stable")
    pos = np.arange(n)
    turn, offset = np.divmod(pos, n_blocks)
    dealt = np.where(turn % 2 == 0, offset, n_blocks - 1 - offset)
    block = np.empty(n, dtype=np.int32)
    block[order] = dealt
    by_block = np.lexsort((np.arange(n), block))
    starts = np.searchsorted(block[by_block], np.arange(n_blocks))
    local = np.empty(n, dtype=np.int32)
    local[by_block] = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
    return block, local
