"""Ingest: from a rating source to a blocked, routed ratings store.

:func:`ingest` composes three stages. Their passes over the data are sets of Dask tasks,
none holding more than one partition or one block in memory:

1. :func:`scan_source` (*check*): each partition is validated (ids, ratings), its ids
   counted, and what the later passes need of it kept in a scratch group beside the
   target (the source is read once); the driver builds the id maps.
2. :func:`plan_blocks`: the driver chooses the block counts and deals users and items to
   blocks (:mod:`blockals.partition`).
3. :func:`write_store`, through :class:`blockals.store.StoreWriter`, which owns the
   layout:

   * *stage*: each kept partition maps its ids to global indices and is written to a
     staging area sorted by user block; the scratch group is then removed;
   * *users*: each user block gathers its ratings from every staged partition, resolves
     duplicate (user, item) pairs, builds its in-block and out-blocks
     (:mod:`blockals.routing`), writes them, and stages its ratings again by item block;
   * *items*: each item block gathers its ratings and builds its in-block.

The store is written whole in a hidden sibling of the target path, the completion marker
last, and swapped in only then (:class:`blockals.store.StoreWriter`): a store already at
the path stays complete and readable whatever happens to the ingest replacing it, a bad
source or ``kill -9`` included. A failed ingest removes what it wrote; what a killed one
left is removed by the next ingest to that path. The path is resolved on the driver
(:func:`blockals.formats.resolve`), and one that is, contains or lies inside the source
is refused before anything is written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import pandas as pd

from blockals.cluster import reusing_memory
from blockals.errors import InputError
from blockals.formats import parse_path, parse_storage_options, refuse_overlap, resolve
from blockals.lock import Lease, holding
from blockals.params import parse_bool, parse_int
from blockals.partition import DEFAULT_BLOCK_BUDGET, assign_blocks, default_n_blocks, parse_n_blocks
from blockals.progress import Progress, compute
from blockals.routing import build_inblock, counting_order, inblock_order, pair_order
from blockals.sources import (
    PartitionCheck, Source, check_partition, convert_ids, normalize_ratings, normalize_timestamps, read_source,
    reading, source_paths,
)
from blockals.store import SIDES, RatingStore, Side, StoreWriter, other_side

__all__ = [
    "ingest", "scan_source", "plan_blocks", "write_store", "SourceScan", "BlockPlan", "BlockStats",
    "combine_duplicates", "Combined", "cluster_budget", "DUPLICATE_POLICIES",
]

DUPLICATE_POLICIES = ("error", "sum", "last", "mean")


# -- records -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SourceScan:
    """What the first pass learns of a source, every value checked.

    Attributes
    ----------
    description : str
        The source, as the store records it.
    offsets : ndarray of int64, shape (n_partitions + 1,)
        Source row of each partition's first row; the last entry is the number of rows.
    kinds : dict
        Per side, ``"int"`` or ``"str"``: the type ids are read as.
    ids : dict of Index
        Per side, the source's sorted unique ids in their final type.
    counts : dict of ndarray
        Per side, ratings per id (repeats included), aligned with ``ids``.
    timed : bool
        Whether the source has timestamps.
    """

    description: str
    offsets: np.ndarray
    kinds: dict[Side, str]
    ids: dict[Side, pd.Index]
    counts: dict[Side, np.ndarray]
    timed: bool


@dataclass(frozen=True, kw_only=True)
class BlockPlan:
    """How the store is cut into blocks.

    Attributes
    ----------
    ids : dict of Index
        Per side, the store's id maps (the ``like`` store's when one is given).
    n_blocks : dict of int
        Per side, the block count.
    assignment : dict of (ndarray, ndarray)
        Per side, ``(block, local)`` of every global row.
    params : dict
        The ingest's parameters as the store records them (``duplicates_resolved`` is
        added when the user blocks are written).
    """

    ids: dict[Side, pd.Index]
    n_blocks: dict[Side, int]
    assignment: dict[Side, tuple[np.ndarray, np.ndarray]]
    params: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Combined:
    """A block's ratings, repeated pairs resolved by :func:`combine_duplicates`, which returns them sorted by (dst, src).

    ``example`` is ``(dst, src, first_row, second_row)`` of the pair whose repeat comes
    first in the source (the earliest row that repeats an earlier one), or None.
    """

    dst: np.ndarray
    src: np.ndarray
    rating: np.ndarray
    time: np.ndarray | None
    n_duplicates: int
    example: tuple[int, int, int, int] | None


@dataclass(frozen=True, kw_only=True)
class BlockStats:
    """What writing one destination block learnt.

    A user block refused for its repeated pairs (policy ``"error"``) is not written and
    keeps the defaults but for ``duplicates`` and ``example``.
    """

    duplicates: int
    example: tuple[int, int, int, int] | None
    nnz: int = 0
    rating_sum: float = 0.0
    rating_min: float = np.inf
    rating_max: float = -np.inf
    message_rows: tuple[int, ...] = ()  # [j]: rows source block j ships to this block
    staged: np.ndarray | None = None  # user blocks: where each item block's ratings start in the restaged ones


def combine_duplicates(
    dst: np.ndarray, src: np.ndarray, rating: np.ndarray, row: np.ndarray, policy: str,
    time: np.ndarray | None = None,
) -> Combined:
    """Resolve repeated (dst, src) pairs, ``row`` being each rating's position in the source.

    ``dst`` and ``src`` are indices (non-negative integers). With ``policy="error"`` and
    repeats present, the ratings are returned unresolved. ``"sum"`` adds the values (as
    Spark does silently), ``"mean"`` averages them, ``"last"`` keeps the value of the
    latest source row. A combined pair keeps the timestamp of its latest source row.
    """
    n_dst, n_src = (int(v.max()) + 1 if v.size else 0 for v in (dst, src))
    if np.all(row[1:] >= row[:-1]):  # staged ratings come in source order
        order = pair_order(dst, n_dst, src, n_src)
    else:
        by_row = np.argsort(row, kind="stable")
        order = by_row[pair_order(dst[by_row], n_dst, src[by_row], n_src)]
    dst, src, rating, row = dst[order], src[order], rating[order], row[order]
    time = None if time is None else time[order]
    first = np.ones(dst.shape[0], dtype=bool)
    first[1:] = (dst[1:] != dst[:-1]) | (src[1:] != src[:-1])
    n_dup = int(dst.shape[0] - first.sum())
    if n_dup == 0:
        return Combined(dst=dst, src=src, rating=rating, time=time, n_duplicates=0, example=None)
    repeats = np.flatnonzero(~first)
    group_start = np.maximum.accumulate(np.where(first, np.arange(dst.shape[0]), 0))
    earliest = repeats[np.argmin(row[repeats])]
    g = group_start[earliest]
    example = (int(dst[g]), int(src[g]), int(row[g]), int(row[earliest]))
    if policy == "error":
        return Combined(dst=dst, src=src, rating=rating, time=time, n_duplicates=n_dup, example=example)
    starts = np.flatnonzero(first)
    last = np.append(starts[1:], dst.shape[0]) - 1
    if policy == "last":
        values = rating[last]
    else:
        values = np.add.reduceat(rating.astype(np.float64), starts)
        if policy == "mean":
            values /= np.diff(np.append(starts, dst.shape[0]))
    return Combined(dst=dst[starts], src=src[starts], rating=values.astype(np.float32),
                    time=None if time is None else time[last], n_duplicates=n_dup, example=example)


# -- tasks -----------------------------------------------------------------------


@reusing_memory()
def _scan_partition(part: pd.DataFrame, index: int, writer: StoreWriter) -> tuple[PartitionCheck, dict | None]:
    """Check one partition, count its ids and keep it for the staging pass.

    Ids are kept as codes into the partition's own unique ids (numbers as int64, anything
    else as text, to be typed once every partition is seen), so the staging pass maps a
    few thousand ids per partition, not a million.
    """
    check = check_partition(part)
    if check.problem is not None:
        return check, None
    kept = {"rating": normalize_ratings(part["rating"])[0].astype(np.float32)}
    if "timestamp" in part:
        kept["time"] = normalize_timestamps(part["timestamp"])[0]
    counts = {}
    for side in SIDES:
        codes, uniques = pd.factorize(part[side[:-1]])
        kept[f"{side}_code"] = codes.astype(np.int32)
        kept[f"{side}_id"] = convert_ids(uniques, "int") if uniques.dtype.kind in "iuf" else uniques.astype(str)
        counts[side] = pd.Series(np.bincount(codes, minlength=len(uniques)), index=uniques)
    writer.keep_partition(index, kept)
    return check, counts


@reusing_memory()
def _stage_partition(
    index: int, offset: int, writer: StoreWriter, ids: dict[Side, pd.Index], kinds: dict[Side, str],
    user_block: np.ndarray, n_user_blocks: int,
) -> np.ndarray:
    """Map one kept partition's ids and stage it sorted by user block; returns its block offsets."""
    kept = writer.read_partition(index)
    global_index = {
        side: ids[side].get_indexer(convert_ids(kept[f"{side}_id"].astype(object), kinds[side]))[kept[f"{side}_code"]]
        for side in SIDES
    }
    columns = {"dst": global_index["users"], "src": global_index["items"], "rating": kept["rating"],
               "row": offset + np.arange(kept["rating"].shape[0], dtype=np.int64)}
    if "time" in kept:
        columns["time"] = kept["time"]
    block = user_block[columns["dst"]]
    order = counting_order(block, n_user_blocks)
    writer.stage("users", index, {name: values[order] for name, values in columns.items()})
    return np.searchsorted(block[order], np.arange(n_user_blocks + 1))


