"""Top-k recommendations and similar rows, for some users or, block by block, for all.

Scores are dot products ``x_u . y_i`` (plus the item bias for biased models: the user's
own bias and the global mean do not change a user's ranking). Ties are broken by the
lower global item index, so results are deterministic. Rows with fewer than ``k``
candidates return what there is; the missing places hold index -1 and score NaN.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from blockals import recstore
from blockals.cluster import cache_bytes, connect
from blockals.errors import InputError
from blockals.formats import refuse_overlap, resolve
from blockals.lock import Lease, holding
from blockals.progress import Progress, wait
from blockals.store import RatingStore, Side, StoreRef, load_inblock, load_rows, other_side, sender_rows

__all__ = ["recommend_rows", "Seen", "seen_csr", "rated_matrix", "recommend_block", "recommend_all", "similar"]

@dataclass(frozen=True)
class Seen:
    """The items each row must not get, as CSR: row r's are ``items[indptr[r]:indptr[r + 1]]``,
    in any order. With ``lookup``, ``items`` index into it and ``lookup[items]`` are the
    item indices (a user block's in-block columns and the items its messages carry)."""

    indptr: np.ndarray
    items: np.ndarray
    lookup: np.ndarray | None = None


def seen_csr(lists: list[np.ndarray]) -> Seen:
    """:class:`Seen` from one array of item indices per row."""
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([a.size for a in lists], out=indptr[1:])
    items = np.concatenate(lists).astype(np.int64) if lists else np.zeros(0, dtype=np.int64)
    return Seen(indptr, items)


def recommend_rows(
    U: np.ndarray, V: np.ndarray, k: int, item_bias: np.ndarray | None = None,
    seen: Seen | None = None, candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` items for each row of ``U`` (best first, ties to the lower item).

    ``seen`` (:class:`Seen`) lists the items each row must not get; ``candidates``
    restricts the items considered. Items are visited in decreasing norm, so a row stops
    once ``|x_u| |y_i| + b_i`` (Cauchy-Schwarz) bounds every item left below its k-th score.
    Scores are screened a tile at a time in float32 and ranked in float64
    (:func:`_top_k_products`); no rows x items matrix is ever held.
    """
    n, n_items = U.shape[0], V.shape[0]
    k = min(k, n_items)  # more than every item is every item, not k columns of padding
    idx = np.full((n, k), -1, dtype=np.int64)
    val = np.full((n, k), np.nan)
    if k == 0 or n == 0:
        return idx, val
    rank = U.shape[1]
    U64, V64 = np.asarray(U, dtype=np.float64), np.asarray(V, dtype=np.float64)
    offset = np.zeros(n_items) if item_bias is None else np.asarray(item_bias, dtype=np.float64).copy()
    if candidates is not None:
        allowed = np.zeros(n_items, dtype=bool)
        allowed[candidates] = True
        offset[~allowed] = -np.inf
    v_norm = np.sqrt(np.einsum("ij,ij->i", V64, V64))
    u_norm = np.sqrt(np.einsum("ij,ij->i", U64, U64))
    order = np.argsort(-v_norm, kind="stable")  # a NaN norm sorts last and disables the bound
    position = np.empty(n_items, dtype=np.int64)
    position[order] = np.arange(n_items)
    rows = min(_ROWS, n, max(1, 8 * _MASK_BYTES // max(n_items, 1)))
    cols = min(_COLS, -(-n_items // _RUN) * _RUN)  # whole runs
    n_tiles = -(-n_items // cols)
    # float32 holds the products of factors below 1e18 (rank < 1e2); beyond, screen in float64.
    screen = np.float32 if max(np.abs(U64).max(initial=0), np.abs(V64).max(initial=0)) < 1e18 and rank < 100 else np.float64
    # Padding: zero rows and columns; padded columns get offset -inf and norm 0.
    Us = np.zeros((-(-n // rows) * rows, rank), dtype=screen)
    Us[:n] = U64
    Vs = np.ascontiguousarray(V64[order])
    Vt = np.zeros((rank, n_tiles * cols), dtype=screen)
    Vt[:, :n_items] = Vs.T
    Vt = np.ascontiguousarray(Vt.reshape(rank, n_tiles, cols).transpose(1, 0, 2))
    padded = np.full(n_tiles * cols, -np.inf)
    padded[:n_items] = offset[order]
    tile_norm, tile_bias = np.zeros(n_tiles * cols), padded.copy()
    tile_norm[:n_items] = v_norm[order]
    # Largest norm and offset from each tile on (np.maximum keeps a NaN).
    tile_norm = np.maximum.accumulate(tile_norm.reshape(n_tiles, cols).max(axis=1)[::-1])[::-1].copy()
    tile_bias = np.maximum.accumulate(tile_bias.reshape(n_tiles, cols).max(axis=1)[::-1])[::-1].copy()
    # A screened score differs from the float64 one by at most (rank + 3) units of the
    # screen's rounding times |u| |v| (rounding the factors, then a sum of rank products
    # in any order); twice that is the margin a column must come within to be scored.
    # The bound, rounded in float64, gets a slack of the same form.
    vmax = float(np.max(v_norm, initial=0.0))
    margin = 2 * (rank + 3) * float(np.finfo(screen).eps) / 2 * u_norm * vmax
    bmax = float(np.max(np.abs(offset[np.isfinite(offset)]), initial=0.0))
    slack = 2 * (rank + 3) * float(np.finfo(np.float64).eps) * (u_norm * vmax + bmax)
    if seen is None:
        seen = Seen(np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))
    seen_column = position if seen.lookup is None else position[seen.lookup]
    _top_k_products(Us.reshape(-1, rows, rank), Vt, padded, U64, Vs, margin, seen.indptr, seen.items, seen_column,
                    order, u_norm, tile_norm, tile_bias, slack, idx, val)
    return idx, val


# Screened scores are made by BLAS a tile of _ROWS x _COLS at a time (256 KiB in float32,
# in cache while it is ranked) and scanned _RUN columns at a time; a group's seen items are
# marked in a bit matrix of at most _MASK_BYTES.
_ROWS, _COLS, _RUN, _MASK_BYTES = 32, 2048, 64, 4 << 20


@numba.njit(nogil=True, cache=True)
def _top_k_products(Us, Vt, offset, U, V, margin, indptr, items, seen_column, item, u_norm, tile_norm, tile_bias, slack, idx, val):
    """Fill ``idx``/``val`` with each row's best ``U[r] @ V.T + offset``, skipping its seen
    items (the columns ``seen_column[items[indptr[r]:indptr[r + 1]]]``) and non-finite scores.

    Columns are items in decreasing norm; ``item[c]`` is column ``c``'s item index, the
    one ``idx`` reports and ties are broken on. ``Us`` (rows in groups) and ``Vt`` (V.T in
    tiles of columns) screen every column in low precision, within ``margin[r]`` of the
    float64 score; a column that comes within the margin of the k-th score kept is scored
    in float64 from ``U`` and ``V``. A row skips tile ``t`` and every later one when
    ``u_norm[r] * tile_norm[t] + tile_bias[t] + slack[r]`` (their best possible score) is
    below its k-th; a group of rows stops when all of its rows have.
    """
    n, k = idx.shape
    rows, (n_tiles, rank, cols) = Us.shape[1], Vt.shape
    seen = np.zeros((rows, -(-n_tiles * cols // 8)), dtype=np.uint8)  # bits, to stay in cache
    worst = np.empty(rows)  # the score to beat: the k-th, or -inf while fewer are kept
    filled = np.zeros(rows, dtype=np.int64)
    S = np.empty((rows, cols), dtype=Us.dtype)
    for g in range(Us.shape[0]):
        r0, r1 = g * rows, min(g * rows + rows, n)
        for r in range(r0, r1):
            filled[r - r0], worst[r - r0] = 0, -np.inf
            for p in range(indptr[r], indptr[r + 1]):
                c = seen_column[items[p]]
                seen[r - r0, c >> 3] |= 1 << (c & 7)
        for t in range(n_tiles):
            live = False
            for i in range(r1 - r0):
                live |= not u_norm[r0 + i] * tile_norm[t] + tile_bias[t] + slack[r0 + i] < worst[i]
            if not live:
                break
            np.dot(Us[g], Vt[t], S)
            lo = t * cols
            for i in range(r1 - r0):
                r, w = r0 + i, worst[i]
                if u_norm[r] * tile_norm[t] + tile_bias[t] + slack[r] < w:
                    continue
                # Strictly below w, so an equal score with a lower item still enters.
                screen = min(w - margin[r], np.nextafter(w, -np.inf))
                for c0 in range(0, cols, _RUN):
                    # Views whose indices are known non-negative, so this first pass
                    # vectorizes: it counts a run's candidates without a branch, and most
                    # runs hold none.
                    scores, offsets = S[i, c0 : c0 + _RUN], offset[lo + c0 : lo + c0 + _RUN]
                    hits = 0
                    for j in range(_RUN):
                        hits += scores[j] + offsets[j] > screen
                    if hits == 0:
                        continue
                    for j in range(_RUN):
                        c = lo + c0 + j
                        if not scores[j] + offsets[j] > screen or seen[i, c >> 3] >> (c & 7) & 1:  # NaN fails the first test
                            continue
                        s = offset[c]
                        for f in range(rank):
                            s += U[r, f] * V[c, f]
                        e = item[c]
                        if not np.isfinite(s) or s < w or (s == w and e > idx[r, k - 1]):
                            continue
                        p = min(filled[i], k - 1)
                        while p > 0 and (val[r, p - 1] < s or (val[r, p - 1] == s and idx[r, p - 1] > e)):
                            val[r, p], idx[r, p] = val[r, p - 1], idx[r, p - 1]
                            p -= 1
                        val[r, p], idx[r, p] = s, e
                        filled[i] = min(filled[i] + 1, k)
                        if filled[i] == k:
                            w = val[r, k - 1]
                            screen = min(w - margin[r], np.nextafter(w, -np.inf))
                worst[i] = w
        for r in range(r0, r1):
            for p in range(indptr[r], indptr[r + 1]):
                seen[r - r0, seen_column[items[p]] >> 3] = 0


def seen_items(store: RatingStore, users: np.ndarray) -> Seen:
    """Item global indices each given user (global index) rated in ``store``.

    Users beyond the store's (folded in after training) rated nothing in it.
    """
    block, _ = store.assignment("users")
    out: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * users.shape[0]
    user_block = np.full(users.shape[0], -1)
    stored = users < block.shape[0]
    user_block[stored] = block[users[stored]]
    for b in np.unique(user_block[stored]):
        rows, items, _ = store.triples("users", int(b))
        order = np.argsort(rows, kind="stable")
        rows, items = rows[order], items[order]
        for pos in np.flatnonzero(user_block == b):
            lo, hi = np.searchsorted(rows, [users[pos], users[pos] + 1])
            out[pos] = items[lo:hi]
    return seen_csr(out)


def rated_matrix(store: RatingStore) -> sp.csr_array:
    """Which items each user rated in ``store``: a boolean users x items CSR matrix."""
    users, items = [], []
    for b in range(store.n_user_blocks):
        rows, cols, _ = store.triples("users", b)
        users.append(rows)
        items.append(cols)
    users, items = (np.concatenate(a) if a else np.zeros(0, dtype=np.int64) for a in (users, items))
    return sp.csr_array((np.ones(users.shape[0], dtype=bool), (users, items)), shape=(store.n_users, store.n_items))


@dataclass(frozen=True, kw_only=True)
class TopItems:
    """One block's recommendations: global row indices, the other side's indices and scores (best first)."""

    users: np.ndarray
    items: np.ndarray
    scores: np.ndarray


def recommend_block(
    ref: StoreRef, side: Side, block: int, n_other_blocks: int, U: np.ndarray, V: np.ndarray,
    bias: np.ndarray | None, k: int, exclude_seen: bool,
) -> TopItems:
    """Top-``k`` for every row of one block of ``side`` (a Dask task)."""
    rows = load_rows(ref, side, block)
    seen = None
    if exclude_seen:  # the in-block is CSR by row already: only its columns need the other side's indices
        inblock = load_inblock(ref, side, block, cache_bytes())
        seen = Seen(inblock.indptr, inblock.col, sender_rows(ref, side, inblock, n_other_blocks))
    idx, val = recommend_rows(U, V, k, bias, seen)
    return TopItems(users=rows, items=idx, scores=val)


def similar(F: np.ndarray, rows: np.ndarray, k: int, candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``F`` (among ``candidates``, default all) by cosine similarity to
    each of ``rows``, excluding itself."""
    norms = np.linalg.norm(F.astype(np.float64), axis=1)
    unit = np.divide(F, norms[:, None], out=np.zeros(F.shape), where=norms[:, None] > 0)
    itself = Seen(np.arange(rows.shape[0] + 1, dtype=np.int64), np.asarray(rows, dtype=np.int64))
    return recommend_rows(unit[rows], unit, k, None, itself, candidates)


def to_frame(left: str, left_ids: Any, right: str, right_ids: np.ndarray, idx: np.ndarray, val: np.ndarray) -> pd.DataFrame:
    """Long format: one row per (query, rank) with a result."""
    k = idx.shape[1]
    valid = idx >= 0
    return pd.DataFrame({
        left: np.repeat(np.asarray(left_ids), k).reshape(-1, k)[valid],
        "rank": np.broadcast_to(np.arange(1, k + 1), idx.shape)[valid],
        right: right_ids[np.where(valid, idx, 0)][valid],
        "score": val[valid],
    })


RECOMMEND_FORMATS = ("zarr", "parquet", "frame")


def parse_format(output: Any, fmt: str | None) -> str:
    """Where ``recommend_all`` writes: ``"frame"`` without an output, else ``fmt`` or the output's suffix."""
    if output is None:
        if fmt not in (None, "frame"):
            raise InputError(f"format={fmt!r} writes to a path; give output=, or leave format unset for a DataFrame.")
        return "frame"
    if fmt is None:
        suffix = os.path.splitext(str(output).rstrip("/"))[1]
        if suffix not in ("", ".zarr", ".parquet"):  # a user asking for recs.csv would get a Zarr group
            raise InputError(f"output {output} ends in {suffix}; recommendations are written as Zarr (.zarr) or "
                             f"Parquet (.parquet), so name it so or pass format='zarr' or 'parquet'.")
        return "parquet" if suffix == ".parquet" else "zarr"
    if fmt not in RECOMMEND_FORMATS[:2]:
        raise InputError(f"format must be one of 'zarr', 'parquet', got {fmt!r}.")
    return fmt


def recommend_all(
    store: RatingStore | None, side: Side, F: np.ndarray, G: np.ndarray, bias: np.ndarray | None,
    row_ids: np.ndarray, other_ids: np.ndarray, n: int, output: str | None, fmt: str, exclude_seen: bool = True,
    kept: Seen | None = None, client: Any = None, storage_options: dict | None = None,
    progress: Progress = Progress(),
) -> str | pd.DataFrame:
    """Top-``n`` of the other side for every row of ``side``: to a recommendations store
    (``fmt="zarr"``), a Parquet dataset (``"parquet"``) or a DataFrame (``"frame"``).

    The rows of ``store`` are scored one Dask task per block, against the other side a
    tile at a time (:func:`recommend_rows`), so no score matrix is ever held; rows beyond
    the store (folded in after training, or every row of a model trained without a saved
    store) are scored here, their seen items taken from ``kept``. A Parquet dataset (one
    file per block, columns ``<row side>, rank, <other side>, score`` in original ids). Both
    are written beside ``output`` and moved into place when whole
    (:func:`blockals.recstore.stage`), so a failed run leaves an earlier output as it was.
    ``output`` is resolved here, on the driver (workers started elsewhere write where the
    caller meant), and refused if it is, contains or lies inside ``store``.
    The store is leased for reading and ``output`` for writing (:mod:`blockals.lock`): a
    second run writing the same output is refused rather than one of the two results lost.
    The pass over the store's blocks is reported to ``progress``.
    """
    if output is not None:  # checked before the leases, which an output inside the store would trip over
        output = resolve(output)
        refuse_overlap({"the output": output}, {"the ratings store": None if store is None else store.path})
    with holding(None if store is None else store.reading(),
                 None if output is None else Lease(output, "recommendations", storage_options, breakable=False)):
        return _recommend_all(store, side, F, G, bias, row_ids, other_ids, n, output, fmt, exclude_seen, kept, client,
                              storage_options, progress)


def _recommend_all(
    store: RatingStore | None, side: Side, F: np.ndarray, G: np.ndarray, bias: np.ndarray | None,
    row_ids: np.ndarray, other_ids: np.ndarray, n: int, output: str | None, fmt: str, exclude_seen: bool,
    kept: Seen | None, client: Any, storage_options: dict | None, progress: Progress,
) -> str | pd.DataFrame:
    names = ("user", "item") if side == "users" else ("item", "user")
    n = min(n, other_ids.shape[0])
    if fmt == "frame":
        tops = _score(store, side, F, G, bias, n, exclude_seen, kept, client, None, fmt, None, None, progress)
        frames = [to_frame(names[0], row_ids[t.users], names[1], other_ids, t.items, t.scores) for t in tops]
        empty = to_frame(names[0], row_ids[:0], names[1], other_ids, np.zeros((0, n), int), np.zeros((0, n)))
        return pd.concat(frames, ignore_index=True) if frames else empty
    staged = recstore.stage(output, fmt, storage_options)
    try:
        if fmt == "zarr":
            n_blocks = (0 if store is None else store.n_blocks(side)) + (F.shape[0] > _stored(store, side))
            recstore.create(staged, n, n_blocks, row_ids, other_ids, storage_options, side)
        _score(store, side, F, G, bias, n, exclude_seen, kept, client, staged, fmt, (row_ids, other_ids),
               storage_options, progress)
        recstore.publish(staged, output, fmt, storage_options)
    finally:
        recstore.discard(staged, storage_options)
    return output


def _stored(store: RatingStore | None, side: Side) -> int:
    return 0 if store is None else store.n_rows(side)


def _score(
    store: RatingStore | None, side: Side, F: np.ndarray, G: np.ndarray, bias: np.ndarray | None, n: int,
    exclude_seen: bool, kept: Seen | None, client: Any, staged: str | None, fmt: str,
    ids: tuple[np.ndarray, np.ndarray] | None, storage_options: dict | None, progress: Progress,
) -> list:
    """Every row's top ``n``: the store's by blocks in Dask tasks, the rest here; each
    block's :class:`TopItems` (``fmt="frame"``) or, written to ``staged``, its row count."""
    stored = _stored(store, side)
    n_store_blocks = 0 if store is None else store.n_blocks(side)
    tops: list = []
    if n_store_blocks:
        tag = uuid.uuid4().hex[:8]
        with connect(client, ratings=store.nnz) as c:
            V = c.scatter(G, broadcast=True)
            b_ = None if bias is None else c.scatter(bias, broadcast=True)
            sent = None if fmt != "parquet" else tuple(c.scatter(a, broadcast=True) for a in ids)
            for b in range(n_store_blocks):
                top = c.submit(recommend_block, store.ref, side, b, store.n_blocks(other_side(side)),
                               F[store.rows(side, b)], V, b_, n, exclude_seen, key=f"blockals-recommend-{side}-{b}-{tag}")
                if fmt != "frame":
                    top = c.submit(_write_block, staged, fmt, storage_options, b, top, sent, side,
                                   key=f"blockals-recommend-write-{side}-{b}-{tag}")
                tops.append(top)
            with progress.step(side, len(tops), "blocks") as report:
                wait(tops, report)
            tops = c.gather(tops)
    if F.shape[0] > stored:
        seen = None
        if exclude_seen and kept is not None:
            seen = Seen(kept.indptr[stored:] - kept.indptr[stored], kept.items[kept.indptr[stored]:])
        idx, val = recommend_rows(F[stored:], G, n, bias, seen)
        top = TopItems(users=np.arange(stored, F.shape[0]), items=idx, scores=val)
        tops.append(top if fmt == "frame" else _write_block(staged, fmt, storage_options, n_store_blocks, top, ids, side))
    return tops


def _write_block(target: str, fmt: str, storage_options: dict | None, block: int, top: TopItems,
                 ids: tuple[np.ndarray, np.ndarray] | None, side: Side) -> int:
    if fmt == "zarr":
        return recstore.write_block(target, storage_options, block, top.users, top.items, top.scores)
    row_ids, other_ids = ids
    names = ("user", "item") if side == "users" else ("item", "user")
    recstore.write_parquet_part(target, storage_options, block,
                                to_frame(names[0], row_ids[top.users], names[1], other_ids, top.items, top.scores))
    return int(top.users.shape[0])
