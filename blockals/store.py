"""The Zarr v3 layout of ratings stores, and reading it back.

The full specification, with a worked example, is ``storage/FORMAT.md``. In short::

    <store>/                      attributes: blockals = {format, format_version, store_id,
                                   params, stats, complete}
      users/ids                   original id of each global row (int64 or string)
      users/block, users/local    block and local index of each global row
      users/blocks/<b>/rows       global index of each local row of block b
      users/blocks/<b>/indptr     CSR of block b's ratings by local row
      users/blocks/<b>/src_block  per rating: item block of the rated item
      users/blocks/<b>/src_index  per rating: position in the message from that block
      users/blocks/<b>/rating     per rating: value (float32)
      users/blocks/<b>/need_ptr   out-blocks toward b (see blockals.routing)
      users/blocks/<b>/need_rows
      users/blocks/<b>/time       per rating: timestamp (user blocks, when ingested with them)
      items/...                   the same, by item
      _staging/                   only while an ingest writes the store

An ingest writes the store in a hidden sibling of its path (``.<name>.ingest-<token>``)
and renames it into place once complete, so a store at the path stays complete and
readable until the new one replaces it whole.

Every chunk carries a CRC32C checksum, so a corrupted chunk fails to read with a message
naming the array. ``complete`` is set last, after every array is written; readers refuse
a store without it, and check the length of every array they read against the sizes the
store records (``stats``), so a store whose arrays were cut or swapped is refused naming
the array.

:class:`StoreWriter` is the writing half of the format, used by :func:`blockals.ingest`
(which keeps the Dask orchestration: this module imports neither Dask nor anything above
it); :class:`RatingStore` and the ``load_*`` functions are the reading half.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from blockals.errors import InputError, StoreError
from blockals.formats import (
    check_meta, clear_leftovers, open_group, parse_path, parse_storage_options, read_array, remove_path, replace_path,
    resolve, sibling, sibling_token, writable_meta, write_array,
)
from blockals.lock import Lease
from blockals.routing import InBlock, OutBlocks

__all__ = [
    "FORMAT_VERSION",
    "RatingStore",
    "StoreRef",
    "StoreWriter",
    "Side",
    "open_store",
    "other_side",
    "new_store_id",
]

Side = Literal["users", "items"]
SIDES: tuple[Side, Side] = ("users", "items")
FORMAT = "blockals-ratings"
FORMAT_VERSION = 1
INBLOCK_ARRAYS = ("indptr", "src_block", "src_index", "rating", "need_ptr", "need_rows")
STAGING = "_staging"
# Where each ingest pass finds its ratings: the user pass in the staged source partitions
# (sorted by user block), the item pass in the staged user blocks (sorted by item block).
STAGED = {"users": f"{STAGING}/parts", "items": f"{STAGING}/users"}
# Each destination block reads a slice of every staged group, and a read decodes whole
# chunks: small chunks keep each staged rating decoded about once, not once per block.
STAGED_CHUNK = 1 << 18
# Areas inside a store for what is derived from it, written there by design: training
# checkpoints and a search's work (its split stores and checkpoints).
DERIVED = ("checkpoints", "search")


def other_side(side: Side) -> Side:
    return "items" if side == "users" else "users"


def new_store_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class StoreRef:
    """What a Dask task needs to find a store: small, hashable and picklable."""

    path: str
    store_id: str
    storage_options: tuple[tuple[str, Any], ...] = ()

    @property
    def options(self) -> dict | None:
        return dict(self.storage_options) or None


# In-block bytes a process caches unless its caller knows its memory limit.
DEFAULT_CACHE_BYTES = 1 << 30


class _BlockCache:
    """Per-process cache of decoded in-blocks, so iterations after the first skip the read.

    Keyed by the store's unique id: a store rewritten at the same path never hits stale
    entries. Training reads a store's blocks in the same cyclic order every half-step, and
    an LRU smaller than that cycle evicts each block just before it is needed again: it
    never hits. So once full, the cache keeps the blocks of a store it holds and turns new
    ones away (a hit rate of cache size / store size); entries of other stores are the
    first to go, least recently used first.

    A hit is served without reading the store, so without the store-id check
    :func:`_read_block` makes on every read, and needs none: the block was checked when
    read, from the store whose id keys it. That the path still holds that store is the
    driver's to check: a training holds a shared lease on it (:meth:`RatingStore.reading`),
    so a blockals writer of the path is refused, and checks the id at the path once per
    iteration and before it assembles the model (:meth:`RatingStore.check_unchanged`), so a
    store replaced by other means stops it with nothing saved.
    """

    def __init__(self) -> None:
        self._items: OrderedDict[tuple, InBlock] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> InBlock | None:
        with self._lock:
            block = self._items.get(key)
            if block is not None:
                self._items.move_to_end(key)
            return block

    def put(self, key: tuple, block: InBlock, max_bytes: int) -> None:
        size = block.nbytes
        with self._lock:
            if key in self._items:
                return
            others = [k for k in self._items if k[0] != key[0]]
            while self._bytes + size > max_bytes and others:
                self._bytes -= self._items.pop(others.pop(0)).nbytes
            while self._bytes > max_bytes:  # the limit shrank below what the store's blocks hold
                self._bytes -= self._items.popitem(last=False)[1].nbytes
            if self._bytes + size <= max_bytes:
                self._items[key] = block
                self._bytes += size

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)


BLOCK_CACHE = _BlockCache()


def _expected_lengths(stats: dict, side: Side, block: int) -> dict[str, int]:
    """The length each array of ``(side, block)`` must have, by the sizes the store records."""
    rows, nnz = int(stats[side]["block_rows"][block]), int(stats[side]["block_nnz"][block])
    routed = stats[side]["message_rows"]  # [source block][destination block]
    return {"rows": rows, "indptr": rows + 1, "src_block": nnz, "src_index": nnz, "rating": nnz, "time": nnz,
            "need_ptr": len(routed) + 1, "need_rows": sum(int(r[block]) for r in routed)}


def _check_length(array: np.ndarray, expected: int, where: str) -> np.ndarray:
    """``array`` (read from ``where``), refused unless it has the length the store records."""
    if array.ndim != 1 or array.shape[0] != expected:
        raise StoreError(f"{where} has shape {array.shape}, but the store records {expected} entries; it is damaged.")
    return array


def _read_block(ref: StoreRef, side: Side, block: int, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Arrays of ``(side, block)``, each checked against the recorded sizes (read with the
    root's metadata, which opening the store reads anyway)."""
    root = open_group(ref.path, storage_options=ref.options)
    # A store being written again at its path has no stats: refused as incomplete.
    meta = check_meta(root.attrs.get("blockals"), ref.path, FORMAT, FORMAT_VERSION, "ratings store")
    if meta["store_id"] != ref.store_id:
        raise StoreError(f"{ref.path} was written again after it was opened; open the new store and start over.")
    expected = _expected_lengths(meta["stats"], side, block)
    prefix = f"{side}/blocks/{block}"
    return {
        name: _check_length(read_array(root, f"{prefix}/{name}", ref.path), expected[name], f"{ref.path}/{prefix}/{name}")
        for name in names
    }