def _block_ratings(
    writer: StoreWriter, side: Side, block: int, stage_ptrs: Sequence[np.ndarray], dst_local: np.ndarray,
    duplicates: str | None, timed: bool,
) -> Combined:
    """The staged ratings of one destination block, by local row; a user block's with
    repeats resolved and sorted by (row, source index)."""
    if side == "items":  # staged by the user pass, repeats already resolved; build_inblock sorts them
        data = writer.read_staged(side, stage_ptrs, block, ("dst", "src", "rating"))
        return Combined(dst=dst_local[data["dst"]], src=data["src"], rating=data["rating"], time=None,
                        n_duplicates=0, example=None)
    names = ("dst", "src", "rating", "row") + (("time",) if timed else ())
    data = writer.read_staged(side, stage_ptrs, block, names)
    return combine_duplicates(dst_local[data["dst"]], data["src"], data["rating"], data["row"], duplicates,
                              data.get("time"))


@reusing_memory()
def _build_block(
    writer: StoreWriter, side: Side, block: int, stage_ptrs: Sequence[np.ndarray],
    assignment: dict[Side, tuple[np.ndarray, np.ndarray]], duplicates: str | None, timed: bool,
) -> BlockStats:
    """Build, write and (for users) restage one destination block."""
    dst_block, dst_local = assignment[side]
    src_block, src_local = assignment[other_side(side)]
    rows = np.flatnonzero(dst_block == block)  # global index of each local row
    ratings = _block_ratings(writer, side, block, stage_ptrs, dst_local, duplicates, timed)
    example = None if ratings.example is None else (int(rows[ratings.example[0]]), *ratings.example[1:])
    if ratings.n_duplicates and duplicates == "error":
        return BlockStats(duplicates=ratings.n_duplicates, example=example)
    n_src_blocks = int(src_block.max()) + 1
    # Put the ratings in in-block order here, so the timestamps stay lined up with them;
    # build_inblock then finds them sorted.
    order = inblock_order(ratings.dst, rows.shape[0], src_block[ratings.src], src_local[ratings.src], n_src_blocks)
    dst, src, rating = ratings.dst[order], ratings.src[order], ratings.rating[order]
    inblock = build_inblock(dst, src_block[src], src_local[src], rating, rows.shape[0], n_src_blocks)
    writer.write_block(side, block, rows, inblock, None if ratings.time is None else ratings.time[order])
    staged = None
    if side == "users":  # stage again, by item block, for the item pass
        by_item = counting_order(src_block[src], n_src_blocks)
        writer.stage("items", block, {"dst": src[by_item], "src": rows[dst[by_item]], "rating": rating[by_item]})
        staged = np.searchsorted(src_block[src][by_item], np.arange(n_src_blocks + 1))
    return BlockStats(
        duplicates=ratings.n_duplicates,
        example=example,
        nnz=int(inblock.nnz),
        rating_sum=float(rating.astype(np.float64).sum()),
        rating_min=float(rating.min()) if rating.size else np.inf,
        rating_max=float(rating.max()) if rating.size else -np.inf,
        message_rows=tuple(np.diff(inblock.need_ptr).tolist()),
        staged=staged,
    )


