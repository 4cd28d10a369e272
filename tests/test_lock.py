"""Local leases: shared readers coexist, a writer excludes everyone, in threads and in
other processes, and a holder killed with SIGKILL frees its lease at once. (Leases on S3
are in tests/test_s3.py; leases taken by ingest, split, training, recommend_all and the
pipeline in the tests of those modules.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from blockals.errors import LeaseError
from blockals.lock import Lease


def _try(path: str, shared: bool) -> str | None:
    """Take and release the lease in another thread: None if admitted, else the refusal."""
    outcome: list[str | None] = []

    def attempt():
        try:
            with Lease(path, "ratings store", shared=shared):
                outcome.append(None)
        except LeaseError as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join()
    return outcome[0]


def _holder(path: str, shared: bool) -> subprocess.Popen:
    """A Python process holding the lease until its stdin closes."""
    code = (f"import sys\nfrom blockals.lock import Lease\n"
            f"Lease({path!r}, 'ratings store', shared={shared}).acquire()\nprint('held', flush=True)\nsys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def _end(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


def test_readers_share_a_lease_and_a_writer_is_refused_naming_them(tmp_path):
    path = str(tmp_path / "r.zarr")
    me = f"process {os.getpid()} on "
    with Lease(path, "ratings store", shared=True):
        assert _try(path, shared=True) is None
        with Lease(path, "ratings store", shared=True):  # the same thread again
            pass
        refused = _try(path, shared=False)
        assert refused.startswith(f"ratings store {path} is being read by another process ({me}")
        assert refused.endswith("; wait for it to finish or write to another path.")
        assert (tmp_path / "r.zarr.lock").exists()
    assert not (tmp_path / "r.zarr.lock").exists()  # the last reader out removes the file
    assert _try(path, shared=False) is None


def test_a_writer_excludes_readers_and_writers(tmp_path):
    path = str(tmp_path / "r.zarr")
    with Lease(path, "ratings store"):
        with Lease(path, "ratings store", shared=True):  # a writer may read what it writes
            pass
        for shared in (True, False):
            refused = _try(path, shared)
            assert refused.startswith(f"ratings store {path} is being written by another process (process {os.getpid()} ")
    assert _try(path, shared=True) is None


def test_a_reader_may_not_turn_writer_in_the_same_thread(tmp_path):
    path = str(tmp_path / "r.zarr")
    with Lease(path, "ratings store", shared=True):
        with pytest.raises(LeaseError, match="is being read by this same call"):
            Lease(path, "ratings store").acquire()
    assert _try(path, shared=False) is None


def test_leases_across_processes_both_ways(tmp_path):
    path = str(tmp_path / "r.zarr")
    readers = [_holder(path, shared=True) for _ in range(2)]
    try:
        refused = _try(path, shared=False)
        assert "is being read by 2 other processes (" in refused
        assert all(f"process {r.pid} on " in refused for r in readers)
        assert _try(path, shared=True) is None
        _end(readers.pop())
        # The reader gone is no longer named; the one left still is.
        refused = _try(path, shared=False)
        assert "is being read by another process (" in refused and f"process {readers[0].pid} " in refused
    finally:
        for r in readers:
            _end(r)
    writer = _holder(path, shared=False)
    try:
        for shared in (True, False):
            assert f"is being written by another process (process {writer.pid} on " in _try(path, shared)
    finally:
        _end(writer)
    assert _try(path, shared=False) is None and not (tmp_path / "r.zarr.lock").exists()


@pytest.mark.parametrize("shared", [False, True], ids=["writer", "reader"])
def test_a_holder_killed_with_sigkill_frees_the_lease_at_once(tmp_path, shared):
    path = str(tmp_path / "r.zarr")
    holder = _holder(path, shared)
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=60) == -signal.SIGKILL
    assert (tmp_path / "r.zarr.lock").exists()  # left behind, but free
    assert _try(path, shared=False) is None
    assert _try(path, shared=True) is None
