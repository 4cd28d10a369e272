"""In-blocks and out-blocks: which factor rows travel where in an ALS half-step.

A half-step that solves the users of user block ``b`` needs, for every rating of those
users, the factor row of the rated item. Item factors live in item blocks; shipping whole
item blocks to every user block would move ``n_item_blocks x n_user_blocks`` times the item
factor matrix. Instead, as in Spark MLlib's ALS, each item block ``j`` sends user block ``b``
only the rows ``b`` rates: the *out-block* ``out(j -> b)``, a sorted list of ``j``-local
row indices. User block ``b`` receives one message per item block,
``Y_j[out(j -> b)]``, and its *in-block* says, for every rating, which message and which
position in that message holds the factor row to use.

Storage
-------
An out-block is decided by the destination's ratings, so it is stored with the
destination block as ``need_ptr`` / ``need_rows``: ``need_rows[need_ptr[j]:need_ptr[j+1]]``
is ``out(j -> b)``. The route task for ``(j -> b)`` reads that slice and ships
``Y_j[slice]``; nothing else crosses the network.

The in-block of ``b`` is CSR by local row: ``indptr`` (``n_rows + 1``), and per rating
``src_block`` (``j``), ``src_index`` (position inside message ``j``) and ``rating``.
Inside a row, ratings are sorted by source block, then source row: by their row in the
concatenated messages (:attr:`InBlock.col`). A solve can then read the messages a
stretch at a time, adding every rating that reads the stretch while it is in cache
(:func:`blockals.kernels.solve_cholesky`).

Worked example
--------------
Four users, three items, two blocks on each side::

            i0  i1  i2
        u0   5   .   1
        u1   .   3   .
        u2   4   .   .
        u3   .   2   5

Dealing by rating count (:func:`blockals.partition.assign_blocks`) gives user blocks
``U0 = {u0, u2}``, ``U1 = {u1, u3}`` and item blocks ``I0 = {i0}``, ``I1 = {i1, i2}``;
local indices follow global order (``u2`` is local row 1 of ``U0``, ``i2`` local row 1 of
``I1``).

In-block of ``U0`` (solving users u0, u2 from item factors)::

    need_ptr  = [0, 1, 2]    out(I0 -> U0) = [0] (i0),  out(I1 -> U0) = [1] (i2)
    need_rows = [0, 1]
    indptr    = [0, 2, 3]    u0 has 2 ratings, u2 has 1
    src_block = [0, 1, 0]    u0: i0 from I0, i2 from I1;  u2: i0 from I0
    src_index = [0, 0, 0]    each is the first row of its message
    rating    = [5, 1, 4]

In-block of ``U1``: ``I0`` sends nothing (``need_ptr = [0, 0, 2]``), ``I1`` sends
``[0, 1]`` (i1, i2); ``indptr = [0, 1, 3]``, ``src_block = [1, 1, 1]``,
``src_index = [0, 0, 1]``, ``rating = [3, 2, 5]``.

In-block of ``I1`` (solving items i1, i2 from user factors): ``U0`` sends ``[0]`` (u0),
``U1`` sends ``[0, 1]`` (u1, u3), so ``need_ptr = [0, 1, 3]``, ``need_rows = [0, 0, 1]``;
``indptr = [0, 2, 4]``, ``src_block = [1, 1, 0, 1]``, ``src_index = [0, 1, 0, 1]``,
``rating = [3, 2, 1, 5]``.

Inside a solve task the messages are concatenated in source-block order, so a rating's
row in the concatenation is ``need_ptr[src_block] + src_index`` (:attr:`InBlock.col`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

__all__ = [
    "InBlock", "OutBlocks", "build_inblock", "inblock_order", "counting_order", "index_dtype", "pair_order", "ship_whole",
]


def index_dtype(n: int) -> np.dtype:
    """Smallest unsigned dtype that holds indices below ``n``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if n <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