# -- stages ----------------------------------------------------------------------


def cluster_budget() -> int:
    """A third of the memory limit per thread of the current client's smallest worker.

    With no client, or workers without a memory limit, the module default
    (:data:`blockals.partition.DEFAULT_BLOCK_BUDGET`, 256 MiB).
    """
    from distributed import default_client

    try:
        client = default_client()
    except ValueError:  # no client
        return DEFAULT_BLOCK_BUDGET
    try:  # a worker still registering (or restarting) would leave the module default in force
        client.wait_for_workers(1, timeout=60)
    except TimeoutError:
        return DEFAULT_BLOCK_BUDGET
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    per_thread = [w["memory_limit"] // max(1, w["nthreads"]) for w in workers if w.get("memory_limit")]
    return min(per_thread) // 3 if per_thread else DEFAULT_BLOCK_BUDGET


def _combine_counts(parts: Sequence[pd.Series], kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ids (in their final type) and their rating counts."""
    counts = pd.concat(parts)
    ids = convert_ids(counts.index, kind)
    combined = pd.Series(counts.to_numpy(), index=ids).groupby(level=0, sort=True).sum()
    return combined.index.to_numpy(), combined.to_numpy(dtype=np.int64)


def scan_source(src: Source, writer: StoreWriter, kinds: dict[Side, str] | None = None,
                progress: Progress = Progress()) -> SourceScan:
    """Stage 1: check every partition of an opened source, count its ids and keep it in
    ``writer``'s scratch group (one Dask task each, reported to ``progress``; the caller
    removes the scratch).

    ``kinds`` fixes the type ids are read as (a ``like`` store's); by default a side's ids
    are strings when any partition's are. Raises :class:`InputError` naming the first bad
    row, counted across partitions, or when the source has no ratings.
    """
    writer.start_scratch()
    with reading(src.description):  # a malformed row deep in a file fails inside its partition
        parts = src.frame.to_delayed()
        with progress.step("scan", len(parts), "partitions") as report:
            scanned = compute([dask.delayed(_scan_partition)(part, p, writer) for p, part in enumerate(parts)], report)
    checks = [check for check, _ in scanned]
    offsets = np.concatenate([[0], np.cumsum([c.n_rows for c in checks])])
    for check, offset in zip(checks, offsets):
        if check.problem is not None:
            row, sentence = check.problem
            raise InputError(sentence.format(row=int(offset + row)))
    if offsets[-1] == 0:
        raise InputError(f"the source {src.description} has no ratings.")
    if kinds is None:
        kinds = {side: "str" if any(getattr(c, f"{side[:-1]}_kind") == "str" for c in checks) else "int"
                 for side in SIDES}
    counted = {side: _combine_counts([counts[side] for _, counts in scanned], kinds[side]) for side in SIDES}
    return SourceScan(
        description=src.description, offsets=offsets, kinds=kinds,
        ids={side: pd.Index(counted[side][0]) for side in SIDES},
        counts={side: counted[side][1] for side in SIDES}, timed="timestamp" in src.frame.columns,
    )


def plan_blocks(
    scan: SourceScan, n_user_blocks: int | None, n_item_blocks: int | None, *, block_budget: int | None,
    like: RatingStore | None, columns: dict[str, str], duplicates: str,
) -> BlockPlan:
    """Stage 2: block counts (given, ``like``'s, or the fewest that fit the budget) and the
    assignment of rows to blocks; ``columns`` and ``duplicates`` are recorded with them.

    Raises :class:`InputError` for a count larger than its side's rows, or, with ``like``,
    for an id that store does not hold.
    """
    if like is not None:
        _raise_unless_known(scan.ids, like)
    ids = scan.ids if like is None else {side: like.ids(side) for side in SIDES}
    given = {"users": n_user_blocks, "items": n_item_blocks} if like is None else {
        side: like.n_blocks(side) for side in SIDES}
    budget = cluster_budget() if block_budget is None else block_budget
    nnz_upper = int(scan.offsets[-1])  # repeats not yet combined
    n_blocks = {
        side: default_n_blocks(len(ids[side]), nnz_upper, budget, len(ids[other_side(side)])) if given[side] is None
        else parse_n_blocks(given[side], f"n_{side[:-1]}_blocks", len(ids[side]))
        for side in SIDES
    }
    assignment = {
        side: assign_blocks(scan.counts[side], n_blocks[side]) if like is None else like.assignment(side)
        for side in SIDES
    }
    params = {
        "source": scan.description, **columns, "n_user_blocks": n_blocks["users"],
        "n_item_blocks": n_blocks["items"], "block_budget": int(budget), "duplicates": duplicates,
        "id_kinds": scan.kinds, "timestamps": scan.timed,
    }
    return BlockPlan(ids=ids, n_blocks=n_blocks, assignment=assignment, params=params)


def write_store(writer: StoreWriter, scan: SourceScan, plan: BlockPlan, overwrite: bool,
                progress: Progress = Progress()) -> None:
    """Stage 3: write the planned store through ``writer``, in three passes of Dask tasks
    (reported to ``progress``).

    The store is written in ``writer``'s staged sibling of the path, the completion marker
    last, and swapped in at the path only then (anything but a store of ours there is
    refused, as before the scan); whatever fails removes what was staged, leaving the path
    as it was.
    """
    try:
        writer.create(plan.params, {side: plan.ids[side].to_numpy() for side in SIDES}, plan.assignment,
                      plan.n_blocks)
        part_ptrs = _stage_partitions(writer, scan, plan, progress)
        writer.remove_scratch()
        duplicates = plan.params["duplicates"]
        user_stats = _build_blocks(writer, "users", part_ptrs, plan, duplicates, scan.timed, progress)
        _raise_on_duplicates(user_stats, plan.ids, duplicates)
        item_stats = _build_blocks(writer, "items", [s.staged for s in user_stats], plan, None, False, progress)
        params = {**plan.params, "duplicates_resolved": sum(s.duplicates for s in user_stats)}
        writer.commit(params, _store_stats(plan, user_stats, item_stats), overwrite)
    finally:
        writer.remove()


def _stage_partitions(writer: StoreWriter, scan: SourceScan, plan: BlockPlan,
                      progress: Progress) -> tuple[np.ndarray, ...]:
    """Stage every kept partition (a task each); returns each one's user-block offsets."""
    ids = dask.delayed(plan.ids, pure=True)
    user_block = dask.delayed(plan.assignment["users"][0], pure=True)
    n_parts = len(scan.offsets) - 1
    with progress.step("stage", n_parts, "partitions") as report:
        return compute([
            dask.delayed(_stage_partition)(
                p, int(scan.offsets[p]), writer, ids, scan.kinds, user_block, plan.n_blocks["users"]
            )
            for p in range(n_parts)
        ], report)


def _build_blocks(
    writer: StoreWriter, side: Side, stage_ptrs: Sequence[np.ndarray], plan: BlockPlan, duplicates: str | None,
    timed: bool, progress: Progress,
) -> tuple[BlockStats, ...]:
    """Build and write every block of ``side`` (a task each)."""
    assignment = dask.delayed(plan.assignment, pure=True)
    with progress.step(side, plan.n_blocks[side], "blocks") as report:
        return compute([
            dask.delayed(_build_block)(writer, side, b, stage_ptrs, assignment, duplicates, timed)
            for b in range(plan.n_blocks[side])
        ], report)


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
    verbose: int | Progress = 0,
) -> RatingStore:
    """Partition ratings into user and item blocks and write a ratings store.

    Parameters
    ----------
    source : DataFrame, Dask DataFrame, path, glob, (users, items, ratings) or sparse matrix
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
    verbose : int
        0: nothing; 1: a line per pass (scan, stage, users, items) with its duration on
        standard output; 2: also progress over each pass's partitions or blocks on standard
        error, a bar on a terminal, a line per quarter otherwise
        (:mod:`blockals.progress`). A :class:`~blockals.progress.Progress` names the lines
        as a caller wants them (``split`` names its two ingests).

    Returns
    -------
    RatingStore
        The complete store, opened.
    """
    path = resolve(parse_path(path, "store path"))
    storage_options = parse_storage_options(storage_options)
    overwrite = parse_bool(overwrite, "overwrite")
    if block_budget is not None:
        parse_int(block_budget, "block_budget", 1)
    duplicates = _parse_duplicates(duplicates)
    progress = Progress.of(verbose, "ingest")
    for name, value in (("n_user_blocks", n_user_blocks), ("n_item_blocks", n_item_blocks)):
        if value is not None:
            parse_n_blocks(value, name, np.iinfo(np.int64).max)
    refuse_overlap({"the store path": path}, {"the source": source_paths(source)})
    src = read_source(source, user_col, item_col, rating_col, timestamp_col)
    # On the target path, not inside write_store: held over the check of what is there, the
    # scan and the write, so a second ingest of the path is refused before it reads anything,
    # and the leftovers of a killed ingest are cleared by the one run that may.
    with holding(None if like is None else like.reading(),
                 Lease(path, "ratings store", storage_options, breakable=False)):
        writer = StoreWriter(path, storage_options)
        writer.clear_leftovers()
        writer.check_target(overwrite)  # before the pass over the source
        try:
            scan = scan_source(src, writer, None if like is None else like.params["id_kinds"], progress)
            plan = plan_blocks(
                scan, n_user_blocks, n_item_blocks, block_budget=block_budget, like=like, duplicates=duplicates,
                columns={"user_col": user_col, "item_col": item_col, "rating_col": rating_col},
            )
            write_store(writer, scan, plan, overwrite, progress)
        finally:
            writer.remove_scratch()
        return RatingStore(path, storage_options)


def _raise_unless_known(ids: dict[Side, pd.Index], like: RatingStore) -> None:
    for side in SIDES:
        unknown = ids[side][like.ids(side).get_indexer(ids[side]) < 0]
        if len(unknown):
            value = unknown[0].item() if isinstance(unknown[0], np.generic) else unknown[0]
            raise InputError(
                f"{side[:-1]} id {value!r} is not in {like.path}, whose ids and blocks this store must share."
            )


def _raise_on_duplicates(stats: Sequence[BlockStats], ids: dict[Side, pd.Index], policy: str) -> None:
    n_dup = sum(s.duplicates for s in stats)
    if not n_dup or policy != "error":
        return
    user, item, first, second = min((s.example for s in stats if s.example), key=lambda e: e[3])
    # Python scalars, so the message shows 42 or 'abc' rather than np.int64(42).
    user_id, item_id = (ids["users"][user], ids["items"][item])
    user_id, item_id = (v.item() if isinstance(v, np.generic) else v for v in (user_id, item_id))
    raise InputError(
        f"the source has {n_dup} duplicate (user, item) pair{'s' if n_dup > 1 else ''}, the first "
        f"being user {user_id!r} and item {item_id!r} in rows {first} and "
        f"{second}; pass duplicates='sum', 'last' or 'mean' to combine them."
    )


def _store_stats(plan: BlockPlan, user_stats: Sequence[BlockStats], item_stats: Sequence[BlockStats]) -> dict[str, Any]:
    """The store's ``stats`` attribute (storage/FORMAT.md), from what the block tasks learnt."""
    nnz = sum(s.nnz for s in user_stats)
    per_side = {
        side: {
            "block_rows": np.bincount(plan.assignment[side][0], minlength=plan.n_blocks[side]).tolist(),
            "block_nnz": [s.nnz for s in per_block],
            # message_rows[j][b]: rows source block j ships to this side's block b.
            "message_rows": np.array([s.message_rows for s in per_block]).T.tolist(),
        }
        for side, per_block in (("users", user_stats), ("items", item_stats))
    }
    return {
        "n_users": len(plan.ids["users"]),
        "n_items": len(plan.ids["items"]),
        "nnz": nnz,
        "rating_mean": sum(s.rating_sum for s in user_stats) / max(nnz, 1),
        "rating_min": min(s.rating_min for s in user_stats),
        "rating_max": max(s.rating_max for s in user_stats),
        **per_side,
    }
