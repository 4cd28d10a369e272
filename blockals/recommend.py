"""Top-k recommendations and similar rows, for some users or, block by block, for all.

Scores are dot products ``x_u . y_i`` (plus the item bias for biased models: the user's
own bias and the global mean do not change a user's ranking). Ties are broken by the
lower global item index, so results are deterministic. Rows with fewer than ``k``
candidates return what there is; the missing places hold index -1 and score NaN.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import pandas as pd

from blockals import recstore
from blockals.cluster import cache_bytes, connect
from blockals.store import RatingStore, StoreRef, block_triples, load_rows

__all__ = ["top_k", "recommend_rows", "recommend_block", "recommend_all", "similar"]

# Bytes of scores one chunk of rows may hold.
SCORE_BYTES = 32 * 2**20


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best columns of every row, best first; ties go to the lower column.

    ``-inf`` marks excluded candidates; places beyond a row's candidates get index -1
    and score NaN. One compiled pass per row keeps the best ``k`` so far and compares
    each score with the worst of them: a sort or partition of the whole row (what NumPy
    offers) cost 88% of ``recommend_all`` at 1B ratings.
    """
    n = scores.shape[0]
    idx = np.full((n, k), -1, dtype=np.int64)
    val = np.full((n, k), np.nan)
    if k > 0 and n > 0:
        _top_k_rows(np.ascontiguousarray(scores, dtype=np.float64), idx, val)
    return idx, val


@numba.njit(nogil=True, cache=True)
def _top_k_rows(scores, idx, val):
    k = idx.shape[1]
    for r in range(scores.shape[0]):
        filled = 0
        for c in range(scores.shape[1]):
            s = scores[r, c]
            if not np.isfinite(s) or (filled == k and s <= val[r, k - 1]):
                continue  # excluded, or no better than the k-th: a later column loses a tie
            p = filled if filled < k else k - 1
            while p > 0 and val[r, p - 1] < s:  # after equal scores: they have lower columns
                val[r, p] = val[r, p - 1]
                idx[r, p] = idx[r, p - 1]
                p -= 1
            val[r, p] = s
            idx[r, p] = c
            if filled < k:
                filled += 1


def score_rows(U: np.ndarray, V: np.ndarray, item_bias: np.ndarray | None) -> np.ndarray:
    scores = U.astype(np.float64) @ V.astype(np.float64).T
    return scores if item_bias is None else scores + item_bias[None, :]


def recommend_rows(
    U: np.ndarray, V: np.ndarray, k: int, item_bias: np.ndarray | None = None,
    seen: list[np.ndarray] | None = None, candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` items for each row of ``U``, in chunks that bound the score memory.

    ``seen[r]`` lists item indices row ``r`` must not get; ``candidates`` restricts the
    items considered.
    """
    n = U.shape[0]
    idx = np.full((n, k), -1, dtype=np.int64)
    val = np.full((n, k), np.nan)
    allowed = None
    if candidates is not None:
        allowed = np.zeros(V.shape[0], dtype=bool)
        allowed[candidates] = True
    chunk = max(1, SCORE_BYTES // (8 * max(1, V.shape[0])))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        scores = score_rows(U[start:stop], V, item_bias)
        if allowed is not None:
            scores[:, ~allowed] = -np.inf
        if seen is not None:
            for r in range(start, stop):
                scores[r - start, seen[r]] = -np.inf
        idx[start:stop], val[start:stop] = top_k(scores, k)
    return idx, val


def seen_items(store: RatingStore, users: np.ndarray) -> list[np.ndarray]:
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
    return out


def group_by_row(rows: np.ndarray, values: np.ndarray, n: int) -> list[np.ndarray]:
    """``values`` split by local row ``0 .. n-1`` (rows without values get empty arrays)."""
    order = np.argsort(rows, kind="stable")
    bounds = np.searchsorted(rows[order], np.arange(n + 1))
    return [values[order[bounds[r] : bounds[r + 1]]] for r in range(n)]


@dataclass(frozen=True, kw_only=True)
class TopItems:
    """One user block's recommendations: global user indices, item indices and scores (best first)."""

    users: np.ndarray
    items: np.ndarray
    scores: np.ndarray


def recommend_block(
    ref: StoreRef, block: int, n_item_blocks: int, U: np.ndarray, V: np.ndarray,
    item_bias: np.ndarray | None, k: int, exclude_seen: bool,
) -> TopItems:
    """Top-``k`` for every user of one user block (a Dask task)."""
    users = load_rows(ref, "users", block)
    seen = None
    if exclude_seen:
        rows, items, _ = block_triples(ref, "users", block, n_item_blocks, cache_bytes())
        seen = group_by_row(np.searchsorted(users, rows), items, users.shape[0])
    idx, val = recommend_rows(U, V, k, item_bias, seen)
    return TopItems(users=users, items=idx, scores=val)


def similar(F: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``F`` by cosine similarity to each of ``rows``, excluding itself."""
    norms = np.linalg.norm(F.astype(np.float64), axis=1)
    unit = np.divide(F, norms[:, None], out=np.zeros(F.shape), where=norms[:, None] > 0)
    seen = [np.array([r]) for r in rows]
    return recommend_rows(unit[rows], unit, k, None, seen)


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


def recommend_all(
    store: RatingStore, user_factors: np.ndarray, item_factors: np.ndarray, item_bias: np.ndarray | None,
    user_ids: np.ndarray, item_ids: np.ndarray, n: int, output: str, exclude_seen: bool = True,
    client: Any = None, storage_options: dict | None = None,
) -> str:
    """Top-``n`` items for every user of ``store``, written to a recommendations store.

    One Dask task per user block scores its users against all items in chunks (a
    batched product and a partial top-k), so the full score matrix never exists.
    Read the result with :func:`blockals.recstore.read_recommendations`.
    """
    recstore.create(output, n, store.n_user_blocks, user_ids, item_ids, storage_options)
    tag = uuid.uuid4().hex[:8]
    with connect(client) as c:
        V = c.scatter(item_factors, broadcast=True)
        bias = None if item_bias is None else c.scatter(item_bias, broadcast=True)
        writes = []
        for b in range(store.n_user_blocks):
            top = c.submit(recommend_block, store.ref, b, store.n_item_blocks, user_factors[store.rows("users", b)], V,
                           bias, n, exclude_seen, key=f"blockals-recommend-{b}-{tag}")
            writes.append(c.submit(_write_block, output, storage_options, b, top, key=f"blockals-recommend-write-{b}-{tag}"))
        c.gather(writes)
    recstore.commit(output, storage_options)
    return output


def _write_block(output: str, storage_options: dict | None, block: int, top: TopItems) -> int:
    return recstore.write_block(output, storage_options, block, top.users, top.items, top.scores)
