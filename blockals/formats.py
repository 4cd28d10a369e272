"""Zarr groups and arrays on local paths and fsspec URLs: the one place that opens them.

Every blockals group (ratings store, checkpoint, model, recommendations) is written and
read through these helpers, so they share one set of rules:

* arrays are compressed and carry a CRC32C checksum per chunk, and every chunk is
  written, so a corrupted or lost chunk fails to read with a message naming the array;
* a group's ``blockals`` attributes name its format and version, and a ``complete``
  marker is written last; :func:`check_meta` refuses anything else;
* a writer never empties a path that holds something other than its own format
  (:func:`writable_meta`), and removal is safe to interrupt (:func:`remove_path`).

This module and the other storage modules (:mod:`blockals.store`,
:mod:`blockals.checkpoint`, :mod:`blockals.modelio`, :mod:`blockals.recstore`,
:mod:`blockals.lock`) import neither Dask nor anything above them.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from blockals.errors import InputError, StoreError

__all__ = [
    "open_group",
    "check_meta",
    "write_array",
    "read_array",
    "absolute",
    "parse_path",
    "parse_storage_options",
    "path_exists",
    "writable_meta",
    "remove_path",
    "blockals_meta",
    "sibling",
    "move_path",
    "children",
]

# Large enough that a block is usually one chunk (one read), small enough to stream.
CHUNK_ELEMENTS = 1 << 22
# LZ4 in Blosc with byte shuffling: within 10% of zstd's size on the in-blocks, decoded
# 2.4x as fast, and at scale the in-blocks are read again every iteration
# (docs/performance.md, "One 200M iteration, stage by stage").
CODECS = (zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), zarr.codecs.Crc32cCodec())


def open_group(path: str, mode: str = "r", storage_options: dict | None = None, attributes: dict | None = None) -> zarr.Group:
    """Open a Zarr group; ``attributes`` are written with a created group's metadata, in one write."""
    try:
        return zarr.open_group(store=path, mode=mode, storage_options=storage_options, attributes=attributes)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreError(f"{path} is not a blockals store: there is no Zarr group there.") from exc
    except ValueError as exc:  # unreadable or foreign metadata
        raise StoreError(f"{path} is not a blockals store: its Zarr metadata cannot be read ({exc}).") from exc


def check_meta(meta: Any, path: str, fmt: str, version: int, kind: str, complete: bool = True) -> dict:
    """The ``blockals`` attributes of a group, refused unless of the expected format and version.

    With ``complete``, a group whose completion marker is missing is refused too.
    """
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise StoreError(f"{path} is not a blockals {kind} (its attributes do not say {fmt!r}).")
    if meta.get("format_version") != version:
        raise StoreError(
            f"{path} has format version {meta.get('format_version')}, but this blockals reads version "
            f"{version}; upgrade blockals or write the {kind} again."
        )
    if complete and not meta.get("complete"):
        raise StoreError(f"{path} is incomplete: it was not completely written (no completion marker); write it again.")
    return meta


