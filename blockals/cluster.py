"""The Dask cluster a run uses: connecting or starting one, and sharing its cores.

:class:`connect` gives a client (the one passed, one to a scheduler address, the current
one, or a LocalCluster started for the run); :func:`blas_limits` and
:func:`blas_context` keep Dask threads x BLAS threads within each host's cores;
:func:`cache_bytes` sizes a worker's in-block cache from its memory limit, and
:func:`retain_freed_memory` lets a worker reuse the memory of one solve in the next.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator

import dask
from distributed import Client, get_worker
from distributed.security import Security
from threadpoolctl import threadpool_limits

from blockals.errors import InputError

__all__ = ["connect", "blas_limits", "blas_context", "cache_bytes", "retain_freed_memory", "reusing_memory"]

log = logging.getLogger("blockals")


def cache_bytes() -> int:
    """Bytes of in-blocks this process may keep: Dask config ``blockals.block-cache-bytes``,
    else 1 GiB but at most a quarter of this worker's memory limit.

    The rest of a worker's memory is for the solves; a cache that filled it would push
    the worker past Dask's pause threshold, where it stops taking tasks.
    """
    configured = dask.config.get("blockals.block-cache-bytes", None)
    if configured is not None:
        return int(configured)
    return _quarter_of_memory_limit()


def _quarter_of_memory_limit() -> int:
    """1 GiB, but at most a quarter of this worker's memory limit."""
    try:
        limit = get_worker().memory_manager.memory_limit
    except ValueError:  # not on a worker
        limit = None
    return min(1 << 30, limit // 4) if limit else 1 << 30


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
# Solves run in worker threads, and glibc gives a thread its own arena, whose heaps stop at
# 64 MiB: a larger array (a 1B-rating block's per-rating arrays) is mapped afresh and
# faulted in at every solve whatever the thresholds below. With one arena every thread
# allocates from the main heap, which keeps them. glibc reads this only as a process
# starts, so Dask's nannies set it when they spawn a worker (a default: config wins).
dask.config.update_defaults({"distributed": {"nanny": {"pre-spawn-environ": {"MALLOC_ARENA_MAX": 1}}}})
_retained: int | None = None
# Above this share of its memory limit a worker hands freed memory back (malloc_trim):
# Dask pauses a worker at 80%, and a paused worker runs no task that could free any.
RELEASE_ABOVE = 0.7


@contextlib.contextmanager
def reusing_memory() -> Iterator[None]:
    """Run a task (a ``with`` block, or a function it decorates) with
    :func:`retain_freed_memory` in force, handing freed memory back to the OS after it
    when the process holds more than ``RELEASE_ABOVE`` of its memory limit."""
    retain_freed_memory()
    try:
        yield
    finally:
        if _retained:
            _release_if_crowded()


def _release_if_crowded() -> None:
    try:
        worker = get_worker()
    except ValueError:  # not on a worker
        return
    limit = worker.memory_manager.memory_limit
    if limit and worker.monitor.get_process_memory() > RELEASE_ABOVE * limit:
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def retain_freed_memory() -> int:
    """Let this process's allocator keep freed arrays for reuse, up to :func:`cache_bytes`'s
    share of the worker (1 GiB, at most a quarter of its memory limit); returns those
    bytes, or 0 where the C library is not glibc. Takes effect once per process.

    Each solve allocates its in-block, routed rows and per-rating arrays afresh (about
    200 MB for an item block of 7M ratings). glibc serves arrays above its mmap threshold
    by mapping new pages and unmaps them when they are freed, and Dask's nanny starts
    workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also pins that threshold at
    128 KiB: every solve then faults its memory in a page at a time again, about 0.8 ms
    per MB on the machine of benchmarks/RESULTS.md and a quarter of a 200M-rating
    iteration. With both thresholds raised, freed arrays go back to the heap and the
    next solve reuses them; :func:`reusing_memory` hands them back when the worker nears
    Dask's pause threshold. Arrays above 64 MiB are kept only in a process started with
    ``MALLOC_ARENA_MAX=1``, which importing blockals makes the default for workers that
    Dask's nannies spawn; set it in the environment of workers started otherwise.
    """
    global _retained
    if _retained is None:
        keep = _quarter_of_memory_limit()
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(_M_MMAP_THRESHOLD, keep) and libc.mallopt(_M_TRIM_THRESHOLD, keep)
        except (OSError, AttributeError):  # not glibc
            ok = False
        _retained = keep if ok else 0
    return _retained


def blas_context(limits: dict[str, int]):
    """Cap BLAS threads for this task at this worker's share of its host's cores."""
    try:
        threads = limits.get(get_worker().address, 1)
    except ValueError:  # not on a worker (tests calling tasks directly)
        threads = 1
    return threadpool_limits(limits=threads, user_api="blas")


def blas_limits(client: Client) -> dict[str, int]:
    """BLAS threads per worker so that, on each host, Dask threads x BLAS threads <= cores."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    cores = client.run(lambda: len(os.sched_getaffinity(0)))
    per_host: dict[str, int] = {}
    for info in workers.values():
        per_host[info["host"]] = per_host.get(info["host"], 0) + info["nthreads"]
    return {
        addr: max(1, cores.get(addr, 1) // per_host[info["host"]]) for addr, info in workers.items()
    }


class connect:
    """Context giving a Dask client: the one passed, one to ``scheduler``, the current one, or a LocalCluster.

    A LocalCluster started here has one single-threaded worker process per core (BLAS
    gets one thread each), listens on 127.0.0.1 only, and is closed on exit.

    Parameters
    ----------
    client : distributed.Client, optional
        Used as it is and left open.
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``, ``tls://host:8786``); the
        client made for it is closed on exit.
    dashboard_address : str
        Where a LocalCluster started here serves its dashboard. The dashboard has no
        authentication and shows the cluster's tasks, logs and workers, so the default
        keeps it on loopback; ``"0.0.0.0:8787"`` exposes it to the network.
    security : distributed.security.Security, optional
        TLS for the Dask comm (:meth:`blockals.tls.TLSFiles.security` makes one from
        certificate files): used by a started LocalCluster's scheduler and workers, and by
        the client to ``scheduler``. With it, the current client is not adopted.
    """

    def __init__(
        self,
        client: Client | None = None,
        *,
        scheduler: str | None = None,
        dashboard_address: str = "127.0.0.1:8787",
        security: Security | None = None,
    ) -> None:
        self.client = client
        self.scheduler = scheduler
        self.dashboard_address = dashboard_address
        self.security = security
        self._cluster = None
        self._owned = False

    def __enter__(self) -> Client:
        if self.client is not None:
            return self.client
        if self.scheduler:
            return self._attach()
        if self.security is None:  # a current client may not use TLS: start a cluster that does
            try:
                from distributed import get_client

                return get_client()
            except ValueError:
                pass
        from distributed import LocalCluster

        cores = len(os.sched_getaffinity(0))
        self._cluster = LocalCluster(
            n_workers=cores,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=self.dashboard_address,
            security=self.security,
        )
        self.client = Client(self._cluster, security=self.security)
        self._owned = True
        log.info("started a LocalCluster with %d workers at %s; dashboard: %s", cores, self._cluster.scheduler_address,
                 self.client.dashboard_link)
        return self.client

    def _attach(self) -> Client:
        try:
            self.client = Client(self.scheduler, security=self.security)
        except (OSError, TypeError) as exc:  # TypeError: a tls:// address without a Security
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(
                f"cannot connect to the Dask scheduler at {self.scheduler} ({reason}); check the address and, "
                f"for a tls:// scheduler, the TLS certificate options."
            ) from None
        self._owned = True
        return self.client

    def __exit__(self, *exc: object) -> None:
        if self._owned:
            self.client.close()
            if self._cluster is not None:
                self._cluster.close()
            self.client = self._cluster = None
            self._owned = False
