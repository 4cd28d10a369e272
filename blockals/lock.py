"""Leases: shared for readers, exclusive for writers, on a store, model or checkpoint path.

Every entry point that writes a path (ingest, split, a training's model and checkpoint,
``recommend_all`` to an output, the pipeline's data directory) holds an *exclusive* lease on
it, and every one that reads a store (a training, ``split``, ``evaluate``, ``recommend_all``,
``search``) a *shared* one. Shared holders coexist; an exclusive holder excludes everyone.
A refusal is one sentence naming the holder(s) (process, host, command, since) rather than
a store rewritten under a reader, or two writers interleaving their blocks.

* Local paths: one lock file, ``<path>.lock`` beside the path (beside, not inside: writing
  a Zarr group with mode ``"w"`` empties its directory), held with ``flock`` ``LOCK_SH`` or
  ``LOCK_EX`` for as long as the lease is. The kernel drops a ``flock`` when its holder
  exits, however it exits (``kill -9`` included), so a dead holder's lease is free at once,
  while a live holder can never be overridden.

  The file is a log of JSON lines naming the holders: a writer empties it and writes its
  own line; each reader appends its line (``O_APPEND``: one write, never interleaved) and,
  on release, a line ``{"released": <token>}``. The holders named in a refusal are the
  lines not released, less those of processes on this host that are gone. One file rather
  than a file per holder, because the lock itself must be one file for ``flock`` to
  arbitrate readers against writers, and a second file per holder would be a second thing
  to leave behind and clean up.

  The last holder out removes the file, while it still holds it exclusively: a writer on
  release, a reader only when a non-blocking switch to ``LOCK_EX`` succeeds (no one else
  holds it; when the switch fails, Linux has already dropped the reader's lock, which is
  what releasing wants). Whoever opened the file before it was removed finds, after
  locking, that the path names another file (or none), and starts over: so nobody ever
  holds a lock on a file nobody else will look at. A removal is never needed for
  correctness; a leftover file (of a killed holder) means nothing by itself.
* fsspec URLs (``s3://...``): a writer creates ``<path>.lock/exclusive`` by an exclusive
  write (``If-None-Match`` on S3), a reader ``<path>.lock/shared-<token>``; each then
  looks for the other kind, and withdraws its own object and is refused if it finds one.
  Both create before they look, so of a reader and a writer that race, at least one sees
  the other (one or both are refused, never both admitted). Objects are deleted on
  release. Nothing there tells a dead holder from a live one, so the lease of a killed
  driver stays until it is broken (``break_lease=True``, ``--break-lease``, after checking
  that the holder named is gone): a writer breaking clears every holder, a reader the
  writer.

A reader of a store where nothing may be written beside it (a read-only mount, read-only
credentials) locks the lease file if there is one, else reads unleased: no blockals writer
can take the path there either, and a training checks the store's id every iteration.

A thread holding a lease may take it again (``blockals train`` holds the model's lease
from start to end, and :meth:`blockals.ALS.save` takes it too), exclusively or shared if
it holds it exclusively; other threads and processes may not share an exclusive lease.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from blockals.errors import LeaseError, StoreError
from blockals.formats import resolve

__all__ = ["Holder", "Lease", "holding"]

_local = threading.local()
# Why a lease file cannot be created: nothing beside the path may be written.
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
# A lock held by nobody we can name is a holder between locking and writing its line, or
# a reader between its release line and its unlock: worth a short wait, not a refusal.
UNNAMED_RETRIES, UNNAMED_WAIT = 20, 0.05


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as written in its file."""

    host: str
    pid: int
    since: str
    command: str
    token: str
    shared: bool = False

    @classmethod
    def current(cls, shared: bool = False) -> Holder:
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
        return cls(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S %Z"), command[:200],
                   uuid.uuid4().hex, shared)

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """The holder one record names; None while its holder is still writing it."""
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def record(self) -> bytes:
        return json.dumps(asdict(self)).encode() + b"\n"

    def alive(self) -> bool:
        """False only for a process of this host that is gone (others cannot be checked)."""
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}, running {self.command!r} since {self.since}"


def holders(log: bytes) -> list[Holder]:
    """The live holders a local lock file names: lines not followed by their release."""
    named: dict[str, Holder] = {}
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # a line being written
            continue
        if isinstance(entry, dict) and "released" in entry:
            named.pop(entry["released"], None)
        elif (holder := Holder.parse(line)) is not None:
            named[holder.token] = holder
    return [h for h in named.values() if h.alive()]


