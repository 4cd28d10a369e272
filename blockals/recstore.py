"""The Zarr layout of recommendations for every user, written block by block.

::

    <recs>/                  attributes: blockals = {format, format_version, n, n_blocks, side, complete}
      user_ids, item_ids     the model's ids; the arrays below hold global indices into them
      blocks/<b>/users       (n_b,) global index of each user of user block b
      blocks/<b>/items       (n_b, n) recommended item indices, best first; -1 past a user's candidates
      blocks/<b>/scores      (n_b, n) float32 scores; NaN where items is -1

:func:`create` writes the group marked incomplete, :func:`write_block` runs inside a Dask
task per user block, and :func:`commit` sets the marker last. :func:`read_recommendations`
refuses an incomplete group and checks every block against what was recorded.
"""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd

from blockals.errors import InputError, StoreError
from blockals.formats import (check_meta, filesystem, move_path, open_group, path_exists, read_array, remove_path,
                              sibling, writable_meta, write_array)

__all__ = ["RECS_FORMAT", "RECS_FORMAT_VERSION", "create", "write_block", "commit", "read_recommendations",
           "start_parquet", "write_parquet_part", "commit_parquet"]

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
# readers that are not blockals: Dask, Spark, DuckDB, pandas. The dataset is written into a
# temporary sibling and moved into place when whole, so an interrupted run never leaves a
# directory that a Parquet reader takes for a complete result; a marker file (ignored by
# Parquet readers, as is every name starting with "_") says the directory is blockals' own.
PARQUET_MARKER = "_blockals.json"


def start_parquet(output: str, storage_options: dict | None = None) -> str:
    """The temporary sibling to write a Parquet output into; refuses an ``output`` that holds
    anything but an earlier blockals Parquet output."""
    fs, path = filesystem(output, storage_options)
    if fs.exists(path) and not (fs.isdir(path) and (not fs.ls(path) or fs.exists(f"{path}/{PARQUET_MARKER}"))):
        raise InputError(f"{output} exists and is not a blockals Parquet output; refusing to write over it.")
    partial = sibling(output, f"partial-{uuid.uuid4().hex[:12]}")
    fs.makedirs(filesystem(partial, storage_options)[1], exist_ok=True)
    return partial


def write_parquet_part(partial: str, storage_options: dict | None, block: int, frame: pd.DataFrame) -> None:
    """One block's recommendations into the dataset being written (a Dask task)."""
    frame.to_parquet(f"{partial}/part-{block:05d}.parquet", index=False, storage_options=storage_options)


def commit_parquet(partial: str, output: str, storage_options: dict | None = None) -> None:
    """Mark the dataset complete and move it to ``output``, replacing an earlier one only now."""
    fs, src = filesystem(partial, storage_options)
    with fs.open(f"{src}/{PARQUET_MARKER}", "w") as f:
        f.write('{"format": "blockals-recommendations-parquet", "complete": true}\n')
    if path_exists(output, storage_options):
        remove_path(output, storage_options)
    move_path(partial, output, storage_options)
