"""Ingest: from a rating source to a blocked, routed ratings store.

Four passes over the data, each a set of Dask tasks, none holding more than one
partition or one block in memory:

1. *check*: each partition is validated (ids, ratings) and its ids counted;
   the driver builds the id maps and deals users and items to blocks
   (:mod:`blockals.partition`).
2. *stage*: each partition maps its ids to global indices and is written to a staging
   area sorted by user block.
3. *users*: each user block gathers its ratings from every staged partition, resolves
   duplicate (user, item) pairs, builds its in-block and out-blocks
   (:mod:`blockals.routing`), writes them, and stages its ratings again by item block.
4. *items*: each item block gathers its ratings and builds its in-block.

The completion marker is written last; an ingest that fails or is interrupted leaves a
store that readers refuse, and a failed ingest removes what it wrote.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import dask
import numpy as np
import pandas as pd

from blockals.errors import InputError
from blockals.partition import DEFAULT_BLOCK_BUDGET, assign_blocks, default_n_blocks, parse_n_blocks
from blockals.routing import build_inblock
from blockals.sources import check_partition, convert_ids, normalize_ratings, normalize_timestamps, read_source, reading
from blockals.formats import open_group, remove_path, writable_meta, write_array
from blockals.store import FORMAT, FORMAT_VERSION, SIDES, RatingStore, Side, new_store_id, other_side

__all__ = ["ingest", "combine_duplicates", "DUPLICATE_POLICIES"]

DUPLICATE_POLICIES = ("error", "sum", "last", "mean")
STAGING = "_staging"


def combine_duplicates(
    dst: np.ndarray, src: np.ndarray, rating: np.ndarray, row: np.ndarray, policy: str,
    time: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, tuple[int, int, int, int] | None, np.ndarray | None]:
    """Resolve repeated (dst, src) pairs.

    Returns ``(dst, src, rating, n_duplicates, example)``; ``example`` is
    ``(dst, src, first_row, second_row)`` of the pair whose repeat comes first in the
    source (the earliest row that repeats an earlier one). With
    ``policy="error"`` and repeats present, the arrays are returned unresolved.
    ``"sum"`` adds the values (as Spark does silently), ``"mean"`` averages them,
    ``"last"`` keeps the value of the latest source row. A combined pair keeps the
    timestamp of its latest source row.
    """
    order = np.lexsort((row, src, dst))
    dst, src, rating, row = dst[order], src[order], rating[order], row[order]
    time = None if time is None else time[order]
    first = np.ones(dst.shape[0], dtype=bool)
    first[1:] = (dst[1:] != dst[:-1]) | (src[1:] != src[:-1])
    n_dup = int(dst.shape[0] - first.sum())
    if n_dup == 0:
        return dst, src, rating, 0, None, time
    repeats = np.flatnonzero(~first)
    group_start = np.maximum.accumulate(np.where(first, np.arange(dst.shape[0]), 0))
    earliest = repeats[np.argmin(row[repeats])]
    g = group_start[earliest]
    example = (int(dst[g]), int(src[g]), int(row[g]), int(row[earliest]))
    if policy == "error":
        return dst, src, rating, n_dup, example, time
    starts = np.flatnonzero(first)
    last = np.append(starts[1:], dst.shape[0]) - 1
    time = None if time is None else time[last]
    if policy == "last":
        values = rating[last]
    else:
        values = np.add.reduceat(rating.astype(np.float64), starts)
        if policy == "mean":
            values /= np.diff(np.append(starts, dst.shape[0]))
    return dst[starts], src[starts], values.astype(np.float32), n_dup, example, time


# -- tasks -----------------------------------------------------------------------


def _stage_partition(
    part: pd.DataFrame,
    index: int,
    offset: int,
    path: str,
    storage_options: dict | None,
    ids: dict[str, pd.Index],
    kinds: dict[str, str],
    user_block: np.ndarray,
    n_user_blocks: int,
) -> np.ndarray:
    """Map one partition's ids and stage it sorted by user block; returns its block offsets."""
    dst = ids["users"].get_indexer(convert_ids(part["user"], kinds["users"]))
    src = ids["items"].get_indexer(convert_ids(part["item"], kinds["items"]))
    rating = normalize_ratings(part["rating"])[0].astype(np.float32)
    row = offset + np.arange(len(part), dtype=np.int64)
    block = user_block[dst]
    order = np.argsort(block, kind="stable")
    group = open_group(path, "r+", storage_options).require_group(f"{STAGING}/parts/{index}")
    columns = [("dst", dst), ("src", src), ("rating", rating), ("row", row)]
    if "timestamp" in part:
        columns.append(("time", normalize_timestamps(part["timestamp"])[0]))
    for name, values in columns:
        write_array(group, name, values[order])
    return np.searchsorted(block[order], np.arange(n_user_blocks + 1))


