"""Leases: one writer at a time for a model or a checkpoint path.

A lease is a small JSON file beside the path it guards, ``<path>.lock`` (beside, not
inside: writing a Zarr group with mode ``"w"`` empties its directory), naming its holder:
host, process id, start time and command. Taking it is atomic, and a second writer is
refused with one sentence naming the holder rather than left to interleave its blocks
with the first one's.

* Local paths: the file is held with ``flock`` for as long as the lease is. The kernel
  drops that lock when its holder exits, however it exits (``kill -9`` included), so a
  lease left by a dead training is free again at once, while a live holder can never be
  overridden. The file is removed on release; a leftover one means nothing by itself.
* fsspec URLs (``s3://...``): the file is created by an exclusive write (``If-None-Match``
  on S3) and deleted on release. Nothing there tells a dead holder from a live one, so a
  lease left by a killed driver stays until it is broken with ``break_lease=True``
  (``--break-lease``), after checking that the holder it names is gone.

A thread holding a lease may take it again (``blockals train`` holds the model's lease
from start to end, and :meth:`blockals.ALS.save` takes it too); other threads and
processes may not.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from blockals.errors import LeaseError
from blockals.formats import resolve

__all__ = ["Holder", "Lease"]

_local = threading.local()


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as written in its file."""

    host: str
    pid: int
    since: str
    command: str
    token: str

    @classmethod
    def current(cls) -> Holder:
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
        return cls(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S %Z"), command[:200],
                   uuid.uuid4().hex)

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """The holder a lease file names; None while its holder is still writing it."""
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}, running {self.command!r} since {self.since}"


def _held() -> dict[str, list]:
    """Leases this thread holds: lock path -> [the Lease that took it, times taken]."""
    if not hasattr(_local, "held"):
        _local.held = {}
    return _local.held


class Lease:
    """The exclusive right to write one model or checkpoint path; a context manager.

    Parameters
    ----------
    path : str
        The model or checkpoint path to guard; the lease file is ``<path>.lock``, beside
        the path resolved (:func:`blockals.formats.resolve`), so a symlink to a model and
        its target share one lease.
    what : str
        What the path holds (``"model"``, ``"checkpoint"``), for the refusal message.
    storage_options : dict, optional
        fsspec options of a remote path.
    break_lease : bool
        Remote paths: replace a lease another holder left (only for a holder known to be
        dead). Local leases of dead holders free themselves, so it changes nothing there.

    Raises
    ------
    LeaseError
        On entry, when another process or thread holds the lease.
    """

    def __init__(self, path: str, what: str, storage_options: dict | None = None, break_lease: bool = False) -> None:
        self.path = resolve(path)  # one lease per store, however it is named (a symlink, a relative path)
        self.what = what
        self.storage_options = storage_options
        self.break_lease = break_lease
        self.remote = "://" in self.path
        self.lock_path = self.path + ".lock"
        self.holder: Holder | None = None
        self._fd: int | None = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _refuse(self, holder: Holder | None) -> LeaseError:
        who = holder.describe() if holder else "another process"
        fix = (f"if that process is dead, pass break_lease=True (--break-lease) or delete {self.lock_path}"
               if self.remote else "wait for it to finish or write to another path")
        return LeaseError(f"{self.what} {self.path} is being written by another training ({who}); {fix}.")

    def acquire(self) -> None:
        held = _held()
        if self.lock_path in held:
            held[self.lock_path][1] += 1
            return
        self.holder = Holder.current()
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
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = Holder.parse(os.read(fd, 1 << 16))
                os.close(fd)
                raise self._refuse(holder) from None
            # The previous holder removes the file on release: if it did so between our
            # open and our flock, we locked a file nobody else will look at; start over.
            try:
                current = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(asdict(self.holder)).encode())
        self._fd = fd

    def _release_local(self) -> None:
        # Unlink while still locked, so nobody can lock this file after us and believe it current.
        os.unlink(self.lock_path)
        os.close(self._fd)
        self._fd = None

    # -- remote: exclusive create, deleted on release -------------------------------------
    def _fs(self):
        import fsspec

        return fsspec.core.url_to_fs(self.lock_path, **(self.storage_options or {}))

    def _acquire_remote(self) -> None:
        fs, p = self._fs()
        if self.break_lease and fs.exists(p):
            fs.rm(p)
        try:
            fs.pipe_file(p, json.dumps(asdict(self.holder)).encode(), mode="create")
        except FileExistsError:
            try:
                holder = Holder.parse(fs.cat_file(p))
            except FileNotFoundError:  # released meanwhile: still refuse, as it was held when we tried
                holder = None
            raise self._refuse(holder) from None

    def _release_remote(self) -> None:
        fs, p = self._fs()
        try:
            holder = Holder.parse(fs.cat_file(p))
        except FileNotFoundError:
            return
        # Only our own lease: a broken and retaken one belongs to someone else now.
        if holder is not None and holder.token == self.holder.token:
            fs.rm(p)