def write_array(group: zarr.Group, name: str, data: np.ndarray, chunk_elements: int = CHUNK_ELEMENTS) -> zarr.Array:
    """Write ``data`` as a checksummed, compressed 1-D or 2-D array, in chunks of about
    ``chunk_elements``."""
    data = np.asarray(data)
    if data.dtype.kind in "OUT":
        dtype: Any = str
        # Through objects: NumPy's variable-width strings (what text is read back as) do
        # not cast to fixed-width text directly.
        data = data.astype(object).astype(str)
    else:
        dtype = data.dtype
    rows = max(1, min(data.shape[0], chunk_elements // max(1, int(np.prod(data.shape[1:])))))
    arr = group.create_array(
        name,
        shape=data.shape,
        dtype=dtype,
        chunks=(rows, *data.shape[1:]),
        compressors=CODECS,
        overwrite=True,
        # Every chunk gets a file (and a checksum): a lost file must fail, not read as zeros.
        config={"write_empty_chunks": True},
    )
    if data.size:
        arr[...] = data
    return arr


def read_array(group: zarr.Group, name: str, where: str) -> np.ndarray:
    """Read a whole array; a missing or corrupted one raises :class:`StoreError` naming it."""
    try:
        array = group[name]
        data = array[...]
    except KeyError as exc:
        raise StoreError(f"{where}/{name} is missing from the store.") from exc
    except ValueError as exc:
        if "checksum" in str(exc):
            raise StoreError(
                f"{where}/{name} is corrupted: a chunk's checksum does not match its bytes."
            ) from exc
        # E.g. metadata naming a codec Zarr does not know, such as a planted pickle codec.
        raise StoreError(f"{where}/{name} cannot be read ({exc}).") from exc
    # Every chunk is written (write_empty_chunks), so a missing one is damage, not zeros.
    if array.nchunks_initialized != array.nchunks:
        missing = array.nchunks - array.nchunks_initialized
        raise StoreError(f"{where}/{name} is damaged: {missing} of its {array.nchunks} chunk files are missing.")
    # Text as Python strings, as ids are after an ingest, whatever string type Zarr reads it as.
    return data.astype(object) if data.dtype.kind == "T" else data


def blockals_meta(path: str, storage_options: dict | None = None) -> dict | None:
    """The ``blockals`` attributes of the Zarr group at ``path``, or None where there is no
    such group (nothing, a file, a foreign group): how a path is told from a source."""
    try:
        meta = open_group(path, "r", storage_options).attrs.get("blockals")
    except StoreError:
        return None
    return meta if isinstance(meta, dict) else None


def parse_path(value: Any, name: str) -> str:
    """A local path or fsspec URL, given as ``str`` or path-like (a number is not a path)."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise InputError(f"{name} must be a path (str or os.PathLike), got {value!r}.")
    return os.fspath(value)


def parse_storage_options(value: Any, name: str = "storage_options") -> dict | None:
    """fsspec's keyword arguments for a remote path: a mapping with string keys, or None."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise InputError(f"{name} must be a dict of fsspec options (string keys) or None, got {type(value).__name__}.")
    return value


def absolute(path: str) -> str:
    """Local paths made absolute, so Dask workers started elsewhere find them; URLs as given."""
    return path if "://" in path else os.path.abspath(path)


def sibling(path: str, tag: str) -> str:
    """A hidden path beside ``path``, named after it and ``tag`` (e.g. ``.m.zarr.save-3f2a``)."""
    parent, _, name = absolute(path).rstrip("/").rpartition("/")
    return f"{parent}/.{name}.{tag}"


def filesystem(path: str, storage_options: dict | None):
    """``(fsspec filesystem, path within it)`` of a local path or URL."""
    import fsspec

    return fsspec.core.url_to_fs(path, **(storage_options or {}))


def path_exists(path: str, storage_options: dict | None = None) -> bool:
    fs, p = filesystem(path, storage_options)
    return fs.exists(p)


def children(path: str, storage_options: dict | None = None) -> list[str]:
    """The paths directly under the directory ``path``, written as ``path`` is; none where
    there is no directory."""
    fs, p = filesystem(path, storage_options)
    if not fs.isdir(p):
        return []
    return [f"{path.rstrip('/')}/{entry.rstrip('/').rsplit('/', 1)[-1]}" for entry in sorted(fs.ls(p, detail=False))]


def writable_meta(path: str, fmt: str, kind: str, storage_options: dict | None = None) -> dict | None:
    """What a writer of a ``fmt`` group finds at ``path``, refusing to destroy anything else.

    Returns the ``blockals`` attributes of a group of format ``fmt`` (any version, complete
    or not), or None when nothing or an empty directory is there. Anything else (a file,
    another Zarr group, a directory with content) raises :class:`InputError`: writing a
    group with mode ``"w"`` would empty the directory.
    """
    if not path_exists(path, storage_options):
        return None
    try:
        meta = open_group(path, "r", storage_options).attrs.get("blockals")
    except (StoreError, ValueError):  # no group, or unreadable metadata (bad zarr.json)
        meta = None
    if isinstance(meta, dict) and meta.get("format") == fmt:
        return meta
    fs, p = filesystem(path, storage_options)
    if fs.isdir(p) and not fs.ls(p):
        return None
    raise InputError(f"{path} exists and is not a blockals {kind}; refusing to write over it.")


def move_path(source: str, target: str, storage_options: dict | None = None) -> None:
    """Rename the tree at ``source`` to ``target``, which must not exist (one rename on a
    local disk; a copy and a delete on object stores)."""
    fs, src = filesystem(source, storage_options)
    dst = filesystem(target, storage_options)[1]
    if "://" not in source:
        fs.mv(src, dst, recursive=True)
        return
    # Object stores have no directories: fsspec's recursive mv also asks to copy the prefix
    # itself, an object that does not exist (NoSuchKey). Every object, then the originals.
    files = fs.find(src)
    for path in files:
        fs.copy(path, dst + path[len(src.rstrip("/")):])
    fs.rm(files)


def remove_path(path: str, storage_options: dict | None = None) -> None:
    """Delete a store or checkpoint tree, local or remote; absent paths are fine.

    Safe to interrupt: a complete blockals group is first marked incomplete, and its root
    ``zarr.json`` is deleted last, so a removal cut short (``kill -9`` of an ingest
    replacing a store) leaves a group that reads as incomplete, never as complete with
    arrays missing, and that the next ingest recognises as its own and removes.
    """
    fs, p = filesystem(path, storage_options)
    if not fs.exists(p):
        return
    try:
        root = open_group(path, "r+", storage_options)
        meta = root.attrs.get("blockals")
    except (OSError, ValueError):  # not a Zarr group (StoreError), or not a directory
        meta = None
    if isinstance(meta, dict) and meta.get("complete"):
        root.attrs["blockals"] = {**meta, "complete": False}
    marker = f"{p.rstrip('/')}/zarr.json"
    files = [f for f in fs.find(p) if f != marker]
    if files:
        fs.rm(files)
    if fs.exists(p):
        fs.rm(p, recursive=True)