def _gather_staged(root, stages: Sequence[tuple[str, np.ndarray]], block: int, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Concatenate the slices of ``block`` from each staged group (offsets known up front)."""
    pieces: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for stage, ptr in stages:
        lo, hi = int(ptr[block]), int(ptr[block + 1])
        if lo == hi:  # most of the reads with many blocks; skip them
            continue
        group = root[stage]
        for name in names:
            pieces[name].append(group[name][lo:hi])
    return {
        name: np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32 if name == "rating" else np.int64)
        for name, parts in pieces.items()
    }


def _build_block(
    path: str,
    storage_options: dict | None,
    side: Side,
    block: int,
    stages: Sequence[tuple[str, np.ndarray]],
    assignment: dict[str, tuple[np.ndarray, np.ndarray]],
    duplicates: str | None,
    timed: bool = False,
) -> dict[str, Any]:
    """Build, write and (for users) restage one destination block; returns its stats."""
    root = open_group(path, "r+", storage_options)
    names = ("dst", "src", "rating", "row") if side == "users" else ("dst", "src", "rating")
    data = _gather_staged(root, stages, block, names + (("time",) if timed and side == "users" else ()))
    dst, src, rating, time = data["dst"], data["src"], data["rating"], data.get("time")
    stats: dict[str, Any] = {"duplicates": 0, "example": None}
    if duplicates is not None:
        dst, src, rating, n_dup, example, time = combine_duplicates(dst, src, rating, data["row"], duplicates, time)
        stats.update(duplicates=n_dup, example=example)
        if n_dup and duplicates == "error":
            return stats
    dst_block, dst_local = assignment[side]
    src_block, src_local = assignment[other_side(side)]
    rows = np.flatnonzero(dst_block == block)
    n_src_blocks = int(src_block.max()) + 1
    # In-block order (by row, then the other side's global index), so timestamps line up.
    order = np.lexsort((src, dst_local[dst]))
    dst, src, rating = dst[order], src[order], rating[order]
    inblock = build_inblock(
        dst_local[dst], src_block[src], src_local[src], src, rating, rows.shape[0], n_src_blocks
    )
    group = root[f"{side}/blocks/{block}"]
    write_array(group, "rows", rows)
    for name in inblock.__dataclass_fields__:
        write_array(group, name, getattr(inblock, name))
    if time is not None:
        write_array(group, "time", time[order])
    if side == "users":
        # Stage again, by item block, for the item-side pass.
        order = np.argsort(src_block[src], kind="stable")
        staged = root.require_group(f"{STAGING}/users/{block}")
        write_array(staged, "dst", src[order])
        write_array(staged, "src", dst[order])
        write_array(staged, "rating", rating[order])
        stats["staged"] = np.searchsorted(src_block[src][order], np.arange(n_src_blocks + 1))
    stats.update(
        nnz=int(inblock.nnz),
        rating_sum=float(rating.astype(np.float64).sum()),
        rating_min=float(rating.min()) if rating.size else np.inf,
        rating_max=float(rating.max()) if rating.size else -np.inf,
        message_rows=np.diff(inblock.need_ptr).tolist(),
        empty_rows=int((inblock.counts == 0).sum()),
    )
    return stats


# -- driver ----------------------------------------------------------------------


def cluster_budget() -> int:
    """A third of the memory limit per thread of the current client's smallest worker.

    With no client, or workers without a memory limit, the module default
    (:data:`blockals.partition.DEFAULT_BLOCK_BUDGET`, 256 MiB).
    """
    from distributed import default_client

    try:
        workers = default_client().scheduler_info(n_workers=-1)["workers"].values()
    except ValueError:  # no client
        return DEFAULT_BLOCK_BUDGET
    per_thread = [w["memory_limit"] // max(1, w["nthreads"]) for w in workers if w.get("memory_limit")]
    return min(per_thread) // 3 if per_thread else DEFAULT_BLOCK_BUDGET


def _prepare_target(path: str, overwrite: bool, storage_options: dict | None, clear: bool = True) -> None:
    """Clear the way for a new store, refusing to destroy anything that is not ours.

    With ``clear=False`` only refuse: nothing is removed until the source has passed its
    checks, so a bad source does not cost the store it was meant to replace.
    """
    meta = writable_meta(path, FORMAT, "store", storage_options)
    if meta is None:
        return
    if meta.get("complete") and not overwrite:
        raise InputError(f"{path} already holds a complete ratings store; pass overwrite=True to replace it.")
    if clear:
        remove_path(path, storage_options)  # ours: complete (overwrite) or left half-written


def _combine_counts(parts: Sequence[pd.Series], kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ids (in their final type) and their rating counts."""
    counts = pd.concat(parts)
    ids = convert_ids(counts.index, kind)
    combined = pd.Series(counts.to_numpy(), index=ids).groupby(level=0, sort=True).sum()
    return combined.index.to_numpy(), combined.to_numpy(dtype=np.int64)


def _parse_duplicates(value: str) -> str:
    if value not in DUPLICATE_POLICIES:
        raise InputError(f"duplicates must be one of {', '.join(DUPLICATE_POLICIES)}; got {value!r}.")
    return value


def ingest(
    source: Any,
    path: str | os.PathLike,
    user_col: str = "user",
    item_col: str = "item",
    rating_col: str = "rating",
    n_user_blocks: int | None = None,
    n_item_blocks: int | None = None,
    *,
    duplicates: str = "error",
    overwrite: bool = False,
    block_budget: int | None = None,
    storage_options: dict | None = None,
    like: RatingStore | None = None,
    timestamp_col: str | None = None,
) -> RatingStore:
    """Partition ratings into user and item blocks and write a ratings store.

    Parameters
    ----------
    source : DataFrame, Dask DataFrame, path, glob or (users, items, ratings)
        See :func:`blockals.sources.read_source` for the accepted forms.
    path : str or path-like
        Where to write the Zarr group; a local path or an fsspec URL (``s3://...``).
    user_col, item_col, rating_col : str
        Column names in the source.
    n_user_blocks, n_item_blocks : int, optional
        Block counts, each at most the number of users (items): a larger count is refused
        rather than clamped, since a block needs at least one row. By default chosen so one
        block's solve fits ``block_budget`` bytes.
    duplicates : {"error", "sum", "last", "mean"}
        What a repeated (user, item) pair means. ``"error"`` refuses the source, naming
        the count and the first repeated pair; Spark sums repeats silently (``"sum"``).
    overwrite : bool
        Replace a complete store at ``path``.
    block_budget : int, optional
        Bytes one block's solve may use when block counts are chosen automatically. By
        default a third of the memory limit per thread of the smallest worker of the
        current Dask client (:func:`cluster_budget`): a worker thread solves one block at
        a time beside its block cache. The store records the budget it used.
    storage_options : dict, optional
        Passed to fsspec for remote paths.
    timestamp_col : str, optional
        A column of timestamps (numbers or datetimes) to keep with the ratings, for
        temporal splits; MovieLens files bring theirs.
    like : RatingStore, optional
        Reuse this store's id maps and block assignment (every id must be in it), so the
        new store lines up block for block with it: how train and test splits are made.

    Returns
    -------
    RatingStore
        The complete store, opened.
    """
    path = os.fspath(path)
    duplicates = _parse_duplicates(duplicates)
    for name, value in (("n_user_blocks", n_user_blocks), ("n_item_blocks", n_item_blocks)):
        if value is not None:
            parse_n_blocks(value, name, np.iinfo(np.int64).max)
    src = read_source(source, user_col, item_col, rating_col, timestamp_col)
    timed = "timestamp" in src.frame.columns
    _prepare_target(path, overwrite, storage_options, clear=False)

    partitions = src.frame.to_delayed()
    with reading(src.description):  # a malformed row deep in a file fails inside its partition
        checks = dask.compute(*[dask.delayed(check_partition)(p) for p in partitions])
    offsets = np.concatenate([[0], np.cumsum([c.n_rows for c in checks])])
    for check, offset in zip(checks, offsets):
        if check.problem is not None:
            row, sentence = check.problem
            raise InputError(sentence.format(row=int(offset + row)))
    if offsets[-1] == 0:
        raise InputError(f"the source {src.description} has no ratings.")

    kinds: dict[str, str] = {}
    ids: dict[str, pd.Index] = {}
    counts: dict[str, np.ndarray] = {}
    for side, attr in (("users", "user"), ("items", "item")):
        kinds[side] = "str" if any(getattr(c, f"{attr}_kind") == "str" for c in checks) else "int"
        if like is not None:
            kinds[side] = like.params["id_kinds"][side]
        unique, counts[side] = _combine_counts([getattr(c, f"{attr}_counts") for c in checks], kinds[side])
        ids[side] = pd.Index(unique)
    if like is not None:
        _raise_unless_known(ids, like)
        ids = {side: like.ids(side) for side in SIDES}
        n_user_blocks, n_item_blocks = like.n_user_blocks, like.n_item_blocks
    n_blocks = {
        "users": n_user_blocks
        if n_user_blocks is None
        else parse_n_blocks(n_user_blocks, "n_user_blocks", len(ids["users"])),
        "items": n_item_blocks
        if n_item_blocks is None
        else parse_n_blocks(n_item_blocks, "n_item_blocks", len(ids["items"])),
    }
    nnz_upper = int(offsets[-1])
    if block_budget is None:
        block_budget = cluster_budget()
    for side in SIDES:
        if n_blocks[side] is None:
            other = "items" if side == "users" else "users"
            n_blocks[side] = default_n_blocks(len(ids[side]), nnz_upper, block_budget, len(ids[other]))
    if like is None:
        assignment = {side: assign_blocks(counts[side], n_blocks[side]) for side in SIDES}
    else:
        assignment = {side: like.assignment(side) for side in SIDES}

    params = {
        "source": src.description,
        "user_col": user_col,
        "item_col": item_col,
        "rating_col": rating_col,
        "n_user_blocks": n_blocks["users"],
        "n_item_blocks": n_blocks["items"],
        "block_budget": int(block_budget),
        "duplicates": duplicates,
        "id_kinds": kinds,
        "timestamps": timed,
    }
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "store_id": new_store_id(),
        "params": params,
        "complete": False,
    }
    _prepare_target(path, overwrite, storage_options)
    try:
        # Created with its attributes in one write: never a group that does not say it is ours.
        root = open_group(path, "w", storage_options, attributes={"blockals": meta})
        for side in SIDES:
            group = root.require_group(side)
            write_array(group, "ids", ids[side].to_numpy())
            write_array(group, "block", assignment[side][0])
            write_array(group, "local", assignment[side][1])
            blocks = group.require_group("blocks")
            for b in range(n_blocks[side]):
                blocks.require_group(str(b))
        root.require_group(f"{STAGING}/parts")
        root.require_group(f"{STAGING}/users")

        shared_ids = dask.delayed(ids, pure=True)
        shared_assignment = dask.delayed(assignment, pure=True)
        part_ptrs = dask.compute(
            *[
                dask.delayed(_stage_partition)(
                    part, p, int(offsets[p]), path, storage_options, shared_ids, kinds,
                    dask.delayed(assignment["users"][0], pure=True), n_blocks["users"],
                )
                for p, part in enumerate(partitions)
            ]
        )
        part_stages = [(f"{STAGING}/parts/{p}", ptr) for p, ptr in enumerate(part_ptrs)]
        user_stats = dask.compute(
            *[
                dask.delayed(_build_block)(
                    path, storage_options, "users", b, part_stages, shared_assignment, duplicates, timed
                )
                for b in range(n_blocks["users"])
            ]
        )
        _raise_on_duplicates(user_stats, ids, duplicates)
        user_stages = [(f"{STAGING}/users/{b}", s["staged"]) for b, s in enumerate(user_stats)]
        item_stats = dask.compute(
            *[
                dask.delayed(_build_block)(
                    path, storage_options, "items", j, user_stages, shared_assignment, None
                )
                for j in range(n_blocks["items"])
            ]
        )
        meta["stats"] = _store_stats(ids, assignment, n_blocks, user_stats, item_stats)
        meta["params"]["duplicates_resolved"] = sum(s["duplicates"] for s in user_stats)
        del root[STAGING]
        meta["complete"] = True
        root.attrs["blockals"] = meta  # the completion marker: written last
    except BaseException:
        remove_path(path, storage_options)
        raise
    return RatingStore(path, storage_options)