def load_inblock(ref: StoreRef, side: Side, block: int, cache_limit: int = DEFAULT_CACHE_BYTES) -> InBlock:
    """Read the in-block of ``(side, block)``, from this process's cache when it is there.

    The cache keeps at most ``cache_limit`` bytes (:func:`blockals.cluster.cache_bytes`
    sizes it from a worker's memory limit).
    """
    key = (ref.store_id, side, block)
    cached = BLOCK_CACHE.get(key)
    if cached is not None:
        return cached
    inblock = InBlock(**_read_block(ref, side, block, INBLOCK_ARRAYS))
    if inblock.indptr[-1] != inblock.nnz:
        raise StoreError(
            f"{ref.path}/{side}/blocks/{block}/indptr ends at {inblock.indptr[-1]}, but the block holds "
            f"{inblock.nnz} ratings; it is damaged."
        )
    BLOCK_CACHE.put(key, inblock, cache_limit)
    return inblock


def load_out_blocks(ref: StoreRef, side: Side, block: int) -> InBlock | OutBlocks:
    """What each source block ships to ``(side, block)``: the cached in-block when this
    process has it, else just its two routing arrays."""
    cached = BLOCK_CACHE.get((ref.store_id, side, block))
    if cached is not None:
        return cached
    return OutBlocks(**_read_block(ref, side, block, ("need_ptr", "need_rows")))


