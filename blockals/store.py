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
      items/...                   the same, by item

Every chunk carries a CRC32C checksum, so a corrupted chunk fails to read with a message
naming the array. ``complete`` is set last, after every array is written; readers refuse
a store without it.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from blockals.formats import absolute, check_meta, open_group, read_array
from blockals.routing import InBlock, OutBlocks

__all__ = [
    "FORMAT_VERSION",
    "RatingStore",
    "StoreRef",
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
    """Per-process LRU of decoded in-blocks, so iterations after the first skip the read.

    Keyed by the store's unique id: a store rewritten at the same path never hits stale
    entries.
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
        if size > max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = block
            self._bytes += size
            while self._bytes > max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


BLOCK_CACHE = _BlockCache()


def load_inblock(ref: StoreRef, side: Side, block: int, cache_limit: int = DEFAULT_CACHE_BYTES) -> InBlock:
    """Read the in-block of ``(side, block)``, from this process's cache when it is there.

    The cache keeps at most ``cache_limit`` bytes (:func:`blockals.cluster.cache_bytes`
    sizes it from a worker's memory limit).
    """
    key = (ref.store_id, side, block)
    cached = BLOCK_CACHE.get(key)
    if cached is not None:
        return cached
    where = f"{ref.path}/{side}/blocks/{block}"
    group = open_group(ref.path, storage_options=ref.options)[f"{side}/blocks/{block}"]
    inblock = InBlock(**{name: read_array(group, name, where) for name in INBLOCK_ARRAYS})
    BLOCK_CACHE.put(key, inblock, cache_limit)
    return inblock


def load_out_blocks(ref: StoreRef, side: Side, block: int) -> InBlock | OutBlocks:
    """What each source block ships to ``(side, block)``: the cached in-block when this
    process has it, else just its two routing arrays."""
    cached = BLOCK_CACHE.get((ref.store_id, side, block))
    if cached is not None:
        return cached
    where = f"{ref.path}/{side}/blocks/{block}"
    group = open_group(ref.path, storage_options=ref.options)[f"{side}/blocks/{block}"]
    return OutBlocks(read_array(group, "need_ptr", where), read_array(group, "need_rows", where))


def load_rows(ref: StoreRef, side: Side, block: int) -> np.ndarray:
    """Global index of each local row of ``(side, block)``."""
    group = open_group(ref.path, storage_options=ref.options)
    return read_array(group, f"{side}/blocks/{block}/rows", ref.path)


def block_triples(
    ref: StoreRef, side: Side, block: int, n_src_blocks: int, cache_limit: int = DEFAULT_CACHE_BYTES
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global (row, other side's row, rating) of every rating in one block."""
    inblock = load_inblock(ref, side, block, cache_limit)
    src = other_side(side)
    sent = [load_rows(ref, src, j)[inblock.out_block(j)] for j in range(n_src_blocks)]
    others = np.concatenate(sent) if sent else np.zeros(0, dtype=np.int64)
    return load_rows(ref, side, block)[inblock.row], others[inblock.col], inblock.rating


def load_times(ref: StoreRef, block: int) -> np.ndarray:
    """Timestamps of a user block's ratings, in in-block order (stores ingested with them)."""
    group = open_group(ref.path, storage_options=ref.options)
    return read_array(group, f"users/blocks/{block}/time", ref.path)


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
        self.path = absolute(str(path))
        self.storage_options = storage_options
        self._group = open_group(self.path, storage_options=storage_options)
        self._meta = meta = check_meta(self._group.attrs.get("blockals"), self.path, FORMAT, FORMAT_VERSION, "ratings store")
        self.params: dict = meta["params"]
        self.stats: dict = meta["stats"]
        self._ids: dict[str, pd.Index] = {}
        self._assignment: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # -- sizes ---------------------------------------------------------------
    @property
    def ref(self) -> StoreRef:
        opts = tuple(sorted((self.storage_options or {}).items()))
        return StoreRef(self.path, self._meta["store_id"], opts)

    @property
    def store_id(self) -> str:
        return self._meta["store_id"]

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
            self._ids[side] = pd.Index(read_array(self._group, f"{side}/ids", self.path))
        return self._ids[side]

    @property
    def user_ids(self) -> pd.Index:
        return self.ids("users")

    @property
    def item_ids(self) -> pd.Index:
        return self.ids("items")

    def assignment(self, side: Side) -> tuple[np.ndarray, np.ndarray]:
        """``(block, local)`` of every global row."""
        if side not in self._assignment:
            self._assignment[side] = (
                read_array(self._group, f"{side}/block", self.path),
                read_array(self._group, f"{side}/local", self.path),
            )
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
    return RatingStore(str(path), storage_options)
