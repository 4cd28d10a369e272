"""The Zarr layout of recommendations for every user, written block by block.

::

    <recs>/                  attributes: blockals = {format, format_version, n, n_blocks, side, complete}
      user_ids, item_ids     the model's ids; the arrays below hold global indices into them
      blocks/<b>/users       (n_b,) global index of each user of user block b
      blocks/<b>/items       (n_b, n) recommended item indices, best first; -1 past a user's candidates
      blocks/<b>/scores      (n_b, n) float32 scores; NaN where items is -1

:func:`stage` picks a hidden sibling of the output, :func:`create` writes the group there
marked incomplete, :func:`write_block` runs inside a Dask task per block, and
:func:`publish` sets the marker and moves the group into place, replacing an earlier one
only then. :func:`read_recommendations` refuses an incomplete group and checks every block
against what was recorded. The same recommendations can be written as Parquet instead
(below).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from blockals.errors import InputError, StoreError
from blockals.formats import (check_meta, clear_leftovers, filesystem, open_group, read_array, remove_path,
                              replace_path, sibling, sibling_token, writable_meta, write_array)

__all__ = ["RECS_FORMAT", "RECS_FORMAT_VERSION", "create", "write_block", "commit", "read_recommendations",
           "stage", "write_parquet_part", "publish", "discard"]

RECS_FORMAT = "blockals-recommendations"
RECS_FORMAT_VERSION = 1
KIND = "recommendations store"


def create(path: str, n: int, n_blocks: int, user_ids: np.ndarray, item_ids: np.ndarray,
           storage_options: dict | None = None, side: str = "users") -> None:
    """Start a recommendations store at ``path``, replacing an earlier one (never anything else).

    ``side="items"`` stores users for every item: ``user_ids`` are then the items' ids and
    ``item_ids`` the users' (the rows and what is recommended to them), and the store says so.
    """
    writable_meta(path, RECS_FORMAT, KIND, storage_options)
    meta = {"format": RECS_FORMAT, "format_version": RECS_FORMAT_VERSION, "n": n, "n_blocks": n_blocks,
            "side": side, "complete": False}
    root = open_group(path, "w", storage_options, attributes={"blockals": meta})
    write_array(root, "user_ids", user_ids)
    write_array(root, "item_ids", item_ids)
    for b in range(n_blocks):
        root.require_group(f"blocks/{b}")


def write_block(path: str, storage_options: dict | None, block: int, users: np.ndarray, items: np.ndarray,
                scores: np.ndarray) -> int:
    """Write one user block's recommendations (a Dask task); returns its number of users."""
    group = open_group(f"{path}/blocks/{block}", "r+", storage_options)
    write_array(group, "users", users)
    write_array(group, "items", items)
    write_array(group, "scores", scores.astype(np.float32))
    return int(users.shape[0])


def commit(path: str, storage_options: dict | None = None) -> None:
    """Mark the store complete: every block has been written."""
    root = open_group(path, "r+", storage_options)
    root.attrs["blockals"] = {**root.attrs["blockals"], "complete": True}


def _block(root, path: str, b: int, n: int, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    where = f"{path}/blocks/{b}"
    group = root[f"blocks/{b}"]
    users, items, scores = (read_array(group, name, where) for name in ("users", "items", "scores"))
    if items.shape != (users.shape[0], n) or scores.shape != items.shape:
        raise StoreError(f"{where} does not hold {n} recommendations for each of its {users.shape[0]} users.")
    if users.size and (users.min() < 0 or users.max() >= n_users) or items.size and items.max() >= n_items:
        raise StoreError(f"{where} refers to users or items that {path}/user_ids and item_ids do not hold.")
    return users, items, scores


def read_recommendations(path: str, storage_options: dict | None = None) -> pd.DataFrame:
    """A recommendations store as a DataFrame with columns user, rank, item, score (sorted by
    user, rank); item, rank, user, score for a store of users for every item."""
    path = str(path)
    root = open_group(path, "r", storage_options)
    meta = check_meta(root.attrs.get("blockals"), path, RECS_FORMAT, RECS_FORMAT_VERSION, KIND)
    user_ids, item_ids = read_array(root, "user_ids", path), read_array(root, "item_ids", path)
    row, other = ("item", "user") if meta.get("side") == "items" else ("user", "item")
    frames = []
    for b in range(meta["n_blocks"]):
        users, items, scores = _block(root, path, b, meta["n"], user_ids.shape[0], item_ids.shape[0])
        k = items.shape[1]
        valid = items >= 0
        frames.append(pd.DataFrame({
            row: np.repeat(user_ids[users], k).reshape(-1, k)[valid],
            "rank": np.broadcast_to(np.arange(1, k + 1), items.shape)[valid],
            other: item_ids[np.where(valid, items, 0)][valid],
            "score": scores[valid],
        }))
    return pd.concat(frames, ignore_index=True).sort_values([row, "rank"], ignore_index=True)


# -- the same recommendations as a Parquet dataset ----------------------------------------
# One file per block (columns <row side>, rank, <other side>, score, in original ids), for
# readers that are not blockals: Dask, Spark, DuckDB, pandas. A marker file (ignored by
# Parquet readers, as is every name starting with "_") says the directory is blockals' own.
PARQUET_MARKER = "_blockals.json"


def stage(output: str, fmt: str, storage_options: dict | None = None) -> str:
    """The hidden sibling to write an output of format ``fmt`` (``"zarr"``, ``"parquet"``)
    into, refusing an ``output`` that holds anything but earlier recommendations of that
    format. Written there and :func:`publish`-ed when whole, an interrupted run leaves the
    earlier output as it was, and never a partial one at ``output``."""
    clear_leftovers(output, storage_options)
    _check_replaceable(output, fmt, storage_options)
    staged = sibling(output, f"partial-{sibling_token()}")
    if fmt == "parquet":
        fs, path = filesystem(staged, storage_options)
        fs.makedirs(path, exist_ok=True)
    return staged


def _check_replaceable(output: str, fmt: str, storage_options: dict | None) -> None:
    if fmt == "zarr":
        writable_meta(output, RECS_FORMAT, KIND, storage_options)
        return
    fs, path = filesystem(output, storage_options)
    if fs.exists(path) and not (fs.isdir(path) and (not fs.ls(path) or fs.exists(f"{path}/{PARQUET_MARKER}"))):
        raise InputError(f"{output} exists and is not a blockals Parquet output; refusing to write over it.")


def write_parquet_part(staged: str, storage_options: dict | None, block: int, frame: pd.DataFrame) -> None:
    """One block's recommendations into the Parquet dataset being written (a Dask task)."""
    frame.to_parquet(f"{staged}/part-{block:05d}.parquet", index=False, storage_options=storage_options)


def publish(staged: str, output: str, fmt: str, storage_options: dict | None = None) -> None:
    """Mark the staged output complete and move it to ``output``, replacing an earlier one only now."""
    if fmt == "zarr":
        commit(staged, storage_options)
    else:
        fs, path = filesystem(staged, storage_options)
        with fs.open(f"{path}/{PARQUET_MARKER}", "w") as f:
            f.write('{"format": "blockals-recommendations-parquet", "complete": true}\n')
    _check_replaceable(output, fmt, storage_options)  # again: time has passed
    replace_path(staged, output, storage_options)


def discard(staged: str, storage_options: dict | None = None) -> None:
    """Remove what a run that did not :func:`publish` left at its staged path."""
    remove_path(staged, storage_options)
