"""Shared fixtures: real Dask clusters and an S3 API on 127.0.0.1, started once per session."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

_clusters: dict[int, tuple[LocalCluster, Client]] = {}


def cluster_client(n_workers: int) -> Client:
    """A client of a LocalCluster with ``n_workers`` single-threaded worker processes."""
    if n_workers not in _clusters:
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            memory_limit="2GiB",
        )
        _clusters[n_workers] = (cluster, Client(cluster, set_as_default=False))
    return _clusters[n_workers][1]


def run_twice_at_once(command: list[str], lease: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Start ``command``; once it holds the lease file ``lease``, freeze it (SIGSTOP) and run
    ``command`` again to its end; then let the first finish, which must succeed. Returns
    the second run."""
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while f'"pid": {first.pid}' not in (lease.read_text() if lease.exists() else ""):
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else "slow"
        time.sleep(0.005)
    os.kill(first.pid, signal.SIGSTOP)  # frozen while it holds the lease
    try:
        second = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    second.first_pid = first.pid
    return second


@contextlib.contextmanager
def dask_processes(folder: Path, n_workers: int, worker_options: tuple[str, ...] = (),
                   cwd: Path | None = None) -> Iterator[Client]:
    """A real ``dask scheduler`` and ``n_workers`` single-threaded ``dask worker`` processes
    on 127.0.0.1 (started in ``cwd``), as on Kubernetes; a client of them. Every process is
    stopped on exit, killed if it will not stop."""
    scheduler_file = folder / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    deadline = time.monotonic() + 60
    while not scheduler_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    for _ in range(n_workers):
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                       str(scheduler_file), "--nworkers", "1", "--nthreads", "1", *worker_options,
                                       "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env=env, cwd=cwd))
    client = Client(scheduler_file=str(scheduler_file), set_as_default=False)
    try:
        client.wait_for_workers(n_workers, timeout=60)
        yield client
    finally:
        client.close()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="session", autouse=True)
def _compiled_kernels():
    """Compile the solver loops once, into numba's cache, before any worker or CLI process
    needs them: otherwise every process started before the cache exists compiles them."""
    from blockals.kernels import precompile

    precompile()


@pytest.fixture(scope="session", autouse=True)
def _close_clusters():
    yield
    for cluster, client in _clusters.values():
        client.close()
        cluster.close()
    _clusters.clear()


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}worker")
def client(request) -> Client:
    """Parametrizes a test over one and two worker processes."""
    return cluster_client(request.param)


@pytest.fixture
def client2() -> Client:
    """Two worker processes, for tests that need only one cluster shape."""
    return cluster_client(2)


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """The URL of an S3 API (moto's server) on 127.0.0.1, for the session; any key is accepted."""
    moto_server = pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (test extra)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
