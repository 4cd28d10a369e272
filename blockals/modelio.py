"""The Zarr layout of a saved model: arrays and JSON attributes, never pickle.

::

    <model>/                 attributes: blockals = {format, format_version, params, config,
                             store_path, history, complete}
      user_factors, item_factors   (n_users, rank), (n_items, rank)
      user_ids, item_ids           original ids, in factor-row order
      user_bias, item_bias, global_mean     biased models only
      user_weights, item_weights            WALS models only

:func:`write_model` holds the model's lease (:mod:`blockals.lock`) while it writes. It
writes the whole model, ``complete`` last, to a hidden sibling of the path
(``.<name>.save-<token>``) and only then swaps it in: a model at the path is replaced
only with ``overwrite=True``, a save that fails leaves it as it was, and a model can be
saved over the path it was loaded from. :func:`read_model` refuses anything else and
checks the arrays against the recorded parameters, so a model that was edited or cut
short is refused with the array named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from blockals.errors import InputError, StoreError
from blockals.formats import (
    check_meta, clear_leftovers, open_group, read_array, refuse_overlap, remove_path, replace_path, resolve, sibling,
    sibling_token, writable_meta, write_array,
)
from blockals.lock import Lease

__all__ = ["MODEL_FORMAT", "MODEL_FORMAT_VERSION", "SavedModel", "write_model", "read_model", "check_model_path"]

MODEL_FORMAT = "blockals-model"
MODEL_FORMAT_VERSION = 1
# The arrays a model may hold; which ones depends on its mode.
ARRAYS = ("user_factors", "item_factors", "user_ids", "item_ids", "user_bias", "item_bias", "global_mean",
          "user_weights", "item_weights", "user_items_indptr", "user_items_indices")
CARRIED = {"biases": ("user_bias", "item_bias", "global_mean"), "wals": ("user_weights", "item_weights")}


@dataclass(frozen=True, kw_only=True)
class SavedModel:
    """A model as stored: its parameters (JSON-able ones), learned arrays and records."""

    params: dict[str, Any]
    arrays: dict[str, np.ndarray]
    config: dict[str, Any] | None
    store_path: str | None
    history: list[dict[str, Any]]


def check_model_path(path: str, storage_options: dict | None = None, *, overwrite: bool = False) -> dict | None:
    """Refuse a path holding anything but a blockals model, or a complete model unless
    ``overwrite``; the attributes of the model there (complete or not), or None."""
    meta = writable_meta(path, MODEL_FORMAT, "model", storage_options)
    if meta is not None and meta.get("complete") and not overwrite:
        raise InputError(f"{path} already holds a complete model; pass overwrite=True (--overwrite) to replace it.")
    return meta


def write_model(path: str, model: SavedModel, storage_options: dict | None = None, *, overwrite: bool = False,
                break_lease: bool = False) -> None:
    """Write ``model`` at ``path``, replacing a model there (never anything else) only with ``overwrite``.

    ``path`` is resolved (:func:`blockals.formats.resolve`: through a symlink, the model is
    replaced at its real place) and refused if it is, contains or lies inside the model's
    ratings store. The model is written whole beside the path and then swapped in
    (:func:`blockals.formats.replace_path`), so the old one stays loadable until the new
    one is complete (between the two renames of the swap, the path is briefly empty; the
    old model is then at ``.<name>.old-<token>``, where the next save puts it back should
    the swap be cut short).
    """
    path = resolve(path)
    check_model_path(path, storage_options, overwrite=overwrite)  # what is there first: the store itself, say
    refuse_overlap({"the model path": path}, {"its ratings store": model.store_path})
    staged = sibling(path, f"save-{sibling_token()}")
    with Lease(path, "model", storage_options, break_lease):
        clear_leftovers(path, storage_options)
        check_model_path(path, storage_options, overwrite=overwrite)
        try:
            _write_group(staged, model, storage_options)
            check_model_path(path, storage_options, overwrite=overwrite)  # again: time has passed
            replace_path(staged, path, storage_options)
        finally:
            remove_path(staged, storage_options)


def _write_group(path: str, model: SavedModel, storage_options: dict | None) -> None:
    meta = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "params": model.params, "complete": False}
    root = open_group(path, "w", storage_options, attributes={"blockals": meta})
    for name, value in model.arrays.items():
        write_array(root, name, np.atleast_1d(value))
    root.attrs["blockals"] = {**meta, "config": model.config, "store_path": model.store_path,
                              "history": model.history, "complete": True}


def _expected(params: dict[str, Any]) -> set[str]:
    names = {"user_factors", "item_factors", "user_ids", "item_ids"}
    if params.get("biases"):
        names |= set(CARRIED["biases"])
    if params.get("weighting") == "wals":
        names |= set(CARRIED["wals"])
    return names


def _check_shapes(path: str, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    rank = params.get("rank")
    for side in ("user", "item"):
        F, ids = arrays[f"{side}_factors"], arrays[f"{side}_ids"]
        if F.ndim != 2 or F.shape[1] != rank:
            raise StoreError(f"{path}/{side}_factors has shape {F.shape}, but the model's rank is {rank}.")
        for name in (f"{side}_ids", f"{side}_bias", f"{side}_weights"):
            if name in arrays and arrays[name].shape != (F.shape[0],):
                raise StoreError(f"{path}/{name} has shape {arrays[name].shape}; the model has {F.shape[0]} {side}s.")
        if len(np.unique(ids)) != ids.shape[0]:
            raise StoreError(f"{path}/{side}_ids holds an id twice.")
    if ("user_items_indptr" in arrays) != ("user_items_indices" in arrays):
        raise StoreError(f"{path} holds only one of user_items_indptr and user_items_indices.")
    if "user_items_indptr" in arrays:
        indptr, indices = arrays["user_items_indptr"], arrays["user_items_indices"]
        n_users, n_items = arrays["user_ids"].shape[0], arrays["item_ids"].shape[0]
        if (indptr.shape != (n_users + 1,) or indptr[0] != 0 or indptr[-1] != indices.shape[0]
                or (np.diff(indptr) < 0).any() or (indices.size and (indices.min() < 0 or indices.max() >= n_items))):
            raise StoreError(f"{path}/user_items_indptr and user_items_indices are not a CSR matrix of the "
                             f"model's {n_users} users and {n_items} items.")


def read_model(path: str, storage_options: dict | None = None) -> SavedModel:
    """Read and check a model written by :func:`write_model`."""
    root = open_group(path, "r", storage_options)
    meta = check_meta(root.attrs.get("blockals"), path, MODEL_FORMAT, MODEL_FORMAT_VERSION, "model")
    where = f"{path}/zarr.json"  # the file a hand edit went into
    params, history = meta.get("params"), meta.get("history")
    if not isinstance(params, dict):
        raise StoreError(f"{where}: key 'params' must map parameter names to values.")
    rank = params.get("rank")
    if "rank" not in params:
        raise StoreError(f"{where}: key 'params.rank' is missing.")
    if isinstance(rank, bool) or not isinstance(rank, int):  # the arrays are checked against it
        raise StoreError(f"{where}: key 'params.rank' must be an integer, got {rank!r}.")
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise StoreError(f"{where}: key 'history' must be a list of one mapping per iteration.")
    for key, kind in (("config", dict), ("store_path", str)):
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            raise StoreError(f"{where}: key {key!r} must be a {kind.__name__} or null, got {type(meta[key]).__name__}.")
    try:
        present = set(root.array_keys())
    except ValueError as exc:  # an array's metadata Zarr cannot parse, e.g. a planted pickle codec
        raise StoreError(f"{path} cannot be read ({exc}).") from exc
    missing = sorted(_expected(params) - present)
    if missing:
        raise StoreError(f"{path}/{missing[0]} is missing from the model.")
    arrays = {name: read_array(root, name, path) for name in ARRAYS if name in present}
    _check_shapes(path, params, arrays)
    return SavedModel(params=params, arrays=arrays, config=meta.get("config"), store_path=meta.get("store_path"),
                      history=meta["history"])
