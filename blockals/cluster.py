"""The Dask cluster a run uses: connecting or starting one, and sharing its cores.

:class:`connect` gives a client (the one passed, one to a scheduler address, the current
one, or a LocalCluster started for the run); :func:`blas_limits` and
:func:`blas_context` keep Dask threads x BLAS threads within each host's cores;
:func:`cache_bytes` sizes a worker's in-block cache from its memory limit, and
:func:`retain_freed_memory` lets a worker reuse the memory of one solve in the next.
:func:`kubernetes_client` starts a DaskCluster on Kubernetes for a run, the one
:func:`kubernetes_cluster_spec` describes (``deploy/kubernetes/daskcluster.yaml``'s).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import socket
import warnings
from collections.abc import Iterator
from typing import Any

import dask
from dask.system import cpu_count
from distributed import Client, get_worker
from distributed.security import Security
from threadpoolctl import ThreadpoolController

from blockals.errors import InputError
from blockals.params import parse_address, parse_dashboard_address

__all__ = ["connect", "free_dashboard_address", "blas_limits", "blas_context", "cache_bytes", "retain_freed_memory",
           "reusing_memory", "kubernetes_cluster_spec", "kubernetes_client"]

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


def _without_nanny() -> bool:
    try:
        return get_worker().nanny is None
    except ValueError:  # not on a worker
        return False


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
    bytes, or 0 where the C library is not glibc or the worker has no nanny (threads in a
    user's process, whose allocator is left as it is). Takes effect once per process.

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
        keep = 0 if _without_nanny() else _quarter_of_memory_limit()
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = keep and libc.mallopt(_M_MMAP_THRESHOLD, keep) and libc.mallopt(_M_TRIM_THRESHOLD, keep)
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
    return _blas_controller().limit(limits=threads, user_api="blas")


@functools.cache
def _blas_controller() -> ThreadpoolController:
    # Finding the loaded BLAS libraries walks the process's shared objects: ~5 ms, 5% of a
    # worker's time at 1M ratings when done for every task.
    return ThreadpoolController()


def blas_limits(client: Client) -> dict[str, int]:
    """BLAS threads per worker so that, on each host, Dask threads x BLAS threads <= cores."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    cores = client.run(cpu_count)  # the CPU affinity and the cgroup quota of a container
    per_host: dict[str, int] = {}
    for info in workers.values():
        per_host[info["host"]] = per_host.get(info["host"], 0) + info["nthreads"]
    return {
        addr: max(1, cores.get(addr, 1) // per_host[info["host"]]) for addr, info in workers.items()
    }


def free_dashboard_address(address: str) -> str:
    """``address`` (``host:port``), or ``host:0`` (a free port) when its port is taken.

    distributed falls back to a free port by itself, but warns on stderr that the port is
    "already in use" as if something were wrong; checking first keeps that from users.
    The link printed afterwards (``client.dashboard_link``) names the port actually served.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) == 0:
        return address
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:  # a host distributed will refuse in its own words
        return address
    for family, kind, proto, _, where in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the dashboard's server binds
            try:
                probe.bind(where)
            except OSError:
                log.info("port %s is in use: the dashboard is served on a free port instead", port)
                return f"{host}:0"
    return address


# Seconds a started LocalCluster's workers get to exit when it closes. distributed gives
# them 4 and then kills them, warning on stderr; a worker process on a busy machine
# (numba, NumPy and Dask to tear down) can take longer without anything being wrong.
WORKER_EXIT_SECONDS = 30


async def _close_workers(cluster, timeout: float) -> None:
    await asyncio.gather(*(worker.close(timeout=timeout) for worker in list(cluster.workers.values())))


# Runs of at most this many ratings get a LocalCluster of threads in this process
# (benchmarks/RESULTS.md, 2026-12-03 night): it starts in a fraction of a second where
# worker processes take seconds, and passes results without serializing them.
IN_PROCESS_RATINGS = 50_000_000


def parse_client(value: Any, name: str = "client") -> Client | str | None:
    """What a run may be given as its cluster: a client, a scheduler's address, or None."""
    if value is None or isinstance(value, Client):
        return value
    if isinstance(value, str):
        return parse_address(value, name)
    raise InputError(f"{name} must be a distributed.Client, a scheduler address such as tcp://host:8786, or None; "
                     f"got {type(value).__name__}.")


class connect:
    """Context giving a Dask client: the one passed, one to ``scheduler``, the current one, or a LocalCluster.

    A LocalCluster started here listens on 127.0.0.1 only and is closed on exit. For a
    run of ``ratings`` up to :data:`IN_PROCESS_RATINGS` (and no TLS) it is one worker of
    one thread per core inside this process; otherwise one single-threaded worker process
    per core. Either way BLAS gets one thread per Dask thread.

    Parameters
    ----------
    client : distributed.Client or str, optional
        Used as it is and left open; an address is taken as ``scheduler``.
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``, ``tls://host:8786``); the
        client made for it is closed on exit.
    ratings : int, optional
        How many ratings the run reads, which chooses the kind of LocalCluster started.
    dashboard_address : str
        Where a LocalCluster started here serves its dashboard; a free port instead when
        that one is taken (``client.dashboard_link`` says which). The dashboard has no
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
        ratings: int | None = None,
        dashboard_address: str = "127.0.0.1:8787",
        security: Security | None = None,
    ) -> None:
        client = parse_client(client)
        if isinstance(client, str):
            client, scheduler = None, client
        self.client = client
        self.scheduler = parse_address(scheduler, "scheduler") if scheduler else None
        self.ratings = ratings
        self.dashboard_address = parse_dashboard_address(dashboard_address, "dashboard_address")
        self.security = security
        self._cluster = None
        self._owned = False
        self._in_process = False

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

        cores = cpu_count()
        small = self.ratings is not None and self.ratings <= IN_PROCESS_RATINGS
        self._in_process = small and self.security is None
        workers, threads = (1, cores) if self._in_process else (cores, 1)
        with warnings.catch_warnings():
            # Taken between free_dashboard_address's probe and the bind: distributed then serves a
            # free port by itself, which the link logged below names; its warning would alarm.
            warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning)
            self._cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=threads,
                processes=not self._in_process,
                host="127.0.0.1",
                # In-process too: Dask's inproc comm would advertise the machine's address.
                **({"protocol": "tcp://"} if self._in_process else {}),
                dashboard_address=free_dashboard_address(self.dashboard_address),
                security=self.security,
            )
        self.client = Client(self._cluster, security=self.security)
        self._owned = True
        kind = f"{cores} threads in this process" if self._in_process else f"{cores} worker processes"
        log.info("started a LocalCluster of %s at %s; dashboard: %s", kind, self._cluster.scheduler_address,
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
                self._cluster.sync(_close_workers, self._cluster, WORKER_EXIT_SECONDS)
                self._cluster.close()
            if self._in_process:  # the worker's in-block cache was this process's: it goes with the worker
                from blockals.store import BLOCK_CACHE

                BLOCK_CACHE.clear()
                self._in_process = False
            self.client = self._cluster = None
            self._owned = False


# Kubernetes: the DaskCluster that ``--cluster kubernetes`` starts. deploy/kubernetes/daskcluster.yaml
# is this spec named "blockals", and the DaskJob's cluster the same under the job's name
# (tests/test_deploy.py holds them equal).

KUBERNETES_NAME = "blockals-run"
"""The name of the DaskCluster a run starts: neither ``blockals`` (daskcluster.yaml's, which
a run would otherwise connect to and shut down) nor ``blockals-pipeline`` (the DaskJob's);
deploy/kubernetes/networkpolicy.yaml has a policy for each of the three."""
SCRATCH = "/tmp"
"""Where every container mounts its pod's emptyDir: the only path it can write, as the root
filesystem is read-only. ``HOME``, ``TMPDIR``, Dask's temporary directory (worker spill
and scratch space) and numba's cache all point there."""
IMAGE_NUMBA_CACHE = "/opt/blockals/numba-cache"
"""``NUMBA_CACHE_DIR`` of deploy/Dockerfile, where its build compiles the solver loops; an
init container copies it to the emptyDir, since numba caches only in a writable directory."""


def kubernetes_image() -> str:
    """The image deploy/Dockerfile builds, tagged with this version of blockals."""
    import blockals

    return f"blockals:{blockals.__version__}"


def kubernetes_cluster_spec(name: str = KUBERNETES_NAME, *, image: str | None = None, n_workers: int = 2) -> dict:
    """The dask-kubernetes ``DaskCluster`` resource ``name``: a scheduler and ``n_workers``
    workers of one Dask thread, running ``image`` (default :func:`kubernetes_image`) as
    user 1000 with a read-only root filesystem, the RuntimeDefault seccomp profile, no
    privilege escalation, no capabilities and no service account token."""
    image = image or kubernetes_image()
    scratch = {"HOME": SCRATCH, "TMPDIR": SCRATCH, "DASK_TEMPORARY_DIRECTORY": SCRATCH,
               "NUMBA_CACHE_DIR": f"{SCRATCH}/numba-cache"}

    def container(name: str, command: list[str], cpu: tuple[str, str], memory: str, **more) -> dict:
        return {"name": name, "image": image, "imagePullPolicy": "IfNotPresent", "command": command, **more,
                "resources": {"requests": {"cpu": cpu[0], "memory": memory}, "limits": {"cpu": cpu[1], "memory": memory}},
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                    "readOnlyRootFilesystem": True},
                "volumeMounts": [{"name": "scratch", "mountPath": SCRATCH}]}

    def pod(containers: list[dict], scratch_size: str, init: list[dict] = ()) -> dict:
        return {"securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "automountServiceAccountToken": False,
                **({"initContainers": list(init)} if init else {}),
                "containers": containers,
                "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": scratch_size}}]}

    secret = [{"secretRef": {"name": "blockals-s3", "optional": True}}]
    dashboard = {"httpGet": {"port": "http-dashboard", "path": "/health"}}
    worker = container(
        "worker",
        # One Dask thread per worker: BLAS gets the container's other cores.
        ["dask", "worker", "--name", "$(DASK_WORKER_NAME)", "--nthreads", "1", "--memory-limit", "4GiB",
         "--dashboard", "--dashboard-address", "8788"],
        ("2", "2"), "4Gi", ports=[{"name": "http-dashboard", "containerPort": 8788, "protocol": "TCP"}],
        env=[{"name": k, "value": v} for k, v in scratch.items()], envFrom=secret)
    scheduler = container(
        "scheduler", ["dask", "scheduler"], ("500m", "1"), "1Gi",
        ports=[{"name": "tcp-comm", "containerPort": 8786, "protocol": "TCP"},
               {"name": "http-dashboard", "containerPort": 8787, "protocol": "TCP"}],
        env=[{"name": k, "value": v} for k, v in scratch.items()],
        readinessProbe={**dashboard, "initialDelaySeconds": 5, "periodSeconds": 10},
        livenessProbe={**dashboard, "initialDelaySeconds": 15, "periodSeconds": 20})
    return {
        "apiVersion": "kubernetes.dask.org/v1",
        "kind": "DaskCluster",
        "metadata": {"name": name},
        "spec": {
            "worker": {"replicas": n_workers, "spec": pod([worker], "8Gi", [_numba_cache_container(image)])},
            "scheduler": {
                "spec": pod([scheduler], "1Gi"),
                "service": {"type": "ClusterIP",
                            "selector": {"dask.org/cluster-name": name, "dask.org/component": "scheduler"},
                            "ports": [{"name": "tcp-comm", "protocol": "TCP", "port": 8786, "targetPort": "tcp-comm"},
                                      {"name": "http-dashboard", "protocol": "TCP", "port": 8787,
                                       "targetPort": "http-dashboard"}]},
            },
        },
    }