@contextlib.contextmanager
def holding(*leases: Lease | None) -> Iterator[None]:
    """Hold every lease given (None: none there), taken in order; those taken are released
    if a later one is refused."""
    with contextlib.ExitStack() as stack:
        for lease in leases:
            if lease is not None:
                stack.enter_context(lease)
        yield


def _held() -> dict[str, list]:
    """Leases this thread holds: lock path -> [the Lease that took it, times taken]."""
    if not hasattr(_local, "held"):
        _local.held = {}
    return _local.held


class Lease:
    """The right to write (exclusive) or read (shared) one path; a context manager.

    Parameters
    ----------
    path : str
        The store, model or checkpoint path to guard; the lease file is ``<path>.lock``,
        beside the path resolved (:func:`blockals.formats.resolve`), so a symlink to a store
        or model and its target share one lease.
    what : str
        What the path holds (``"ratings store"``, ``"model"``, ``"checkpoint"``), for the
        refusal message.
    storage_options : dict, optional
        fsspec options of a remote path.
    break_lease : bool
        Remote paths: clear the lease holders that would refuse this one (only for holders
        known to be dead). Local leases of dead holders free themselves, so it changes
        nothing there.
    shared : bool
        Take the lease for reading: other readers may hold it at the same time, no writer.
    breakable : bool
        Whether the caller offers ``break_lease`` (``--break-lease``), for the refusal's advice.

    Raises
    ------
    LeaseError
        On entry, when another process or thread holds the lease in a conflicting mode.
    """

    def __init__(self, path: str, what: str, storage_options: dict | None = None, break_lease: bool = False,
                 shared: bool = False, breakable: bool = True) -> None:
        self.path = resolve(path)  # one lease per store, however it is named (a symlink, a relative path)
        self.what = what
        self.storage_options = storage_options
        self.break_lease = break_lease
        self.shared = shared
        self.breakable = breakable
        self.remote = "://" in self.path
        self.lock_path = self.path + ".lock"
        self.holder: Holder | None = None
        self._fd: int | None = None
        self._writable = True
        self._object: str | None = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _refuse(self, others: list[Holder]) -> LeaseError:
        reading = bool(others) and all(h.shared for h in others)
        if not others:
            doing, who = "in use by another process", "which has not named itself yet"
        elif reading:
            doing = "being read by another process" if len(others) == 1 else f"being read by {len(others)} other processes"
            who = "; ".join(h.describe() for h in others)
        else:
            doing, who = "being written by another process", "; ".join(h.describe() for h in others)
        them = "it" if len(others) < 2 else "them"
        if self.remote:
            fix = (f"if {'that process is' if len(others) < 2 else 'those processes are'} dead, "
                   + (f"pass break_lease=True (--break-lease) or delete {self.lock_path}" if self.breakable
                      else f"delete {self.lock_path}") + f", else wait for {them} to finish")
        else:
            fix = f"wait for {them} to finish" + ("" if self.shared else " or write to another path")
        return LeaseError(f"{self.what} {self.path} is {doing} ({who}); {fix}.")

    def acquire(self) -> None:
        held = _held()
        if self.lock_path in held:
            entry = held[self.lock_path]
            if entry[0].shared and not self.shared:
                raise LeaseError(f"{self.what} {self.path} is being read by this same call; "
                                 f"write to another path than the one read.")
            entry[1] += 1
            return
        self.holder = Holder.current(self.shared)
        if self.remote:
            self._acquire_remote()
        else:
            self._acquire_local()
        held[self.lock_path] = [self, 1]

    def release(self) -> None:
        held = _held()
        entry = held.get(self.lock_path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1]:
            return
        del held[self.lock_path]
        owner = entry[0]  # the Lease that took it holds the file
        if owner.remote:
            owner._release_remote()
        else:
            owner._release_local()

    # -- local: flock, released by the kernel when the holder dies ------------------------
    def _acquire_local(self) -> None:
        import fcntl

        os.makedirs(os.path.dirname(self.lock_path), exist_ok=True)
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        tries = 0
        while True:
            fd = self._open_local()
            if fd is None:  # a reader of a store where nothing can be written: unleased
                return
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                others = holders(_read_all(fd))
                os.close(fd)
                if others or tries >= UNNAMED_RETRIES:
                    raise self._refuse(others) from None
                tries += 1
                time.sleep(UNNAMED_WAIT)
                continue
            # The last holder out removes the file: if it did so between our open and our
            # flock, we locked a file nobody else will look at; start over.
            if _current(fd, self.lock_path):
                break
            os.close(fd)
        if not self.shared:
            os.ftruncate(fd, 0)  # the lines of readers gone, and of a dead writer
        if self._writable:
            os.write(fd, self.holder.record())
        self._fd = fd

    def _open_local(self) -> int | None:
        """The lock file, created if need be. A reader where nothing can be written beside
        the store still locks an existing file (``flock`` needs no write access) but cannot
        name itself in it, and goes unleased where there is none: no blockals writer can
        take the path either, and a training still checks the store's id every iteration."""
        self._writable = True
        try:
            return os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            if exc.errno not in UNWRITABLE:
                raise
            if not self.shared:
                raise StoreError(f"{self.what} {self.path} cannot be written: its lease {self.lock_path} cannot be "
                                 f"created ({exc.strerror}).") from None
        self._writable = False
        try:
            return os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return None

    def _release_local(self) -> None:
        import fcntl

        fd, self._fd = self._fd, None
        if fd is None:  # unleased (see _open_local)
            return
        if not self._writable:  # nothing to record, nothing it could remove
            os.close(fd)
            return
        if self.shared:
            os.write(fd, json.dumps({"released": self.holder.token}).encode() + b"\n")
            try:  # the last reader out? (on failure Linux has dropped our lock already)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return
        # Unlink while still locked exclusively, so nobody can lock this file after us and
        # believe it current; not when the path names another file by now (the directory
        # holding it was moved away: a checkpoint's, inside a store replaced under a training).
        if _current(fd, self.lock_path):
            os.unlink(self.lock_path)
        os.close(fd)

    # -- remote: per-holder objects, created then checked, deleted on release -------------
    def _fs(self):
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.lock_path, **(self.storage_options or {}))
        return fs, root.rstrip("/")

    def _acquire_remote(self) -> None:
        fs, root = self._fs()
        writer = f"{root}/exclusive"
        if self.break_lease:
            for name in [writer] if self.shared else _listing(fs, root):
                _remove(fs, name)
        if self.shared:
            mine = f"{root}/shared-{self.holder.token}"
            try:
                fs.pipe_file(mine, self.holder.record())
            except PermissionError:  # read-only credentials: unleased, as in _open_local
                return
            found, holder = _remote_holder(fs, writer)
            if found:
                _remove(fs, mine)
                raise self._refuse([holder] if holder else [])
            self._object = mine
            return
        try:
            fs.pipe_file(writer, self.holder.record(), mode="create")
        except PermissionError as exc:
            raise StoreError(f"{self.what} {self.path} cannot be written: its lease {self.lock_path} cannot be "
                             f"created ({exc}).") from None
        except FileExistsError:
            holder = _remote_holder(fs, writer)[1]
            raise self._refuse([holder] if holder else []) from None
        readers = [name for name in _listing(fs, root) if name.rpartition("/")[2].startswith("shared-")]
        if readers:
            _remove(fs, writer)
            named = [h for h in (_remote_holder(fs, name)[1] for name in readers) if h is not None]
            raise self._refuse(named)
        self._object = writer

    def _release_remote(self) -> None:
        if self._object is None:  # unleased (read-only credentials)
            return
        fs, _ = self._fs()
        # Only our own object: a writer's broken and retaken lease belongs to someone else now.
        found, holder = _remote_holder(fs, self._object)
        if found and holder is not None and holder.token == self.holder.token:
            _remove(fs, self._object)


def _read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 16, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _current(fd: int, path: str) -> bool:
    """Whether ``fd`` is the file ``path`` names now."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _listing(fs, root: str) -> list[str]:
    """The objects under a remote lock prefix, read afresh (listings are cached)."""
    fs.invalidate_cache(root)
    try:
        return [name.rstrip("/") for name in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []


def _remote_holder(fs, name: str) -> tuple[bool, Holder | None]:
    """Whether the object exists, and the holder it names (None while unreadable)."""
    try:
        return True, Holder.parse(fs.cat_file(name))
    except FileNotFoundError:
        return False, None


def _remove(fs, name: str) -> None:
    try:
        fs.rm(name)
    except FileNotFoundError:
        pass