def load_rows(ref: StoreRef, side: Side, block: int) -> np.ndarray:
    """Global index of each local row of ``(side, block)``."""
    return _read_block(ref, side, block, ("rows",))["rows"]


def block_triples(
    ref: StoreRef, side: Side, block: int, n_src_blocks: int, cache_limit: int = DEFAULT_CACHE_BYTES
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global (row, other side's row, rating) of every rating in one block."""
    inblock = load_inblock(ref, side, block, cache_limit)
    return load_rows(ref, side, block)[inblock.row], rated_rows(ref, side, inblock, n_src_blocks), inblock.rating


def sender_rows(ref: StoreRef, side: Side, inblock: InBlock, n_src_blocks: int) -> np.ndarray:
    """The other side's global row of each row an in-block's messages carry, in message
    order: ``inblock.col`` indexes it."""
    sent = [load_rows(ref, other_side(side), j)[inblock.out_block(j)] for j in range(n_src_blocks)]
    return np.concatenate(sent) if sent else np.zeros(0, dtype=np.int64)


def rated_rows(ref: StoreRef, side: Side, inblock: InBlock, n_src_blocks: int) -> np.ndarray:
    """The other side's global row of each of an in-block's ratings, in in-block order."""
    return sender_rows(ref, side, inblock, n_src_blocks)[inblock.col]


def load_times(ref: StoreRef, block: int) -> np.ndarray:
    """Timestamps of a user block's ratings, in in-block order (stores ingested with them)."""
    return _read_block(ref, "users", block, ("time",))["time"]


class RatingStore:
    """A complete ratings store, opened for reading.

    Use :func:`open_store` (or :func:`blockals.ingest`) rather than the constructor.

    Attributes
    ----------
    path : str
    n_users, n_items, nnz : int
    n_user_blocks, n_item_blocks : int
    params : dict
        The arguments of the ingest that wrote the store.
    stats : dict
        Sizes, rating range and mean, and per-block row and rating counts.
    """

    def __init__(self, path: str, storage_options: dict | None = None) -> None:
        self.path = resolve(parse_path(path, "store path"))
        self.storage_options = storage_options = parse_storage_options(storage_options)
        self._group = open_group(self.path, storage_options=storage_options)
        self._meta = meta = check_meta(self._group.attrs.get("blockals"), self.path, FORMAT, FORMAT_VERSION, "ratings store")
        self.params: dict = meta["params"]
        self.stats: dict = meta["stats"]
        self._ids: dict[str, pd.Index] = {}
        self._assignment: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # -- sizes ---------------------------------------------------------------
    def holds_derived(self, path: str) -> bool:
        """Whether ``path`` lies in one of the store's areas for what is derived from it
        (:data:`DERIVED`), the one place inside a store that runs reading it may write."""
        return any(resolve(path).startswith(f"{self.path}/{area}/") for area in DERIVED)

    @property
    def ref(self) -> StoreRef:
        opts = tuple(sorted((self.storage_options or {}).items()))
        return StoreRef(self.path, self._meta["store_id"], opts)

    @property
    def store_id(self) -> str:
        return self._meta["store_id"]

    def reading(self) -> Lease:
        """A shared lease on the store (:mod:`blockals.lock`), to hold while it is read: an
        ingest or split writing this path meanwhile is refused."""
        return Lease(self.path, "ratings store", self.storage_options, shared=True, breakable=False)

    def check_unchanged(self, doing: str) -> None:
        """Refuse a store whose path now holds another store (or none) than the one opened:
        one read of the root's attributes; ``doing`` says what stops (``"the training"``)."""
        try:
            meta = open_group(self.path, storage_options=self.storage_options).attrs.get("blockals")
        except StoreError:
            meta = None
        if not isinstance(meta, dict) or meta.get("store_id") != self.store_id:
            raise StoreError(f"ratings store {self.path} was replaced or removed while {doing} read it; {doing} "
                             f"stopped and saved nothing, so run it again on the store now there.")

    @property
    def n_users(self) -> int:
        return int(self.stats["n_users"])

    @property
    def n_items(self) -> int:
        return int(self.stats["n_items"])

    @property
    def nnz(self) -> int:
        return int(self.stats["nnz"])

    @property
    def n_user_blocks(self) -> int:
        return len(self.stats["users"]["block_rows"])

    @property
    def n_item_blocks(self) -> int:
        return len(self.stats["items"]["block_rows"])

    def n_rows(self, side: Side) -> int:
        return self.n_users if side == "users" else self.n_items

    def n_blocks(self, side: Side) -> int:
        return len(self.stats[side]["block_rows"])

    def block_rows(self, side: Side) -> np.ndarray:
        return np.asarray(self.stats[side]["block_rows"], dtype=np.int64)

    def block_nnz(self, side: Side) -> np.ndarray:
        return np.asarray(self.stats[side]["block_nnz"], dtype=np.int64)

    def message_rows(self, side: Side) -> np.ndarray:
        """``[j, b]``: factor rows source block ``j`` ships to destination block ``b`` of ``side``."""
        return np.asarray(self.stats[side]["message_rows"], dtype=np.int64)

    # -- ids and rows --------------------------------------------------------
    def ids(self, side: Side) -> pd.Index:
        """Original ids in global-index order."""
        if side not in self._ids:
            self._ids[side] = pd.Index(self._per_row(side, "ids"))
        return self._ids[side]

    def _per_row(self, side: Side, name: str) -> np.ndarray:
        """The array ``side/name``, which holds one entry per row of ``side``."""
        array = read_array(self._group, f"{side}/{name}", self.path)
        return _check_length(array, self.n_rows(side), f"{self.path}/{side}/{name}")

    @property
    def user_ids(self) -> pd.Index:
        return self.ids("users")

    @property
    def item_ids(self) -> pd.Index:
        return self.ids("items")

    def assignment(self, side: Side) -> tuple[np.ndarray, np.ndarray]:
        """``(block, local)`` of every global row."""
        if side not in self._assignment:
            self._assignment[side] = (self._per_row(side, "block"), self._per_row(side, "local"))
        return self._assignment[side]

    def rows(self, side: Side, block: int) -> np.ndarray:
        return load_rows(self.ref, side, block)

    def inblock(self, side: Side, block: int) -> InBlock:
        return load_inblock(self.ref, side, block)

    @property
    def has_timestamps(self) -> bool:
        return bool(self.params.get("timestamps"))

    def triples(self, side: Side, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(row, other, rating)`` of a block's ratings, rows and others as global indices."""
        return block_triples(self.ref, side, block, self.n_blocks(other_side(side)))

    # -- display ---------------------------------------------------------------
    def balance(self, side: Side) -> str:
        rows, nnz = self.block_rows(side), self.block_nnz(side)

        def spread(a: np.ndarray) -> str:
            return f"min {a.min():,} / mean {a.mean():,.0f} / max {a.max():,} (max/mean {a.max() / max(a.mean(), 1):.2f})"

        return f"rows {spread(rows)}; ratings {spread(nnz)}"

    def summary(self) -> str:
        s = self.stats
        lines = [
            f"blockals ratings store {self.path}",
            f"  format version {FORMAT_VERSION}, complete",
            f"  {self.n_users:,} users x {self.n_items:,} items, {self.nnz:,} ratings "
            f"(density {self.nnz / max(1, self.n_users * self.n_items):.3%})",
            f"  ratings in [{s['rating_min']:g}, {s['rating_max']:g}], mean {s['rating_mean']:.4f}",
        ]
        for side in SIDES:
            lines.append(f"  {self.n_blocks(side)} {side[:-1]} blocks: {self.balance(side)}")
        routed = sum(int(self.message_rows(side).sum()) for side in SIDES)
        whole = self.n_items * self.n_user_blocks + self.n_users * self.n_item_blocks
        lines.append(
            f"  factor rows routed per iteration: {routed:,} "
            f"(broadcasting whole blocks would ship {whole:,})"
        )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"RatingStore({self.path!r}, n_users={self.n_users}, n_items={self.n_items}, "
            f"nnz={self.nnz}, blocks={self.n_user_blocks}x{self.n_item_blocks})"
        )


def open_store(path: str, storage_options: dict | None = None) -> RatingStore:
    """Open a complete ratings store written by :func:`blockals.ingest`.

    Raises
    ------
    StoreError
        If the path holds no store, an incomplete one, or one of an unknown format version.
    """
    return RatingStore(path, storage_options)


@dataclass(frozen=True)
class StoreWriter:
    """The writing half of the format: a ratings store for ``path``, written in its order.

    The store is written whole in a hidden sibling of ``path``, :attr:`staged`
    (``.<name>.ingest-<token>``), and swapped in by :meth:`commit` only once complete: a
    store already at ``path`` stays complete and readable whatever happens to the ingest
    replacing it, ``kill -9`` included (see :func:`blockals.formats.replace_path`).

    :meth:`check_target` refuses a path that is not ours to replace (removing nothing),
    :meth:`clear_leftovers` removes what killed ingests left beside it, :meth:`create`
    starts the staged store marked incomplete; the ingest's tasks :meth:`stage` ratings,
    read them back (:meth:`read_staged`) and :meth:`write_block` each block;
    :meth:`commit` drops the staging area, writes the completion marker last and swaps the
    store in. A failed ingest calls :meth:`remove`. Small and picklable, so Dask tasks
    write through it; ``path`` is resolved (:func:`blockals.formats.resolve`).

    The first pass over the source runs before the target is checked again, so what it
    keeps of each partition goes to a scratch group beside the target, :attr:`scratch`
    (:meth:`start_scratch`, :meth:`keep_partition`, :meth:`read_partition`,
    :meth:`remove_scratch`): the source is read once.
    """

    path: str
    storage_options: dict | None = None
    token: str = field(default_factory=sibling_token)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", resolve(self.path))

    @property
    def scratch(self) -> str:
        """A hidden sibling of the target, named after it and this writer."""
        return sibling(self.path, f"scan-{self.token}")

    @property
    def staged(self) -> str:
        """Where the store is written until :meth:`commit` swaps it in at :attr:`path`."""
        return sibling(self.path, f"ingest-{self.token}")

    def start_scratch(self) -> None:
        open_group(self.scratch, "w", self.storage_options, attributes={"blockals": {"format": "blockals-scratch"}})

    def keep_partition(self, index: int, columns: Mapping[str, np.ndarray]) -> None:
        """Keep what the later passes need of source partition ``index``."""
        group = open_group(self.scratch, "r+", self.storage_options).require_group(str(index))
        for name, values in columns.items():
            write_array(group, name, values, STAGED_CHUNK)

    def read_partition(self, index: int) -> dict[str, np.ndarray]:
        group = open_group(self.scratch, "r", self.storage_options)[str(index)]
        return {name: read_array(group, name, f"{self.scratch}/{index}") for name, _ in group.arrays()}

    def remove_scratch(self) -> None:
        remove_path(self.scratch, self.storage_options)

    def check_target(self, overwrite: bool) -> dict | None:
        """Refuse anything at ``path`` but a ratings store we may replace; removes nothing.

        Returns the attributes of the store there (complete or not), or None.
        """
        meta = writable_meta(self.path, FORMAT, "store", self.storage_options)
        if meta is not None and meta.get("complete") and not overwrite:
            raise InputError(f"{self.path} already holds a complete ratings store; pass overwrite=True to replace it.")
        return meta

    def clear_leftovers(self) -> None:
        """Remove the staged and scratch groups of ingests killed while writing ``path``
        (putting back a store a swap cut short had moved aside)."""
        clear_leftovers(self.path, self.storage_options)

    def create(
        self, params: dict[str, Any], ids: Mapping[Side, np.ndarray],
        assignment: Mapping[Side, tuple[np.ndarray, np.ndarray]], n_blocks: Mapping[Side, int],
    ) -> None:
        """Start the staged store, marked incomplete, with its id maps, its block assignment
        and empty block groups."""
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "store_id": new_store_id(), "params": params,
                "complete": False}
        # Created with its attributes in one write: never a group that does not say it is ours.
        root = open_group(self.staged, "w", self.storage_options, attributes={"blockals": meta})
        for side in SIDES:
            group = root.require_group(side)
            write_array(group, "ids", ids[side])
            write_array(group, "block", assignment[side][0])
            write_array(group, "local", assignment[side][1])
            blocks = group.require_group("blocks")
            # Made here, not by the block writers: concurrent group creation races.
            for b in range(n_blocks[side]):
                blocks.require_group(str(b))
        for staged in STAGED.values():
            root.require_group(staged)

    def stage(self, side: Side, index: int, columns: Mapping[str, np.ndarray]) -> None:
        """Stage one group of ratings (a source partition, or a user block) for the ``side`` pass."""
        group = open_group(self.staged, "r+", self.storage_options).require_group(f"{STAGED[side]}/{index}")
        for name, values in columns.items():
            write_array(group, name, values, STAGED_CHUNK)

    def read_staged(
        self, side: Side, ptrs: Sequence[np.ndarray], block: int, names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """The ratings staged for ``(side, block)``: slice ``ptrs[p][block]:ptrs[p][block + 1]``
        of each staged group ``p``, concatenated."""
        root = open_group(self.staged, "r", self.storage_options)
        pieces: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for index, ptr in enumerate(ptrs):
            lo, hi = int(ptr[block]), int(ptr[block + 1])
            if lo == hi:  # most of the reads with many blocks; skip them
                continue
            group = root[f"{STAGED[side]}/{index}"]
            for name in names:
                pieces[name].append(group[name][lo:hi])
        return {
            name: np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32 if name == "rating" else np.int64)
            for name, parts in pieces.items()
        }

    def write_block(self, side: Side, block: int, rows: np.ndarray, inblock: InBlock, time: np.ndarray | None) -> None:
        """Write the rows and in-block of ``(side, block)``, and its ratings' timestamps if any."""
        group = open_group(f"{self.staged}/{side}/blocks/{block}", "r+", self.storage_options)
        write_array(group, "rows", rows)
        for name in INBLOCK_ARRAYS:
            write_array(group, name, getattr(inblock, name))
        if time is not None:
            write_array(group, "time", time)

    def commit(self, params: dict[str, Any], stats: dict[str, Any], overwrite: bool = False) -> None:
        """Drop the staging area, record the final parameters and stats with the completion
        marker (the last write), check the target again (time has passed since
        :meth:`check_target`) and swap the store in."""
        root = open_group(self.staged, "r+", self.storage_options)
        del root[STAGING]
        root.attrs["blockals"] = {**root.attrs["blockals"], "params": params, "complete": True, "stats": stats}
        self.check_target(overwrite)
        replace_path(self.staged, self.path, self.storage_options)

    def remove(self) -> None:
        """Remove the staged store (after a failure, or once swapped in: then nothing); safe to interrupt."""
        remove_path(self.staged, self.storage_options)
