"""The ALS iteration as Dask futures: route, solve, loss, checkpoint.

One iteration is two half-steps, items first as in Spark. A half-step toward side ``S``
(say users) is, for every user block ``b``:

* ``blockals-route-users-<it>-<j>-<b>``: on the worker holding item block ``j``, cut the
  message ``Y_j[out(j -> b)]`` (skipped when ``b`` rates nothing in ``j``);
* ``blockals-solve-users-<it>-<b>``: read ``b``'s in-block from the store (or the
  worker's block cache), concatenate its messages and solve all its rows
  (:mod:`blockals.kernels`).

After the user half-step, ``blockals-loss-<it>-<b>`` tasks evaluate the objective with the
messages the solve used, and ``blockals-checkpoint-<side>-<it>-<b>`` tasks write the
factor blocks before the driver commits the iteration. Only the current iteration's
futures are held, so the graph never grows across iterations. Keys end in a run id, so
two trainings on one cluster never share a key.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed import Client, Future, get_worker

from blockals import kernels
from blockals.checkpoint import Checkpoint, Committed, write_block
from blockals.config import ALSConfig
from blockals.store import RatingStore, Side, StoreRef, load_inblock, load_rows, other_side

__all__ = ["Engine", "FitResult"]

log = logging.getLogger("blockals")


# -- tasks (module level so workers import rather than unpickle them) -------------


def blas_context(limits: dict[str, int]):
    """Cap BLAS threads for this task at this worker's share of its host's cores."""
    from threadpoolctl import threadpool_limits

    try:
        threads = limits.get(get_worker().address, 1)
    except ValueError:  # not on a worker (tests calling tasks directly)
        threads = 1
    return threadpool_limits(limits=threads, user_api="blas")


def _init_task(ref: StoreRef, side: Side, block: int, config: ALSConfig) -> np.ndarray:
    return kernels.init_factors(load_rows(ref, side, block), config.rank, config.seed, side, config.dtype)


def _read_checkpoint_task(ckpt: Checkpoint, slot: int, side: Side, block: int) -> np.ndarray:
    return ckpt.read_block(slot, side, block)


def _route_task(ref: StoreRef, dst_side: Side, dst_block: int, src_block: int, factors: np.ndarray) -> np.ndarray:
    return factors[load_inblock(ref, dst_side, dst_block).out_block(src_block)]


def _solve_task(
    ref: StoreRef, side: Side, block: int, config: ALSConfig, limits: dict[str, int], *messages: np.ndarray
) -> np.ndarray:
    inblock = load_inblock(ref, side, block)
    Y = _concat(messages, config)
    with blas_context(limits):
        return kernels.solve_explicit(inblock, Y, config.reg, config.reg_scaling)


def _loss_task(
    ref: StoreRef, side: Side, block: int, config: ALSConfig, X: np.ndarray, *messages: np.ndarray
) -> dict[str, float]:
    inblock = load_inblock(ref, side, block)
    Y = _concat(messages, config)
    return {
        "sse": kernels.squared_error(inblock, X, Y),
        "reg": kernels.regularization(X, inblock.counts, config.reg_scaling),
    }


def _reg_task(ref: StoreRef, side: Side, block: int, config: ALSConfig, X: np.ndarray) -> dict[str, float]:
    inblock = load_inblock(ref, side, block)
    return {"sse": 0.0, "reg": kernels.regularization(X, inblock.counts, config.reg_scaling)}


def _concat(messages: tuple[np.ndarray, ...], config: ALSConfig) -> np.ndarray:
    if not messages:
        return np.zeros((0, config.rank), dtype=config.dtype)
    return np.concatenate(messages) if len(messages) > 1 else messages[0]


# -- driver -------------------------------------------------------------------------


@dataclass
class FitResult:
    """Factor blocks (as NumPy arrays) and the history of a finished run."""

    blocks: dict[Side, list[np.ndarray]]
    history: list[dict[str, Any]] = field(default_factory=list)


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


class Engine:
    """Runs ALS iterations for one store and configuration on a Dask client."""

    def __init__(
        self,
        client: Client,
        store: RatingStore,
        config: ALSConfig,
        checkpoint: Checkpoint | None = None,
        checkpoint_interval: int = 1,
        on_iteration: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.ref = store.ref
        self.config = config
        self.checkpoint = checkpoint
        self.checkpoint_interval = checkpoint_interval
        self.on_iteration = on_iteration
        self.run_id = uuid.uuid4().hex[:8]
        self.limits = blas_limits(client)

    def _key(self, *parts: object) -> str:
        return "blockals-" + "-".join(map(str, parts)) + f"-{self.run_id}"

    def _submit(self, fn: Callable, *args: Any, key: str) -> Future:
        return self.client.submit(fn, *args, key=key, pure=False)

    def bytes_routed(self) -> int:
        """Bytes of factor rows one iteration ships between blocks."""
        rows = sum(int(self.store.message_rows(side).sum()) for side in ("users", "items"))
        return rows * self.config.rank * np.dtype(self.config.dtype).itemsize

    def _start(self, resume: bool) -> tuple[list[Future], Committed | None]:
        """User factor futures to start from: a committed checkpoint's, or fresh ones."""
        committed = None
        if self.checkpoint is not None:
            committed = self.checkpoint.load() if resume else None
            if committed is None:
                self.checkpoint.start()
        if committed is not None:
            log.info("resuming from iteration %d of checkpoint %s", committed.iteration, self.checkpoint.path)
            return self._read_checkpoint(committed.iteration, committed.slot, "users"), committed
        return [
            self._submit(_init_task, self.ref, "users", b, self.config, key=self._key("init", "users", b))
            for b in range(self.store.n_user_blocks)
        ], None

    def _read_checkpoint(self, it: int, slot: int, side: Side) -> list[Future]:
        return [
            self._submit(_read_checkpoint_task, self.checkpoint, slot, side, b, key=self._key("restart", side, it, b))
            for b in range(self.store.n_blocks(side))
        ]

    def _half_step(self, it: int, dst: Side, src_factors: list[Future]) -> tuple[list[Future], list[list[Future]]]:
        rows = self.store.message_rows(dst)
        solved, messages = [], []
        for b in range(self.store.n_blocks(dst)):
            msgs = [
                self._submit(_route_task, self.ref, dst, b, j, src_factors[j], key=self._key("route", dst, it, j, b))
                for j in range(len(src_factors))
                if rows[j, b]
            ]
            solved.append(
                self._submit(_solve_task, self.ref, dst, b, self.config, self.limits, *msgs, key=self._key("solve", dst, it, b))
            )
            messages.append(msgs)
        return solved, messages

    def _write_checkpoint(self, it: int, X: list[Future], Y: list[Future], history: list[dict]) -> None:
        slot = it % 2
        ckpt = self.checkpoint
        writes = [
            self._submit(write_block, ckpt.path, ckpt.storage_options, slot, side, b, f, key=self._key("checkpoint", side, it, b))
            for side, futures in (("users", X), ("items", Y))
            for b, f in enumerate(futures)
        ]
        self.client.gather(writes)  # waits, and raises if a write failed
        ckpt.commit(it, slot, history)

    def run(self, max_iter: int, resume: bool = False) -> FitResult:
        X, committed = self._start(resume)
        history = list(committed.history) if committed else []
        first = committed.iteration + 1 if committed else 1
        Y: list[Future] = []
        if committed is not None and first > max_iter:
            Y = self._read_checkpoint(committed.iteration, committed.slot, "items")
        nnz = self.store.nnz
        for it in range(first, max_iter + 1):
            t0 = time.perf_counter()
            Y, _ = self._half_step(it, "items", X)
            X, messages = self._half_step(it, "users", Y)
            terms = [
                self._submit(_loss_task, self.ref, "users", b, self.config, X[b], *messages[b], key=self._key("loss", "users", it, b))
                for b in range(len(X))
            ] + [
                self._submit(_reg_task, self.ref, "items", j, self.config, Y[j], key=self._key("loss", "items", it, j))
                for j in range(len(Y))
            ]
            parts = self.client.gather(terms)
            del messages, terms
            sse = sum(p["sse"] for p in parts)
            reg = sum(p["reg"] for p in parts)
            entry = {
                "iteration": it,
                "loss": sse + self.config.reg * reg,
                "train_rmse": float(np.sqrt(sse / nnz)),
                "seconds": 0.0,
                "bytes_routed": self.bytes_routed(),
            }
            history.append(entry)
            if self.checkpoint is not None and (it % self.checkpoint_interval == 0 or it == max_iter):
                entry["seconds"] = time.perf_counter() - t0
                self._write_checkpoint(it, X, Y, history)
                # Restart from the checkpoint: the scheduler then forgets this iteration's
                # lineage, so its graph does not grow with the iterations.
                X = self._read_checkpoint(it, it % 2, "users")
            entry["seconds"] = time.perf_counter() - t0
            if self.on_iteration is not None:
                self.on_iteration(entry)
        blocks = {"users": self.client.gather(X), "items": self.client.gather(Y)}
        return FitResult(blocks, history)


class connect:
    """Context giving a Dask client: the one passed, the current one, or a LocalCluster.

    A LocalCluster started here has one single-threaded worker process per core (BLAS
    gets one thread each), binds to 127.0.0.1, and is closed on exit.
    """

    def __init__(self, client: Client | None = None) -> None:
        self.client = client
        self._cluster = None

    def __enter__(self) -> Client:
        if self.client is not None:
            return self.client
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
            dashboard_address="127.0.0.1:8787",
        )
        self.client = Client(self._cluster)
        log.info("started a LocalCluster with %d workers; dashboard: %s", cores, self.client.dashboard_link)
        return self.client

    def __exit__(self, *exc: object) -> None:
        if self._cluster is not None:
            self.client.close()
            self._cluster.close()
            self.client = self._cluster = None
