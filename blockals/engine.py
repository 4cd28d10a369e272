"""The ALS iteration as Dask futures: route, gram, solve, loss, checkpoint.

One iteration is two half-steps, items first as in Spark. A half-step toward side ``S``
(say users) is, for every user block ``b``:

* ``blockals-route-users-<it>-<j>-<b>``: on the worker holding item block ``j``, cut the
  message ``Y_j[out(j -> b)]`` (skipped when ``b`` rates nothing in ``j``). The out-blocks
  are read once per run (``blockals-outblocks-users-<b>``, split into
  ``blockals-out-users-<j>-<b>``) and stay in the cluster: a route task receives its few
  indices rather than reading the destination block's routing from the store. Where
  ``out(j -> b)`` holds more than half of ``Y_j`` there is no route task: the solve
  receives ``Y_j`` itself, which Dask sends once to each worker for all the blocks solved
  there, and cuts the slice (:func:`blockals.routing.ship_whole`);
* ``blockals-gramsum-users-<it>-...`` (modes with a term over all pairs): ``Y^T Y`` as a
  tree reduction over item blocks, computed once and shared by every solve. Each block's
  ``Y_j^T Y_j`` comes with the loss terms of the solve that made ``Y_j``; factors
  initialised or read from a checkpoint get a ``blockals-gram-users-<it>-<j>`` task;
* ``blockals-solve-users-<it>-<b>``: read ``b``'s in-block from the store (or the
  worker's block cache), concatenate its messages and solve all its rows with
  :func:`blockals.halfstep.solve_block`, the one place systems are built and solved.

Each solve also returns its block's share of the objective, computed from the rows it
gathered (``blockals-loss-<side>-<it>-<b>`` picks it out, ``blockals-factors-...`` the
factors); the driver gathers an iteration's shares once the next iteration is submitted,
so the workers never wait for it. ``blockals-checkpoint-<side>-<it>-<b>`` tasks write
the factor blocks before the driver commits the iteration: every ``checkpoint_interval``
iterations, or by default once ``checkpoint_seconds`` have passed since the last commit
(writing, committing and restarting cost about a third of an iteration at 1M ratings),
and always after the last. The iteration after a commit restarts from the checkpoint
(``blockals-restart-...``), so the scheduler holds the graph of the iterations since the
last commit only (of every iteration when training runs without checkpoints). Keys end
in a run id, so two trainings on one cluster never share a key; a search's candidates
start theirs with ``blockals-search`` and put the candidate before the run id.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed import Client, Future, as_completed

from blockals import kernels
from blockals.checkpoint import Checkpoint, Committed, write_block
from blockals.cluster import blas_context, blas_limits, cache_bytes, reusing_memory
from blockals.halfstep import LossTerms, SolvedBlock, compile_kernels, gram, routed_rows, solve_block
from blockals.objectives import Objective
from blockals.params import ALSConfig
from blockals.routing import ship_whole
from blockals.store import RatingStore, Side, StoreRef, load_inblock, load_out_blocks, load_rows, other_side

__all__ = ["Engine", "FitResult"]

log = logging.getLogger("blockals")


# -- tasks (module level so workers import rather than unpickle them) -------------


def _init_task(
    ref: StoreRef, side: Side, block: int, config: ALSConfig, obj: Objective,
    given: np.ndarray | None, weights: np.ndarray | None,
) -> np.ndarray:
    if given is None:
        factors = kernels.init_factors(load_rows(ref, side, block), config.rank, config.seed, side, config.dtype, config.init)
    else:
        factors = np.asarray(given, dtype=config.dtype)
    inblock = load_inblock(ref, side, block, cache_bytes())
    return obj.initial(factors, inblock, obj.side_weights(side, inblock, weights))


def _read_checkpoint_task(ckpt: Checkpoint, slot: int, side: Side, block: int) -> np.ndarray:
    return ckpt.read_block(slot, side, block)


def _out_blocks_task(ref: StoreRef, side: Side, block: int) -> list[np.ndarray]:
    out = load_out_blocks(ref, side, block)
    return [out.out_block(j) for j in range(out.need_ptr.shape[0] - 1)]


def _route_task(rows: np.ndarray, factors: np.ndarray) -> np.ndarray:
    return factors[rows]


def _sum_task(*parts: np.ndarray | LossTerms) -> np.ndarray:
    return np.sum([p.gram if isinstance(p, LossTerms) else p for p in parts], axis=0)


@reusing_memory()
def _solve_task(
    ref: StoreRef, side: Side, block: int, config: ALSConfig, obj: Objective, limits: dict[str, int],
    G: np.ndarray | None, previous: np.ndarray | None, weights: np.ndarray | None, whole: np.ndarray,
    *messages: np.ndarray,
) -> SolvedBlock:
    """Solve one block (:func:`blockals.halfstep.solve_block`) from its routed messages."""
    inblock = load_inblock(ref, side, block, cache_bytes())
    M = routed_rows(inblock, messages, whole, obj.width, config.dtype)
    with blas_context(limits):
        return solve_block(inblock, M, obj, config, G=G, previous=previous,
                           weights=obj.side_weights(side, inblock, weights))


def _list_item(items: list, index: int) -> Any:
    return items[index]


def _factors(solved: SolvedBlock) -> np.ndarray:
    return solved.factors


def _terms(solved: SolvedBlock) -> LossTerms:
    return solved.terms


# -- driver -------------------------------------------------------------------------


@dataclass
class FitResult:
    """Factor blocks (as NumPy arrays) and the history of a finished run."""

    blocks: dict[Side, list[np.ndarray]]
    history: list[dict[str, Any]] = field(default_factory=list)


class Engine:
    """Runs ALS iterations for one store and configuration on a Dask client.

    Parameters
    ----------
    client : distributed.Client
    store : RatingStore
    config : ALSConfig
    checkpoint : Checkpoint, optional
        Where iterations are committed; None runs without checkpoints (the scheduler then
        keeps the lineage of every iteration).
    checkpoint_interval : int, optional
        Commit every this many iterations, and after the last; None: after the first
        iteration that ends ``checkpoint_seconds`` after the last commit, and after the last.
    checkpoint_seconds : float
    on_iteration : callable, optional
        Called with each iteration's history entry.
    on_block : callable, optional
        Called as ``on_block(iteration, done, total)`` each time a block's solve finishes.
    arrays : dict, optional
        User-given global arrays, in global-index order: ``"user_init"``, ``"item_init"``,
        ``"row_weights"``, ``"col_weights"``.
    key_prefix : str
        What every task key starts with (``"blockals-search"`` for a search's candidates).
    run_tag : str
        Put before the run id at the end of every key, naming the run on the dashboard
        (a search's candidate: ``"c7"``).
    """

    def __init__(
        self,
        client: Client,
        store: RatingStore,
        config: ALSConfig,
        checkpoint: Checkpoint | None = None,
        checkpoint_interval: int | None = None,
        checkpoint_seconds: float = 60.0,
        on_iteration: Callable[[dict[str, Any]], None] | None = None,
        arrays: dict[str, np.ndarray] | None = None,
        on_block: Callable[[int, int, int], None] | None = None,
        key_prefix: str = "blockals",
        run_tag: str = "",
    ) -> None:
        self.client = client
        self.store = store
        self.ref = store.ref
        self.config = config
        self.objective = config.objective(float(store.stats["rating_mean"]))
        self.checkpoint = checkpoint
        self.checkpoint_interval = checkpoint_interval
        self.checkpoint_seconds = checkpoint_seconds
        self.on_iteration = on_iteration
        self.on_block = on_block
        self.key_prefix = key_prefix
        self.run_id = f"{run_tag}-{uuid.uuid4().hex[:8]}" if run_tag else uuid.uuid4().hex[:8]
        self.limits = blas_limits(client)
        self.per_block = self._split_arrays(arrays or {})
        self.routes: dict[Side, list[list[Future | None]]] = {}

    def _split_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, list[np.ndarray | None]]:
        """Cut global arrays into per-block pieces, in each block's local row order."""
        names = {"users": ("user_init", "row_weights"), "items": ("item_init", "col_weights")}
        out: dict[str, list[np.ndarray | None]] = {}
        for side, keys in names.items():
            rows = [self.store.rows(side, b) for b in range(self.store.n_blocks(side))] if any(k in arrays for k in keys) else None
            for key in keys:
                out[key] = [arrays[key][r] for r in rows] if key in arrays else [None] * self.store.n_blocks(side)
        return out

    def _key(self, *parts: object) -> str:
        return f"{self.key_prefix}-" + "-".join(map(str, parts)) + f"-{self.run_id}"

    def _submit(self, fn: Callable, *args: Any, key: str) -> Future:
        return self.client.submit(fn, *args, key=key, pure=False)

    def _whole(self, dst: Side) -> np.ndarray:
        """``[j, b]``: source block ``j`` ships to block ``b`` of ``dst`` whole (:func:`ship_whole`)."""
        return ship_whole(self.store.message_rows(dst), self.store.block_rows(other_side(dst)))

    def bytes_routed(self) -> int:
        """Bytes of factor rows the solves of one iteration receive: each out-block, or the
        whole source block where a pair ships it whole. A whole block reaches each worker
        once, however many of its destination blocks run there."""
        rows = 0
        for dst in ("users", "items"):
            sent, whole = self.store.message_rows(dst), self._whole(dst)
            rows += int(np.where(whole, self.store.block_rows(other_side(dst))[:, None], sent).sum())
        return rows * self.objective.width * np.dtype(self.config.dtype).itemsize

    def _weights(self, side: Side) -> list[np.ndarray | None]:
        return self.per_block["row_weights" if side == "users" else "col_weights"]

    def _init(self, side: Side) -> list[Future]:
        given = self.per_block["user_init" if side == "users" else "item_init"]
        weights = self._weights(side)
        return [
            self._submit(_init_task, self.ref, side, b, self.config, self.objective, given[b], weights[b], key=self._key("init", side, b))
            for b in range(self.store.n_blocks(side))
        ]

    def _read_checkpoint(self, it: int, slot: int, side: Side) -> list[Future]:
        return [
            self._submit(_read_checkpoint_task, self.checkpoint, slot, side, b, key=self._key("restart", side, it, b))
            for b in range(self.store.n_blocks(side))
        ]

    def _start(self, resume: bool) -> tuple[list[Future], list[Future] | None, Committed | None]:
        """User (and, for warm starts, item) factors to start from."""
        committed = None
        if self.checkpoint is not None:
            committed = self.checkpoint.load() if resume else None
            if committed is None:
                self.checkpoint.start()
        if committed is not None:
            log.info("resuming from iteration %d of checkpoint %s", committed.iteration, self.checkpoint.path)
            X = self._read_checkpoint(committed.iteration, committed.slot, "users")
            return X, self._read_checkpoint(committed.iteration, committed.slot, "items"), committed
        return self._init("users"), self._init("items") if self.config.warm_start else None, None

    def _gram(self, it: int, side: Side, factors: list[Future], terms: list[Future] | None) -> Future | None:
        """``F^T F`` of a side, summed over its blocks as a binary tree of tasks.

        The blocks' Gramians come from the loss terms of the solves that made the factors
        (:attr:`LossTerms.gram`, the same product), or, for factors initialised or read
        from a checkpoint, from a gram task per block.
        """
        if not self.objective.gram_weight:
            return None
        if terms is None:
            level = [self._submit(gram, f, self.config.rank, key=self._key("gram", side, it, j)) for j, f in enumerate(factors)]
        else:
            level = list(terms)
        depth = 0
        while len(level) > 1 or depth == 0 and terms is not None:
            level = [
                self._submit(_sum_task, *level[i : i + 2], key=self._key("gramsum", side, it, depth, i))
                for i in range(0, len(level), 2)
            ]
            depth += 1
        return level[0]

    def _out_blocks(self, dst: Side) -> list[list[Future | None]]:
        """``out(j -> b)`` for every block ``b`` of ``dst`` and source block ``j`` whose pair
        ships a slice (None where ``b`` needs nothing from ``j`` or takes ``Y_j`` whole),
        read from the store once per run."""
        if dst not in self.routes:
            sliced = (self.store.message_rows(dst) > 0) & ~self._whole(dst)
            self.routes[dst] = []
            for b in range(self.store.n_blocks(dst)):
                if not sliced[:, b].any():
                    self.routes[dst].append([None] * sliced.shape[0])
                    continue
                table = self._submit(_out_blocks_task, self.ref, dst, b, key=self._key("outblocks", dst, b))
                self.routes[dst].append([
                    self._submit(_list_item, table, j, key=self._key("out", dst, j, b)) if sliced[j, b] else None
                    for j in range(sliced.shape[0])
                ])
        return self.routes[dst]

    def _half_step(
        self, it: int, dst: Side, src_factors: list[Future], previous: list[Future] | None,
        src_terms: list[Future] | None,
    ) -> tuple[list[Future], list[Future]]:
        """Solve every block of ``dst`` from the other side's factors (and the loss terms of
        the solves that made them, if any); returns factor futures and loss-term futures."""
        routes = self._out_blocks(dst)
        sends, whole = self.store.message_rows(dst) > 0, self._whole(dst)
        G = self._gram(it, dst, src_factors, src_terms)
        weights = self._weights(dst)
        solved, stats = [], []
        for b in range(self.store.n_blocks(dst)):
            msgs = [
                src_factors[j] if whole[j, b]
                else self._submit(_route_task, routes[b][j], src_factors[j], key=self._key("route", dst, it, j, b))
                for j in range(len(src_factors))
                if sends[j, b]
            ]
            prev = None if previous is None else previous[b]
            result = self._submit(
                _solve_task, self.ref, dst, b, self.config, self.objective, self.limits, G, prev, weights[b],
                whole[:, b], *msgs, key=self._key("solve", dst, it, b),
            )
            solved.append(self._submit(_factors, result, key=self._key("factors", dst, it, b)))
            stats.append(self._submit(_terms, result, key=self._key("loss", dst, it, b)))
        return solved, stats

    def _losses(self, user_terms: list[Future], item_terms: list[Future]) -> dict[str, float]:
        """The objective at the end of an iteration, from the solves' loss terms.

        The user solves saw the final item factors, so their observed-pair terms are the
        objective's; penalties and Gramians come from both sides' final factors.
        """
        users: list[LossTerms]
        items: list[LossTerms]
        users, items = self.client.gather([user_terms, item_terms])
        obj = self.objective
        loss = sum(t.observed for t in users) + sum(t.penalty for t in users + items)
        if obj.gram_weight:
            GX, GY = sum(t.gram for t in users), sum(t.gram for t in items)
            loss += obj.gram_weight * float(np.sum(GX * GY))  # trace(GX @ GY), both symmetric
        sq_err = sum(t.sq_err for t in users)
        return {"loss": loss, "train_rmse": float(np.sqrt(sq_err / self.store.nnz))}

    def _write_checkpoint(self, it: int, X: list[Future], Y: list[Future], history: list[dict]) -> int:
        """Write both sides into the slot not holding the last commit, then commit; returns the slot."""
        slot = 1 - self._committed_slot
        ckpt = self.checkpoint
        writes = [
            self._submit(write_block, ckpt.path, ckpt.storage_options, slot, side, b, f, key=self._key("checkpoint", side, it, b))
            for side, futures in (("users", X), ("items", Y))
            for b, f in enumerate(futures)
        ]
        self.client.gather(writes)  # waits, and raises if a write failed
        ckpt.commit(it, slot, history)
        self._committed_slot = slot
        return slot

    def compile(self) -> float:
        """Compile (or load from numba's cache) the kernels this run's solves use, on every
        worker before the first iteration; returns the longest a worker took."""
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        done = [
            self.client.submit(compile_kernels, self.objective, self.config, workers=[addr], allow_other_workers=False,
                               key=self._key("compile", i), pure=False)
            for i, addr in enumerate(workers)
        ]
        return max(self.client.gather(done), default=0.0)

    def _commit_due(self, it: int, max_iter: int, last_commit: float) -> bool:
        if it == max_iter:
            return True
        if self.checkpoint_interval is None:
            return time.perf_counter() - last_commit >= self.checkpoint_seconds
        return it % self.checkpoint_interval == 0

    def run(self, max_iter: int, resume: bool = False, on_compiled: Callable[[float], None] | None = None) -> FitResult:
        """Run iterations up to ``max_iter``; ``on_compiled`` is called with the seconds the
        workers took to compile (or load) the kernels, which they do while the first
        blocks are read, before the first iteration starts."""
        X, Y, committed = self._start(resume)
        for side in ("users", "items"):
            self._out_blocks(side)
        compiled = self.compile()
        if on_compiled is not None:
            on_compiled(compiled)
        # Slot 1 first on a fresh start; never the slot of the commit a resume relies on.
        self._committed_slot = committed.slot if committed else 0
        history = list(committed.history) if committed else []
        first = committed.iteration + 1 if committed else 1
        warm = self.config.warm_start
        since = last_commit = time.perf_counter()
        user_terms = None  # the loss terms of the solves that made X, whose Gramians they hold
        pending = None  # an iteration whose losses are still to be gathered
        for it in range(first, max_iter + 1):
            # Cached in-blocks are used without reading the store: that it is still the one
            # at its path is checked here, once per iteration (see blockals.store._BlockCache).
            self.store.check_unchanged("the training")
            Y, item_terms = self._half_step(it, "items", X, Y if warm else None, user_terms)
            X, user_terms = self._half_step(it, "users", Y, X if warm else None, item_terms)
            # The previous iteration's losses are gathered only now, with this one's tasks
            # queued, so the workers do not wait while the driver gathers and submits.
            if pending is not None:
                since = self._record(*pending, history, since)
            pending = (it, user_terms, item_terms, Y + X)
            if self.checkpoint is not None and self._commit_due(it, max_iter, last_commit):
                since = self._record(*pending, history, since, report=False)
                pending = None
                slot = self._write_checkpoint(it, X, Y, history)
                # Restart from the checkpoint: the scheduler then forgets this iteration's
                # lineage, so its graph does not grow with the iterations.
                X = self._read_checkpoint(it, slot, "users")
                if warm:
                    Y = self._read_checkpoint(it, slot, "items")
                last_commit = time.perf_counter()
                history[-1]["seconds"] += last_commit - since
                since = last_commit
                self._report(history[-1])
        if pending is not None:
            self._record(*pending, history, since)
        blocks = {"users": self.client.gather(X), "items": self.client.gather(Y)}
        self.routes.clear()  # release the out-blocks held in the cluster
        return FitResult(blocks, history)

    def _record(
        self, it: int, user_terms: list[Future], item_terms: list[Future], solved: list[Future],
        history: list[dict[str, Any]], since: float, report: bool = True,
    ) -> float:
        """Append iteration ``it``'s history entry once its solves are done; returns the time
        it was recorded, from which the next entry's seconds count."""
        if self.on_block is not None:
            for done, _ in enumerate(as_completed(solved), start=1):
                self.on_block(it, done, len(solved))
        losses = self._losses(user_terms, item_terms)
        now = time.perf_counter()
        history.append({"iteration": it, **losses, "seconds": now - since, "bytes_routed": self.bytes_routed()})
        if report:
            self._report(history[-1])
        return now

    def _report(self, entry: dict[str, Any]) -> None:
        if self.on_iteration is not None:
            self.on_iteration(entry)
