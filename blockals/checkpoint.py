"""Training checkpoints: factor blocks on disk, and the iteration they belong to.

A checkpoint is a Zarr group with two slots. A checkpointed iteration writes every factor
block into the slot not holding the last committed iteration, then commits by rewriting
the group's attributes: ``committed = {iteration, slot, history}``. A crash
while blocks are written leaves the committed slot untouched, so resuming always starts
from a complete iteration.

A checkpoint made with the factor blocks' shapes (``block_rows`` and ``width``) records
them, and :meth:`Checkpoint.read_block` refuses a block of another shape, naming it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from blockals.errors import StoreError
from blockals.formats import blockals_meta, check_meta, children, open_group, path_exists, read_array, writable_meta, write_array
from blockals.store import Side

__all__ = ["Checkpoint", "Committed", "write_block", "difference", "committed_configs"]

FORMAT = "blockals-checkpoint"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Committed:
    iteration: int
    slot: int
    history: list[dict[str, Any]]


def write_block(path: str, storage_options: dict | None, slot: int, side: Side, block: int, factors: np.ndarray) -> int:
    """Write one factor block into a slot (runs inside a Dask task)."""
    group = open_group(f"{path}/slot{slot}/{side}", "r+", storage_options)
    write_array(group, str(block), factors)
    return int(factors.nbytes)


def difference(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> tuple[str, str]:
    """The first parameter two configurations disagree on, as ``("rank=4", "rank=8")``, in
    the order of ``wanted`` (a config's, where derived parameters such as ``bias_reg`` come
    after what they derive from)."""
    for key in [*wanted, *(key for key in recorded if key not in wanted)]:
        if recorded.get(key) != wanted.get(key):
            if key == "arrays_digest":  # a hash: say what it stands for
                return "other initial factors or weights", "these"
            return f"{key}={recorded.get(key)!r}", f"{key}={wanted.get(key)!r}"
    return "the same parameters", "these"


def committed_configs(parent: str, store_id: str, storage_options: dict | None = None) -> list[dict[str, Any]]:
    """The configurations of the checkpoints of store ``store_id`` under ``parent`` that
    hold a committed iteration: what a resume could have meant."""
    configs = []
    for path in children(parent, storage_options):
        meta = blockals_meta(path, storage_options) or {}
        if meta.get("format") == FORMAT and meta.get("store_id") == store_id and meta.get("committed"):
            configs.append(meta.get("config") or {})
    return configs


class Checkpoint:
    """The checkpoint of one (store, configuration) pair.

    Parameters
    ----------
    path : str
        Where the checkpoint group lives.
    store_id : str
        The ratings store it was trained on; a checkpoint of another store is refused.
    config : dict
        The training configuration; a checkpoint made with another one is refused.
    block_rows : dict, optional
        Rows of every factor block, per side (the store's ``block_rows``).
    width : int, optional
        Columns of every factor block. Given with ``block_rows``, both are recorded and
        :meth:`read_block` checks every block against them; a checkpoint that records
        neither (as older ones) reads its blocks unchecked.
    """

    def __init__(
        self, path: str, store_id: str, config: dict[str, Any], storage_options: dict | None = None, *,
        block_rows: Mapping[Side, Sequence[int]] | None = None, width: int | None = None,
    ) -> None:
        if (block_rows is None) != (width is None):
            raise ValueError("a checkpoint records block_rows and width together, or neither.")
        self.path = path
        self.store_id = store_id
        self.config = config
        self.storage_options = storage_options
        self.shapes = None if width is None else {
            "block_rows": {side: [int(n) for n in rows] for side, rows in block_rows.items()}, "width": int(width)
        }

    def _meta(self) -> dict[str, Any]:
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "store_id": self.store_id, "config": self.config}
        return meta if self.shapes is None else {**meta, **self.shapes}

    def load(self) -> Committed | None:
        """The last committed iteration, or None when there is none to resume from."""
        if not path_exists(self.path, self.storage_options):
            return None
        meta = open_group(self.path, "r", self.storage_options).attrs.get("blockals")
        # Commits, not a completion marker, say what a checkpoint holds.
        check_meta(meta, self.path, FORMAT, FORMAT_VERSION, "checkpoint", complete=False)
        if meta.get("store_id") != self.store_id:
            raise StoreError(f"checkpoint {self.path} was made from another ratings store; it cannot be resumed here.")
        if meta.get("config") != self.config:
            recorded, wanted = difference(meta.get("config") or {}, self.config)
            raise StoreError(
                f"checkpoint {self.path} was made with other training parameters ({recorded}, not {wanted}); "
                f"resume with {recorded}, or train without resume."
            )
        committed = meta.get("committed")
        if not committed:
            return None
        return Committed(int(committed["iteration"]), int(committed["slot"]), list(committed["history"]))

    def check_writable(self) -> None:
        """Refuse a path holding anything but a checkpoint (a file, a directory with content,
        another Zarr group): :meth:`start` opens it with mode ``"w"``, which empties it."""
        writable_meta(self.path, FORMAT, "checkpoint", self.storage_options)

    def start(self) -> None:
        """Create an empty checkpoint, replacing any earlier one at the path."""
        self.check_writable()
        root = open_group(self.path, "w", self.storage_options)
        root.attrs["blockals"] = self._meta()
        # Made here, not by the block writers: concurrent group creation races.
        for slot in (0, 1):
            for side in ("users", "items"):
                root.require_group(f"slot{slot}/{side}")

    def commit(self, iteration: int, slot: int, history: list[dict[str, Any]]) -> None:
        root = open_group(self.path, "r+", self.storage_options)
        root.attrs["blockals"] = {
            **self._meta(),
            "committed": {"iteration": iteration, "slot": slot, "history": history},
        }

    def read_block(self, slot: int, side: Side, block: int) -> np.ndarray:
        """One factor block of a slot, refused unless of the shape the checkpoint records (if any)."""
        root = open_group(self.path, "r", self.storage_options)
        where = f"slot{slot}/{side}/{block}"
        factors = read_array(root, where, self.path)
        meta = root.attrs.get("blockals") or {}
        if "width" in meta:
            expected = (meta["block_rows"][side][block], meta["width"])
            if factors.shape != expected:
                raise StoreError(
                    f"{self.path}/{where} has shape {factors.shape}, but the checkpoint records {expected}; it is damaged."
                )
        return factors