@dataclass(frozen=True)
class InBlock:
    """The ratings of one destination block, with their routing.

    Attributes
    ----------
    indptr : ndarray of int64, shape (n_rows + 1,)
        CSR row pointer over the block's local rows.
    src_block : ndarray, shape (nnz,)
        Source block of each rating's other side.
    src_index : ndarray of uint32, shape (nnz,)
        Position of that row inside the message from ``src_block``.
    rating : ndarray of float32, shape (nnz,)
        Rating values.
    need_ptr : ndarray of int64, shape (n_src_blocks + 1,)
        Offsets of each source block's out-block inside ``need_rows``.
    need_rows : ndarray of uint32
        Concatenated out-blocks: source-local rows each source block ships here.
    """

    indptr: np.ndarray
    src_block: np.ndarray
    src_index: np.ndarray
    rating: np.ndarray
    need_ptr: np.ndarray
    need_rows: np.ndarray

    @property
    def n_rows(self) -> int:
        return self.indptr.shape[0] - 1

    @property
    def nnz(self) -> int:
        return self.rating.shape[0]

    @property
    def counts(self) -> np.ndarray:
        """Ratings per local row."""
        return np.diff(self.indptr)

    @property
    def col(self) -> np.ndarray:
        """Row of each rating inside the concatenation of incoming messages.

        int32 while the messages hold fewer than 2^31 rows: every solve rebuilds this
        array, and half the bytes of fresh memory is most of its cost.
        """
        dtype = np.int32 if self.need_ptr[-1] < 2**31 else np.int64
        return _message_rows(self.need_ptr, self.src_block, self.src_index, np.empty(self.nnz, dtype=dtype))

    @property
    def row(self) -> np.ndarray:
        """Local row of each rating (the CSR row expanded)."""
        return np.repeat(np.arange(self.n_rows, dtype=np.int64), self.counts)

    def out_block(self, src: int) -> np.ndarray:
        """``out(src -> this block)``: source-local rows source block ``src`` ships here."""
        return self.need_rows[self.need_ptr[src] : self.need_ptr[src + 1]]

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in self.__dataclass_fields__)


@numba.njit(nogil=True, cache=True)
def _message_rows(need_ptr, src_block, src_index, out):
    """``out = need_ptr[src_block] + src_index`` in one pass (NumPy's fancy index of a small
    table goes through its general gather, four times slower)."""
    for p in range(out.shape[0]):
        out[p] = need_ptr[src_block[p]] + src_index[p]
    return out


def ship_whole(message_rows: np.ndarray, block_rows: np.ndarray) -> np.ndarray:
    """Which (source block, destination block) pairs ship the whole source block.

    ``message_rows[j, b]`` is the size of ``out(j -> b)`` and ``block_rows[j]`` the rows of
    source block ``j``. A pair whose out-block holds more than half of the source block
    ships the block itself instead of a slice: cutting the slice would copy most of the
    block, and Dask sends a block once to each worker, where every destination block
    shares it, while a slice travels once per destination. At scale this is the common
    case: an item block of a few thousand items is rated by most users of every user
    block, so slices would move the user factors once per item block (30 times per
    iteration with 30 item blocks) rather than once per worker.
    """
    return 2 * np.asarray(message_rows) > np.asarray(block_rows)[:, None]


@dataclass(frozen=True)
class OutBlocks:
    """Only the routing half of an :class:`InBlock`: what each source block ships to it.

    The engine reads these once per run for every block and keeps them in the cluster,
    so a route task never reads the destination block's ratings.
    """

    need_ptr: np.ndarray
    need_rows: np.ndarray

    out_block = InBlock.out_block


@numba.njit(nogil=True, cache=True)
def _counting_order(keys, n_keys):
    start = np.zeros(n_keys + 1, dtype=np.int64)
    for i in range(keys.shape[0]):
        start[keys[i] + 1] += 1
    for k in range(n_keys):
        start[k + 1] += start[k]
    order = np.empty(keys.shape[0], dtype=np.int64)
    for i in range(keys.shape[0]):
        order[start[keys[i]]] = i
        start[keys[i]] += 1
    return order


def counting_order(keys: np.ndarray, n_keys: int) -> np.ndarray:
    """The stable order sorting ``keys`` (each in ``[0, n_keys)``): ``np.argsort(keys, kind="stable")``
    in one counting pass."""
    return _counting_order(np.asarray(keys), int(n_keys))


@numba.njit(nogil=True, cache=True)
def _pairs_sorted(major, minor):
    for i in range(1, major.shape[0]):
        if major[i] < major[i - 1] or (major[i] == major[i - 1] and minor[i] < minor[i - 1]):
            return False
    return True


@numba.njit(nogil=True, cache=True)
def _pair_order(major, n_major, minor):
    start = np.zeros(n_major + 1, dtype=np.int64)
    for i in range(major.shape[0]):
        start[major[i] + 1] += 1
    for k in range(n_major):
        start[k + 1] += start[k]
    end = start[1:].copy()
    packed = np.empty(major.shape[0], dtype=np.int64)
    for i in range(major.shape[0]):  # bucket by major; each entry packs (minor, position)
        k = major[i]
        packed[start[k]] = (np.int64(minor[i]) << 32) | i
        start[k] += 1
    lo = 0
    for k in range(n_major):  # start[k] has moved to the bucket's end
        packed[lo : end[k]].sort()
        lo = end[k]
    return packed & 0xFFFFFFFF


