"""Zarr groups and arrays on local paths and fsspec URLs: the one place that opens them.

Every blockals group (ratings store, checkpoint, model, recommendations) is written and
read through these helpers, so they share one set of rules:

* arrays are compressed and carry a CRC32C checksum per chunk, and every chunk is
  written, so a corrupted or lost chunk fails to read with a message naming the array;
* a group's ``blockals`` attributes name its format and version, and a ``complete``
  marker is written last; :func:`check_meta` refuses anything else;
* a writer never empties a path that holds something other than its own format
  (:func:`writable_meta`), and removal is safe to interrupt (:func:`remove_path`);
* a group is written whole in a hidden sibling of its path (:func:`sibling`) and swapped
  in by :func:`replace_path`, so a run that fails or is killed leaves the previous good
  group at the path; the next run at that path clears what it left (:func:`clear_leftovers`);
* paths are resolved on the driver (:func:`resolve`: absolute, symlinks followed) before
  anything is written, and an output that is, contains or lies inside one of the run's
  inputs is refused (:func:`refuse_overlap`).

This module and the other storage modules (:mod:`blockals.store`,
:mod:`blockals.checkpoint`, :mod:`blockals.modelio`, :mod:`blockals.recstore`,
:mod:`blockals.lock`) import neither Dask nor anything above them.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import uuid
from collections.abc import Iterable, Mapping
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
    "parse_path",
    "parse_storage_options",
    "resolve",
    "refuse_overlap",
    "path_exists",
    "writable_meta",
    "remove_path",
    "blockals_meta",
    "sibling",
    "move_path",
    "replace_path",
    "clear_leftovers",
    "sibling_token",
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


def resolve(path: str | os.PathLike) -> str:
    """The one form of a path the driver uses and hands to workers: a local path absolute
    with its symlinks followed (writing through a link to a store replaces the store at its
    real place, leaving the link valid); a URL normalised, without a trailing slash."""
    path = os.fspath(path)
    if "://" not in path:
        return os.path.realpath(path)
    scheme, _, rest = path.partition("://")
    rest = posixpath.normpath(rest).lstrip("/") if rest.strip("/") else ""
    return f"{scheme.lower()}://{rest}"


def _relation(output: str, source: str) -> str | None:
    """How the resolved ``output`` overlaps the resolved ``source``, in words, or None."""
    if output == source:
        return "is"
    if source.startswith(output.rstrip("/") + "/"):
        return "contains"
    if output.startswith(source.rstrip("/") + "/"):
        return "lies inside"
    return None


def refuse_overlap(outputs: Mapping[str, str], inputs: Mapping[str, str | Iterable[str] | None]) -> None:
    """Refuse, before anything is written, an output that is, contains or lies inside an
    input, or another output (writing it would delete or mix what is read).

    ``outputs`` and ``inputs`` map how the message names each one (``"the train store"``)
    to its resolved path (an input may be several, e.g. a glob's files, or None).
    """
    named = [(name, resolve(path)) for name, path in outputs.items()]
    against = [(name, resolve(p)) for name, paths in inputs.items() if paths is not None
               for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    for i, (out_name, out) in enumerate(named):
        for in_name, inp in against + named[i + 1:]:
            relation = _relation(out, inp)
            if relation is not None:
                raise InputError(f"{out_name} {out} {relation} {in_name} {inp}; write it to a path apart from it.")


def sibling(path: str, tag: str) -> str:
    """A hidden path beside ``path``, named after it and ``tag`` (e.g. ``.m.zarr.save-3f2a``)."""
    parent, _, name = resolve(path).rpartition("/")
    return f"{parent}/.{name}.{tag}"


def sibling_token() -> str:
    """The random part of a sibling's tag, which :func:`clear_leftovers` recognises."""
    return uuid.uuid4().hex[:12]


def filesystem(path: str, storage_options: dict | None):
    """``(fsspec filesystem, path within it)`` of a local path or URL.

    An object store's listings are read afresh: Zarr writes through its own filesystem
    object, so a listing cached here (of a store's parent, say) would hide what it wrote.
    """
    import fsspec

    fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if "://" in path:
        fs.invalidate_cache()
    return fs, p


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
    local disk; a copy and a delete on object stores).

    On object stores the target's root ``zarr.json`` is written first marked incomplete
    and copied last as it is, and the source is removed by :func:`remove_path`: a move cut
    short leaves no group that reads as complete with arrays missing.
    """
    fs, src = filesystem(source, storage_options)
    dst = filesystem(target, storage_options)[1]
    if "://" not in source:
        fs.mv(src, dst, recursive=True)
        return
    # Object stores have no directories: fsspec's recursive mv also asks to copy the prefix
    # itself, an object that does not exist (NoSuchKey). Every object, then the originals.
    src = src.rstrip("/")
    marker = f"{src}/zarr.json"
    files = [f for f in fs.find(src) if f != marker]
    if fs.exists(marker):
        fs.pipe(f"{dst}/zarr.json", _incomplete(fs.cat(marker)))
        files.append(marker)
    for path in files:
        fs.copy(path, dst + path[len(src):])
    remove_path(source, storage_options)


def _incomplete(marker: bytes) -> bytes:
    """A group's ``zarr.json`` with a ``complete`` marker in its ``blockals`` attributes unset."""
    try:
        meta = json.loads(marker)
        blockals = meta["attributes"]["blockals"]
    except (ValueError, KeyError, TypeError):
        return marker
    if isinstance(blockals, dict) and blockals.get("complete"):
        blockals["complete"] = False
    return json.dumps(meta).encode()