def _numba_cache_container(image: str) -> dict:
    """The init container that copies the image's compiled solver loops into the emptyDir,
    so that workers load them instead of compiling (a minute of CPU) at their first task."""
    copy = f"import shutil; shutil.copytree({IMAGE_NUMBA_CACHE!r}, {SCRATCH + '/numba-cache'!r}, dirs_exist_ok=True)"
    return {"name": "numba-cache", "image": image, "imagePullPolicy": "IfNotPresent", "command": ["python", "-c", copy],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "128Mi"}},
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                "readOnlyRootFilesystem": True},
            "volumeMounts": [{"name": "scratch", "mountPath": SCRATCH}]}


@contextlib.contextmanager
def kubernetes_client(*, n_workers: int = 2, image: str | None = None, name: str = KUBERNETES_NAME) -> Iterator[Client]:
    """A client of the DaskCluster :func:`kubernetes_cluster_spec` describes, created through
    the dask-kubernetes operator (``pip install 'blockals[kubernetes]'``, kubectl access) and
    deleted on exit. A cluster of that name already there is refused, not joined: it is
    another run's, or one left by a run that did not finish."""
    try:
        from dask_kubernetes.operator import KubeCluster
        from dask_kubernetes.operator.kubecluster.kubecluster import CreateMode
    except ImportError as exc:
        raise InputError("--cluster kubernetes needs dask-kubernetes: pip install 'blockals[kubernetes]'.") from exc
    spec = kubernetes_cluster_spec(name, image=image, n_workers=n_workers)
    try:
        cluster = KubeCluster(custom_cluster_spec=spec, create_mode=CreateMode.CREATE_ONLY, shutdown_on_close=True)
    except ValueError as exc:
        if "already exists" not in str(exc):
            raise
        raise InputError(f"a DaskCluster named {name} already exists (another run's, or one left by a run that "
                         f"did not finish); remove it with: kubectl delete daskcluster {name}") from None
    try:
        with Client(cluster) as client:
            log.info("started the Kubernetes DaskCluster %s: %d workers of %s", name, n_workers, image or kubernetes_image())
            yield client
    finally:
        cluster.close()