def _raise_unless_known(ids: dict[str, pd.Index], like: RatingStore) -> None:
    for side in SIDES:
        unknown = ids[side][like.ids(side).get_indexer(ids[side]) < 0]
        if len(unknown):
            value = unknown[0].item() if isinstance(unknown[0], np.generic) else unknown[0]
            raise InputError(
                f"{side[:-1]} id {value!r} is not in {like.path}, whose ids and blocks this store must share."
            )


def _raise_on_duplicates(stats: Sequence[dict], ids: dict[str, pd.Index], policy: str) -> None:
    n_dup = sum(s["duplicates"] for s in stats)
    if not n_dup or policy != "error":
        return
    user, item, first, second = min((s["example"] for s in stats if s["example"]), key=lambda e: e[3])
    # Python scalars, so the message shows 42 or 'abc' rather than np.int64(42).
    user_id, item_id = (ids["users"][user], ids["items"][item])
    user_id, item_id = (v.item() if isinstance(v, np.generic) else v for v in (user_id, item_id))
    raise InputError(
        f"the source has {n_dup} duplicate (user, item) pair{'s' if n_dup > 1 else ''}, the first "
        f"being user {user_id!r} and item {item_id!r} in rows {first} and "
        f"{second}; pass duplicates='sum', 'last' or 'mean' to combine them."
    )


def _store_stats(ids, assignment, n_blocks, user_stats, item_stats) -> dict[str, Any]:
    nnz = sum(s["nnz"] for s in user_stats)
    stats: dict[str, Any] = {
        "n_users": len(ids["users"]),
        "n_items": len(ids["items"]),
        "nnz": nnz,
        "rating_mean": sum(s["rating_sum"] for s in user_stats) / max(nnz, 1),
        "rating_min": min(s["rating_min"] for s in user_stats),
        "rating_max": max(s["rating_max"] for s in user_stats),
    }
    for side, per_block in (("users", user_stats), ("items", item_stats)):
        stats[side] = {
            "block_rows": np.bincount(assignment[side][0], minlength=n_blocks[side]).tolist(),
            "block_nnz": [s["nnz"] for s in per_block],
            # message_rows[j][b]: rows source block j ships to this side's block b.
            "message_rows": np.array([s["message_rows"] for s in per_block]).T.tolist(),
        }
    return stats