def pair_order(major: np.ndarray, n_major: int, minor: np.ndarray, n_minor: int) -> np.ndarray:
    """The stable order sorting pairs by ``(major, minor)``: ``np.lexsort((minor, major))``.

    Keys are indices (``0 <= major < n_major``, ``0 <= minor < n_minor``). One counting
    pass buckets the pairs by ``major``; each bucket (a row's ratings, short) is then sorted
    in cache on ``minor`` packed with the pair's position, which also makes it stable. At
    ingest, where a block holds millions of ratings, this is 5-10 times faster than
    ``np.lexsort``.
    """
    major, minor = np.asarray(major), np.asarray(minor)
    if _pairs_sorted(major, minor):  # a block's ratings often come sorted: keep the pass sequential
        return np.arange(major.shape[0], dtype=np.int64)
    if major.shape[0] >= 2**32 or n_minor >= 2**31:  # the packing would overflow
        return np.lexsort((minor, major))
    return _pair_order(major, int(n_major), minor)


@numba.njit(nogil=True, cache=True)
def _route(order, dst_local, src_block, src_local, rating, n_src_blocks, stride, n_rated, out_block, out_index,
           out_rating):
    """Lay the ratings out in ``order``: each one's source block, position in that block's
    message and value, and each row's count (in ``n_rated[1:]``). Returns the sorted keys
    ``block * stride + row`` of the source rows needed."""
    rank = np.zeros(n_src_blocks * stride + 1, dtype=np.int64)
    for i in range(order.shape[0]):
        rank[src_block[i] * stride + src_local[i] + 1] = 1
    n_needed = 0
    for k in range(n_src_blocks * stride):
        n_needed += rank[k + 1]
    needed = np.empty(n_needed, dtype=np.int64)
    for k in range(n_src_blocks * stride):  # rank[k]: present keys below k
        if rank[k + 1]:
            needed[rank[k]] = k
        rank[k + 1] += rank[k]
    for p in range(order.shape[0]):
        i = order[p]
        out_block[p] = src_block[i]
        out_index[p] = rank[src_block[i] * stride + src_local[i]] - rank[src_block[i] * stride]
        out_rating[p] = rating[i]
        n_rated[dst_local[i] + 1] += 1
    return needed


def inblock_order(
    dst_local: np.ndarray, n_rows: int, src_block: np.ndarray, src_local: np.ndarray, n_src_blocks: int,
) -> np.ndarray:
    """The order of a block's ratings in its in-block: by destination row, then source
    block, then source row; inside a row, by routed row (:attr:`InBlock.col`)."""
    src_block, src_local = np.asarray(src_block), np.asarray(src_local)
    stride = int(src_local.max()) + 1 if src_local.size else 1
    key = src_block.astype(np.int64) * stride + src_local
    return pair_order(dst_local, n_rows, key, n_src_blocks * stride)


def build_inblock(
    dst_local: np.ndarray,
    src_block: np.ndarray,
    src_local: np.ndarray,
    rating: np.ndarray,
    n_rows: int,
    n_src_blocks: int,
) -> InBlock:
    """Build the in-block and out-blocks of one destination block from its ratings.

    Parameters
    ----------
    dst_local : ndarray, shape (nnz,)
        Local row of each rating in the destination block.
    src_block, src_local : ndarray, shape (nnz,)
        Block and local index of each rating's other side.
    rating : ndarray, shape (nnz,)
        Values; (destination, source) pairs must be unique.
    n_rows : int
        Rows of the destination block (rows without ratings are allowed).
    n_src_blocks : int
        Blocks on the source side.
    """
    src_local = np.asarray(src_local)
    # One key per (source block, source row): the keys present, in order, are the
    # out-blocks laid end to end in source-block order, and a rating's rank among them is
    # its row in the concatenated messages. Keys span about the source side's rows, so a
    # presence table finds them without sorting the ratings.
    stride = int(src_local.max()) + 1 if src_local.size else 1
    order = inblock_order(dst_local, n_rows, src_block, src_local, n_src_blocks)
    n_rated = np.zeros(n_rows + 1, dtype=np.int64)
    out = (np.empty(order.shape[0], dtype=index_dtype(n_src_blocks)), np.empty(order.shape[0], dtype=np.uint32),
           np.empty(order.shape[0], dtype=np.float32))
    needed = _route(order, np.asarray(dst_local), np.asarray(src_block), src_local, np.asarray(rating),
                    n_src_blocks, stride, n_rated, *out)
    need_block, need_rows = np.divmod(needed, stride)
    return InBlock(
        indptr=np.cumsum(n_rated),
        src_block=out[0],
        src_index=out[1],
        rating=out[2],
        need_ptr=np.searchsorted(need_block, np.arange(n_src_blocks + 1)).astype(np.int64),
        need_rows=need_rows.astype(np.uint32),
    )
