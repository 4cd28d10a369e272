"""Training: from parameters and ratings to learned factors and their history.

:func:`train` validates every parameter before any data is read, resolves the ratings
into a store (ingesting a DataFrame or file into a temporary one), checks user-given
arrays against it, takes a shared lease on the store and the checkpoint's lease
(:mod:`blockals.lock`), connects to a cluster (:mod:`blockals.cluster`), runs the
iterations (:class:`blockals.engine.Engine`) and assembles the factor blocks into
:class:`Trained`, whose fields become the estimator's learned attributes. The store is
checked to be still the one at its path once per iteration and on both sides of reading
its ids, so a store replaced under a training stops it with nothing saved. Progress is
printed here too: one line per iteration, and with ``verbose=2`` a bar over each
iteration's blocks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
from distributed.system import MEMORY_LIMIT

from blockals.checkpoint import Checkpoint, committed_configs, difference
from blockals.cluster import connect, parse_client
from blockals.engine import Engine
from blockals.errors import InputError, StoreError
from blockals.factors import Factors
from blockals.formats import blockals_meta, parse_path, parse_storage_options, refuse_overlap, resolve
from blockals.ingest import ingest
from blockals.lock import Lease, holding
from blockals.params import ALSConfig, RunParams, check_solve_memory, parse_bool, parse_params
from blockals.progress import print_progress
from blockals.recommend import rated_matrix
from blockals.store import SIDES, RatingStore, Side, open_store

__all__ = ["Trained", "train", "preflight", "user_arrays", "check_memory", "check_worker_memory"]

log = logging.getLogger("blockals")


# Up to this many ratings, a model trained without a saved store keeps which items each
# user rated (``user_items_``: 5 bytes a rating), so recommendations can leave them out.
# Beyond it, ingest a store first: the model then reads them from there.
KEEP_RATED_MAX = 50_000_000


@dataclass(frozen=True, kw_only=True)
class Trained:
    """What a training learned: the factors (rows in the store's sorted id order;
    ``store_path`` None when the ratings went to a temporary store) and the history."""

    factors: Factors
    history: list[dict[str, Any]]


def user_arrays(params: dict[str, Any], store: RatingStore) -> dict[str, np.ndarray]:
    """User-given arrays (initial factors, WALS weights), checked against the store."""
    arrays: dict[str, np.ndarray] = {}
    init, rank = params["init"], params["rank"]
    if not isinstance(init, str):
        users, items = init if isinstance(init, tuple) else (init, None)
        for key, value, side in (("user_init", users, "users"), ("item_init", items, "items")):
            if value is None:
                continue
            value = np.asarray(value, dtype=np.float64)
            shape = (store.n_rows(side), rank)
            if value.shape != shape or not np.isfinite(value).all():
                raise InputError(
                    f"init for {side} must be a finite array of shape {shape} (rows in the order of "
                    f"the store's {side[:-1]} ids), got shape {value.shape}."
                )
            arrays[key] = value
    for key, side in (("row_weights", "users"), ("col_weights", "items")):
        value = params[key]
        if not isinstance(value, str) and np.ndim(value) == 1:
            value = np.asarray(value, dtype=np.float64)
            if value.shape != (store.n_rows(side),):
                raise InputError(f"{key} must have one weight per {side[:-1]} ({store.n_rows(side)}), got {value.shape[0]}.")
            arrays[key] = value
    return arrays


def print_iteration(entry: dict[str, Any]) -> None:
    print(
        f"iteration {entry['iteration']:>3}  objective {entry['loss']:.6g}  "
        f"train RMSE {entry['train_rmse']:.4f}  {entry['seconds']:.2f} s",
        flush=True,
    )


def report_compiled(seconds: float, verbose: int) -> None:
    """Say once why the start took this long: over a second means a fresh installation."""
    if seconds > 1:
        note = f"compiled the kernels this configuration uses in {seconds:.1f} s; numba keeps them for later runs"
        if verbose:
            print(note, flush=True)
        else:
            log.info(note)


def print_block_progress(iteration: int, done: int, total: int) -> None:
    """The engine's ``on_block``: progress over an iteration's blocks (:func:`blockals.progress.print_progress`)."""
    print_progress(f"iteration {iteration:>3}", done, total, "blocks")


def _assemble(store: RatingStore, side: Side, blocks: list[np.ndarray], dtype: str) -> np.ndarray:
    """Factor blocks into one array in global-index (sorted id) order."""
    out = np.zeros((store.n_rows(side), blocks[0].shape[1]), dtype=dtype)
    for b, factors in enumerate(blocks):
        out[store.rows(side, b)] = factors
    return out


@contextlib.contextmanager
def _ratings_store(ratings: Any, storage_options: dict | None, verbose: int):
    """``(store, temporary)`` for ``ratings``: the store given, the one at a path, or a temporary
    one ingested from a source (reporting its passes at ``verbose``) and removed on exit."""
    if isinstance(ratings, RatingStore):
        yield ratings, False
        return
    if isinstance(ratings, (str, os.PathLike)) and blockals_meta(os.fspath(ratings), storage_options) is not None:
        yield open_store(os.fspath(ratings), storage_options), False
        return
    tmpdir = tempfile.mkdtemp(prefix="blockals-")
    try:
        yield ingest(ratings, os.path.join(tmpdir, "ratings.zarr"), verbose=verbose), True
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _checkpoint(run: RunParams, store: RatingStore, path: str | None, resume: bool, break_lease: bool):
    """The checkpoint and its lease, refused before a cluster starts; (None, no lease) without checkpoints."""
    if run.checkpoint_interval == 0:
        if resume:
            raise InputError("resume=True needs checkpoints; checkpoint_interval is 0.")
        return None, contextlib.nullcontext()
    default = path is None
    path = f"{store.path}/checkpoints/{run.config.fingerprint()}" if default else resolve(path)
    if not store.holds_derived(path):  # the default place, and a search's, are inside the store
        refuse_overlap({"the checkpoint path": path}, {"the ratings store": store.path})
    width = run.config.objective(float(store.stats["rating_mean"])).width
    checkpoint = Checkpoint(path, store.store_id, run.config.to_dict(), store.storage_options,
                            block_rows={side: store.block_rows(side).tolist() for side in SIDES}, width=width)
    checkpoint.check_writable()
    if resume and checkpoint.load() is None:  # load refuses a checkpoint of other parameters
        raise StoreError(_nothing_to_resume(checkpoint, store, run.config, default))
    # Taken before a cluster starts, so a second training of this checkpoint is refused at once.
    return checkpoint, Lease(path, "checkpoint", store.storage_options, break_lease)


def _nothing_to_resume(checkpoint: Checkpoint, store: RatingStore, config: ALSConfig, default: bool) -> str:
    """Why resume=True has nothing to start from: no commit at the path, or, at the default
    path (named by the parameters' fingerprint), checkpoints of other parameters only, one
    of which is named with the parameter that differs."""
    others = committed_configs(f"{store.path}/checkpoints", store.store_id, store.storage_options) if default else []
    if not others:
        return (f"resume=True, but there is no committed checkpoint to resume at {checkpoint.path}; "
                f"train without resume to start.")
    ours = config.to_dict()
    nearest = min(others, key=lambda other: sum(other.get(k) != v for k, v in ours.items()))
    recorded, wanted = difference(nearest, ours)
    return (f"resume=True, but {store.path} has no checkpoint of these parameters, only one made with {recorded} "
            f"(not {wanted}); resume with {recorded}, or train without resume.")


def check_memory(run: RunParams, store: RatingStore, limit: int, where: str) -> None:
    """Refuse a rank whose largest block solve needs more than ``limit`` bytes (see
    :func:`blockals.params.check_solve_memory`); ``where`` names the limit."""
    width = run.config.objective(float(store.stats["rating_mean"])).width
    rows = max(int((store.block_rows(side) + store.message_rows(side).sum(axis=0)).max()) for side in SIDES)
    check_solve_memory(run.config.rank, width, np.dtype(run.config.dtype).itemsize, rows, limit, where)


def check_worker_memory(client: Any, run: RunParams, store: RatingStore) -> None:
    """:func:`check_memory` against the smallest memory limit of the client's workers, if any."""
    limits = [w.get("memory_limit") for w in client.scheduler_info(n_workers=-1)["workers"].values()]
    limit = min((limit for limit in limits if limit), default=None)
    if limit:
        check_memory(run, store, limit, "a worker's memory limit")


def _trained(store: RatingStore, config: ALSConfig, blocks: dict[Side, list[np.ndarray]], history: list[dict],
             temporary: bool) -> Trained:
    # Checked on both sides of reading the ids, so the factors and the ids are of one store.
    store.check_unchanged("the training")
    users = _assemble(store, "users", blocks["users"], config.dtype)
    items = _assemble(store, "items", blocks["items"], config.dtype)
    k, carried = config.rank, config.carried
    extra = {} if carried is None else {f"user_{carried}": users[:, k].copy(), f"item_{carried}": items[:, k].copy()}
    if config.mode == "biased":
        extra["global_mean"] = float(store.stats["rating_mean"])
    # A temporary store goes with the fit; the model keeps which items each user rated, so
    # that recommendations can still leave them out.
    kept = rated_matrix(store) if temporary and store.nnz <= KEEP_RATED_MAX else None
    factors = Factors(
        user_factors=users[:, :k], item_factors=items[:, :k],
        user_ids=store.user_ids.to_numpy(), item_ids=store.item_ids.to_numpy(),
        config=config.to_dict(), store_path=None if temporary else store.path, user_items=kept, **extra,
    )
    store.check_unchanged("the training")
    return Trained(factors=factors, history=history)


def preflight(
    params: dict[str, Any], store: RatingStore, *, resume: bool = False, checkpoint_path: str | None = None,
    local: bool = True, break_lease: bool = False,
) -> tuple[RunParams, dict[str, np.ndarray], Checkpoint | None, Any]:
    """What :func:`train` refuses before a cluster starts: parameters and arrays that do not
    fit the store, a rank whose solves cannot fit in this machine's memory (``local``: the
    cluster will run here), a checkpoint path that is not one, and a resume with nothing
    to resume. Returns the validated parameters, the arrays, the checkpoint and its lease
    (not yet taken).
    """
    arrays = user_arrays(params, store)
    run = parse_params(params, arrays)
    if local:
        check_memory(run, store, MEMORY_LIMIT, "this machine's memory")
    checkpoint, lease = _checkpoint(run, store, checkpoint_path, resume, break_lease)
    return run, arrays, checkpoint, lease


def train(
    params: dict[str, Any],
    ratings: Any,
    client: Any = None,
    *,
    resume: bool = False,
    checkpoint_path: str | None = None,
    storage_options: dict | None = None,
    break_lease: bool = False,
    key_prefix: str = "blockals",
    run_tag: str = "",
) -> Trained:
    """Train with the estimator's parameters; see :meth:`blockals.ALS.fit` for the arguments
    and :class:`blockals.engine.Engine` for ``key_prefix`` and ``run_tag``."""
    verbose = parse_params(params).verbose  # every parameter, before any data is read or a cluster started
    resume = parse_bool(resume, "resume")
    storage_options = parse_storage_options(storage_options)
    if checkpoint_path is not None:
        checkpoint_path = parse_path(checkpoint_path, "checkpoint_path")
    client = parse_client(client)
    with _ratings_store(ratings, storage_options, verbose) as (store, temporary):
        run, arrays, checkpoint, lease = preflight(params, store, resume=resume, checkpoint_path=checkpoint_path,
                                                   local=client is None, break_lease=break_lease)
        if run.config.rank > min(store.n_users, store.n_items):
            log.warning("rank %d exceeds min(n_users, n_items); extra factors are unidentified", run.config.rank)
        # The store is leased for reading from before the cluster starts to the model's ids.
        with holding(None if temporary else store.reading(), lease):
            store.check_unchanged("the training")  # the store opened is the one now leased
            with connect(client, ratings=store.nnz) as c:
                check_worker_memory(c, run, store)
                engine = Engine(
                    c, store, run.config, checkpoint, run.checkpoint_interval, run.checkpoint_seconds,
                    print_iteration if run.verbose else None, arrays,
                    print_block_progress if run.verbose >= 2 else None, key_prefix=key_prefix, run_tag=run_tag,
                )
                result = engine.run(run.max_iter, resume=resume,
                                    on_compiled=functools.partial(report_compiled, verbose=run.verbose))
            return _trained(store, run.config, result.blocks, result.history, temporary)