def replace_path(staged: str, path: str, storage_options: dict | None = None) -> None:
    """Swap the complete tree at ``staged`` in at ``path``, replacing what is there.

    What was at ``path`` is first moved to a hidden sibling (``.<name>.old-<token>``) and
    removed only once the new tree is in place; should the move in fail, it is moved back.
    A run killed between the two moves leaves the old tree at that sibling, where the next
    run at ``path`` finds it and puts it back (:func:`clear_leftovers`).
    """
    old = sibling(path, f"old-{sibling_token()}")
    if path_exists(path, storage_options):
        move_path(path, old, storage_options)
    try:
        move_path(staged, path, storage_options)
    except BaseException:
        if path_exists(old, storage_options):
            remove_path(path, storage_options)
            move_path(old, path, storage_options)
        raise
    remove_path(old, storage_options)


def _leftovers(path: str, storage_options: dict | None) -> list[str]:
    """The hidden siblings of ``path`` that runs writing it name (``.<name>.<tag>-<token>``,
    or a sibling of one), and the lease files (:mod:`blockals.lock`) taken on them."""
    parent, _, name = resolve(path).rpartition("/")
    pattern = re.compile(rf"\.+{re.escape(name)}(\.[a-z]+-[0-9a-f]{{12}})+(\.lock)?")
    return [p for p in children(parent or "/", storage_options) if pattern.fullmatch(p.rpartition("/")[2])]


def clear_leftovers(path: str, storage_options: dict | None = None) -> None:
    """Remove what runs killed while writing ``path`` left beside it: staged and scratch
    groups, never read as stores, and the lease files taken on them (a split's staged
    stores are written by ingests, which lease them). A complete group a swap cut short
    left at its old-copy sibling is put back first, when ``path`` holds no complete group.

    Only for a caller holding ``path``'s exclusive lease: then no live run writes beside it.
    """
    leftovers = _leftovers(path, storage_options)
    copy = re.compile(rf"\.{re.escape(resolve(path).rpartition('/')[2])}\.old-[0-9a-f]{{12}}")
    old = [p for p in leftovers
           if copy.fullmatch(p.rpartition("/")[2]) and (blockals_meta(p, storage_options) or {}).get("complete")]
    here = blockals_meta(path, storage_options)
    # Nothing at the path, or ours cut short: the old copy is the last good one.
    if old and (not here.get("complete") if here is not None else not path_exists(path, storage_options)):
        remove_path(path, storage_options)
        move_path(old[0], path, storage_options)
        leftovers.remove(old[0])
    for leftover in leftovers:
        remove_path(leftover, storage_options)


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
