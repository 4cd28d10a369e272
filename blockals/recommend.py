"""Top-k recommendations, similar items and users, and folding in new rows.

Scores are dot products ``x_u . y_i`` (plus the item bias for biased models: the user's
own bias and the global mean do not change a user's ranking). Ties are broken by the
lower global item index, so results are deterministic. Rows with fewer than ``k``
candidates return what there is; the missing places hold index -1 and score NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from blockals.cluster import cache_bytes
from blockals.formats import check_meta, open_group, write_array
from blockals.store import RatingStore, Side, StoreRef, block_triples, load_rows

__all__ = ["top_k", "recommend_block", "write_recommendations", "read_recommendations", "similar"]

RECS_FORMAT = "blockals-recommendations"
RECS_FORMAT_VERSION = 1
# Bytes of scores one chunk of rows may hold.
SCORE_BYTES = 32 * 2**20


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best columns of every row, best first; ties go to the lower column.

    ``-inf`` marks excluded candidates; places beyond a row's candidates get index -1
    and score NaN.
    """
    n, m = scores.shape
    k_eff = min(k, m)
    idx = np.full((n, k), -1, dtype=np.int64)
    val = np.full((n, k), np.nan)
    if k_eff == 0 or n == 0:
        return idx, val
    kth = np.partition(scores, m - k_eff, axis=1)[:, m - k_eff]
    greater = scores > kth[:, None]
    equal = scores == kth[:, None]
    room = (k_eff - greater.sum(axis=1))[:, None]
    take = greater | (equal & (np.cumsum(equal, axis=1) <= room))
    cols = np.nonzero(take)[1].reshape(n, k_eff)  # exactly k_eff per row, in column order
    chosen = np.take_along_axis(scores, cols, axis=1)
    # Columns increase along each row, so a stable sort on -score breaks ties by column.
    order = np.argsort(-chosen, axis=1, kind="stable")
    cols = np.take_along_axis(cols, order, axis=1)
    chosen = np.take_along_axis(chosen, order, axis=1)
    valid = np.isfinite(chosen)
    idx[:, :k_eff] = np.where(valid, cols, -1)
    val[:, :k_eff] = np.where(valid, chosen, np.nan)
    return idx, val


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


def recommend_block(
    ref: StoreRef, block: int, n_item_blocks: int, U: np.ndarray, V: np.ndarray,
    item_bias: np.ndarray | None, k: int, exclude_seen: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` for every user of one user block (a Dask task): users, items, scores."""
    users = load_rows(ref, "users", block)
    seen = None
    if exclude_seen:
        rows, items, _ = block_triples(ref, "users", block, n_item_blocks, cache_bytes())
        seen = group_by_row(np.searchsorted(users, rows), items, users.shape[0])
    idx, val = recommend_rows(U, V, k, item_bias, seen)
    return users, idx, val


def write_recommendations(path: str, storage_options: dict | None, block: int, users: np.ndarray, items: np.ndarray, scores: np.ndarray) -> int:
    """Write one block's recommendations into ``<path>/blocks/<block>`` (a Dask task)."""
    group = open_group(f"{path}/blocks/{block}", "r+", storage_options)
    write_array(group, "users", users)
    write_array(group, "items", items)
    write_array(group, "scores", scores.astype(np.float32))
    return int(users.shape[0])


def read_recommendations(path: str, storage_options: dict | None = None) -> pd.DataFrame:
    """A recommendations store as a DataFrame with columns user, rank, item, score."""
    root = open_group(str(path), "r", storage_options)
    meta = check_meta(root.attrs.get("blockals"), str(path), RECS_FORMAT, RECS_FORMAT_VERSION, "recommendations store")
    user_ids, item_ids = root["user_ids"][...], root["item_ids"][...]
    frames = []
    for b in range(meta["n_blocks"]):
        g = root[f"blocks/{b}"]
        users, items, scores = g["users"][...], g["items"][...], g["scores"][...]
        k = items.shape[1]
        valid = items >= 0
        frames.append(pd.DataFrame({
            "user": np.repeat(user_ids[users], k).reshape(-1, k)[valid],
            "rank": np.broadcast_to(np.arange(1, k + 1), items.shape)[valid],
            "item": item_ids[np.where(valid, items, 0)][valid],
            "score": scores[valid],
        }))
    return pd.concat(frames, ignore_index=True).sort_values(["user", "rank"], ignore_index=True)


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


def fold_in(model: Any, ratings: pd.DataFrame, side: Side) -> Any:
    """Solve the rows of ``side`` in ``ratings`` against the model's fixed other side."""
    from blockals.config import ALSConfig
    from blockals.errors import InputError
    from blockals.kernels import solve
    from blockals.model import FoldIn
    from blockals.routing import build_inblock
    from blockals.sources import normalize_ratings

    for col in ("user", "item", "rating"):
        if col not in ratings.columns:
            raise InputError(f"fold_in ratings need a {col!r} column; they have {', '.join(map(str, ratings.columns))}.")
    config = ALSConfig(**model.config_)
    obj = config.objective(getattr(model, "global_mean_", 0.0))
    own, other = ("user", "item") if side == "users" else ("item", "user")
    src = model._index(ratings[other].to_numpy(), "items" if side == "users" else "users")
    if (src < 0).any():
        row = int(np.flatnonzero(src < 0)[0])
        raise InputError(f"{other} id in row {row} ({ratings[other].iloc[row]!r}) is not known to the model.")
    rating, problem = normalize_ratings(ratings["rating"])
    if problem is not None:
        raise InputError(problem[1].format(row=problem[0]))
    ids, dst = np.unique(ratings[own].to_numpy(), return_inverse=True)
    inblock = build_inblock(dst, np.zeros_like(src), src, src, rating, ids.shape[0], 1)
    F = model.item_factors_ if side == "users" else model.user_factors_
    carried = {"biased": "bias_", "wals": "weights_"}.get(config.mode)
    prefix = "item_" if side == "users" else "user_"
    if carried:
        F = np.hstack([F, getattr(model, prefix + carried)[:, None].astype(F.dtype)])
    G = F[:, : config.rank].astype(np.float64).T @ F[:, : config.rank].astype(np.float64) if obj.gram_weight else None
    given = None
    spec = getattr(obj, "row_weights" if side == "users" else "col_weights", None)
    if config.mode == "wals" and spec == "array":
        own_prefix = "user_" if side == "users" else "item_"
        known = pd.Index(getattr(model, own_prefix + "ids_")).get_indexer(ids)
        if (known < 0).any():
            raise InputError(f"the model's {side} weights were given as an array; {own} {ids[known < 0][0]!r} has none.")
        given = getattr(model, own_prefix + "weights_")[known]
    w = obj.side_weights(side, inblock, given)
    sys = obj.systems(inblock, F[inblock.need_rows], G, w)
    own_factors = model.user_factors_ if side == "users" else model.item_factors_
    known = pd.Index(model.user_ids_ if side == "users" else model.item_ids_).get_indexer(ids)
    x0 = np.zeros((ids.shape[0], sys.width))
    x0[known >= 0, : config.rank] = own_factors[known[known >= 0]]
    X = obj.finish(solve(sys, x0, config.rank, config.solver, config.cg_steps, config.nonnegative), inblock, w)
    k = config.rank
    return FoldIn(
        ids=ids,
        factors=X[:, :k].astype(own_factors.dtype),
        biases=X[:, k].copy() if config.mode == "biased" else None,
        weights=X[:, k].copy() if config.mode == "wals" else None,
    )
