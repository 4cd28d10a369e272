"""The Dask engine: checkpoints and resume, task names, bounded graphs, bytes routed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import blockals
from blockals.checkpoint import Checkpoint, write_block
from blockals.params import ALSConfig
from blockals.engine import Engine
from blockals.errors import LeaseError
from reference import explicit_objective
from test_model import random_ratings, to_frame


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    R, M = random_ratings(60, 40, 0.2, seed=7)
    return blockals.ingest(to_frame(R, M), tmp_path_factory.mktemp("s") / "r.zarr", n_user_blocks=3, n_item_blocks=4)


def fit(store, client, max_iter, **kw):
    return blockals.ALS(rank=5, max_iter=max_iter, reg=0.05, seed=2, dtype="float64").fit(store, client, **kw)


def test_resume_equals_uninterrupted(store, client2, tmp_path):
    whole = fit(store, client2, 6, checkpoint_path=str(tmp_path / "a"))
    fit(store, client2, 3, checkpoint_path=str(tmp_path / "b"))
    # A crash while iteration 4 was being written: blocks in the next slot, never committed.
    for b in range(store.n_user_blocks):
        write_block(str(tmp_path / "b"), None, 0, "users", b, np.full((store.block_rows("users")[b], 5), 1e6))
    resumed = fit(store, client2, 6, checkpoint_path=str(tmp_path / "b"), resume=True)
    np.testing.assert_allclose(resumed.user_factors_, whole.user_factors_, rtol=0, atol=1e-12)
    np.testing.assert_allclose(resumed.item_factors_, whole.item_factors_, rtol=0, atol=1e-12)
    assert [h["iteration"] for h in resumed.history_] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in resumed.history_] == pytest.approx([h["loss"] for h in whole.history_], rel=1e-12)


def test_resume_of_finished_run_returns_its_factors(store, client2, tmp_path):
    done = fit(store, client2, 2, checkpoint_path=str(tmp_path / "c"))
    again = fit(store, client2, 2, checkpoint_path=str(tmp_path / "c"), resume=True)
    np.testing.assert_array_equal(again.user_factors_, done.user_factors_)
    np.testing.assert_array_equal(again.item_factors_, done.item_factors_)


def test_default_checkpoint_lives_in_the_store_and_resumes(store, client2):
    first = fit(store, client2, 2)
    resumed = fit(store, client2, 4, resume=True)
    whole = fit(store, client2, 4, resume=False)
    np.testing.assert_allclose(resumed.user_factors_, whole.user_factors_, atol=1e-12)
    assert len(first.history_) == 2


def test_resume_refuses_other_parameters(store, client2, tmp_path):
    fit(store, client2, 1, checkpoint_path=str(tmp_path / "d"))
    match = r"other training parameters \(rank=5, not rank=3\); resume with rank=5, or train without resume\.$"
    with pytest.raises(blockals.StoreError, match=match):
        blockals.ALS(rank=3, max_iter=2).fit(store, client2, checkpoint_path=str(tmp_path / "d"), resume=True)


@pytest.fixture(scope="module")
def sparse_store(tmp_path_factory):
    """Sparse enough that some block pairs need under half of their source block."""
    R, M = random_ratings(60, 40, 0.05, seed=7)
    return blockals.ingest(to_frame(R, M), tmp_path_factory.mktemp("s") / "r.zarr", n_user_blocks=3, n_item_blocks=4)


def test_task_prefixes_name_the_stages(sparse_store, client2):
    def task_prefixes(dask_scheduler):
        return set(dask_scheduler.task_prefixes)

    # The scheduler keeps every prefix it has seen, those of other tests' runs (recommend,
    # evaluate) too: the stages of this run are the ones it adds.
    before = client2.run_on_scheduler(task_prefixes)
    fit(sparse_store, client2, 1)
    prefixes = client2.run_on_scheduler(task_prefixes)
    for stage in ("blockals-init-users", "blockals-solve-items", "blockals-solve-users", "blockals-loss-users",
                  "blockals-loss-items", "blockals-checkpoint-users"):
        assert stage in prefixes
    # Pairs that need under half of their source block ship a slice, cut by a route task.
    assert prefixes & {"blockals-route-items", "blockals-route-users"}
    stages = {"compile", "init", "route", "solve", "loss", "factors", "checkpoint", "restart", "outblocks", "out", "gram",
              "gramsum"}
    assert {p.split("-")[1] for p in prefixes - before if p.startswith("blockals-")} <= stages


@pytest.mark.parametrize("interval, seconds", [(None, 60.0), (None, 1e-9), (2, 60.0)])
def test_checkpoints_every_n_iterations_or_by_elapsed_time(store, client2, tmp_path, interval, seconds):
    committed = []
    config = ALSConfig.parse(rank=4, reg=0.1, reg_scaling="count", solver="cholesky", seed=0, dtype="float32")
    ckpt = Checkpoint(str(tmp_path / "ckpt"), store.store_id, config.to_dict())

    def commits(entry):
        last = ckpt.load()
        committed.append(None if last is None else last.iteration)

    Engine(client2, store, config, ckpt, interval, seconds, on_iteration=commits).run(5)
    expected = {(None, 60.0): [None] * 4 + [5], (None, 1e-9): [1, 2, 3, 4, 5], (2, 60.0): [None, 2, 2, 4, 5]}
    assert committed == expected[interval, seconds]


def test_only_current_iteration_is_held(store, client2, tmp_path):
    counts = []

    def held(entry):
        counts.append(client2.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)))

    config = ALSConfig.parse(rank=4, reg=0.1, reg_scaling="count", solver="cholesky", seed=0, dtype="float32")
    ckpt = Checkpoint(str(tmp_path / "ckpt"), store.store_id, config.to_dict())
    engine = Engine(client2, store, config, ckpt, checkpoint_interval=1, on_iteration=held)
    engine.run(6)
    # Committed every iteration, the scheduler keeps about one iteration's tasks, not the
    # whole lineage (which would add every iteration's route, solve and loss tasks).
    # Releases arrive asynchronously, so allow some stragglers: far fewer than the 100+
    # tasks five more iterations of retained lineage would add here.
    assert max(counts) - min(counts) <= 12, counts

    # Releases reach the scheduler asynchronously; once they have, none of this run's tasks
    # is left (the shared cluster may hold other tests' results: only this run's keys count).
    run_id = engine.run_id  # what the function sent to the scheduler may capture: not the engine

    def ours(dask_scheduler):
        return [key for key in dask_scheduler.tasks if run_id in str(key)]

    deadline = time.monotonic() + 10
    while client2.run_on_scheduler(ours) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client2.run_on_scheduler(ours) == []


def test_bytes_routed_is_what_each_block_needs(sparse_store, client2):
    store = sparse_store
    model = fit(store, client2, 1)
    # Brute force from the ratings: block b needs the distinct rows it rates in each source
    # block j; a source block whose rows b mostly needs (more than half) ships whole.
    received, shipped = 0, set()
    for dst, src in (("users", "items"), ("items", "users")):
        src_of = store.assignment(src)[0]
        for b in range(store.n_blocks(dst)):
            rows, others, _ = store.triples(dst, b)
            for j in range(store.n_blocks(src)):
                needed = np.unique(others[src_of[others] == j]).size
                size = int((src_of == j).sum())
                received += size if 2 * needed > size else needed
                if needed:
                    shipped.add("whole" if 2 * needed > size else "slice")
    assert shipped == {"whole", "slice"}  # the store exercises both
    assert model.history_[0]["bytes_routed"] == received * 5 * 8


def _blas_threads_in_task(limits):
    from threadpoolctl import threadpool_info

    from blockals.cluster import blas_context

    with blas_context(limits):
        return max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")


def test_dask_threads_times_blas_threads_never_exceed_the_cores(client):
    import os

    from blockals.cluster import blas_limits

    limits = blas_limits(client)
    workers = client.scheduler_info(n_workers=-1)["workers"]
    cores = len(os.sched_getaffinity(0))  # every worker of this cluster is on this host
    assert sum(limits[a] * w["nthreads"] for a, w in workers.items()) <= max(cores, len(workers))
    for address in workers:
        seen = client.submit(_blas_threads_in_task, limits, workers=[address], pure=False).result()
        assert seen == limits[address]


def test_a_checkpoint_never_overwrites_the_commit_it_follows(store, client2, tmp_path):
    path = str(tmp_path / "e")
    config_of = lambda model: ALSConfig.parse(**{k: getattr(model, k) for k in (  # noqa: E731
        "rank", "reg", "reg_scaling", "solver", "seed", "dtype")}).to_dict()
    first = blockals.ALS(rank=5, max_iter=2, reg=0.05, seed=2, dtype="float64", checkpoint_interval=2)
    first.fit(store, client2, checkpoint_path=path)
    ckpt = Checkpoint(path, store.store_id, config_of(first))
    before = ckpt.load()
    # A crash while the next checkpoint (iteration 4) was being written: garbage in the other slot.
    for b in range(store.n_user_blocks):
        write_block(path, None, 1 - before.slot, "users", b, np.full((store.block_rows("users")[b], 5), 1e6))
    resumed = blockals.ALS(rank=5, max_iter=4, reg=0.05, seed=2, dtype="float64", checkpoint_interval=2)
    resumed.fit(store, client2, checkpoint_path=path, resume=True)
    after = ckpt.load()
    assert after.iteration == 4 and after.slot != before.slot
    whole = fit(store, client2, 4, checkpoint_path=str(tmp_path / "f"))
    np.testing.assert_allclose(resumed.user_factors_, whole.user_factors_, atol=1e-12)


def _wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _lease_names(path, text: str) -> bool:
    try:
        return text in path.read_text()
    except FileNotFoundError:
        return False


def test_an_ingest_over_a_store_a_training_reads_is_refused_and_the_training_unharmed(tmp_path, client2):
    R, M = random_ratings(60, 40, 0.2, seed=11)
    store = blockals.ingest(to_frame(R, M), tmp_path / "r.zarr", n_user_blocks=3, n_item_blocks=2)
    other = to_frame(*random_ratings(50, 30, 0.2, seed=12), user_offset=5000)
    trained: dict[str, object] = {}
    training = threading.Thread(target=lambda: trained.update(model=fit(store, client2, 40)))
    training.start()
    try:
        _wait_for(lambda: _lease_names(tmp_path / "r.zarr.lock", '"shared": true'), "the training's lease")
        with pytest.raises(LeaseError, match=f"^ratings store {store.path} is being read by another process "
                                             f"\\(process {os.getpid()} on .*; wait for it to finish or write to another path\\.$"):
            blockals.ingest(other, store.path, overwrite=True)
    finally:
        training.join()
    model = trained["model"]
    # The model's ids and factors are both of the store it was trained on: its objective,
    # computed here from the ratings made above, is the one it reported.
    np.testing.assert_array_equal(model.user_ids_, np.arange(60) + 1000)
    np.testing.assert_array_equal(model.item_ids_, np.arange(40) * 3)
    objective = explicit_objective(R, M, model.user_factors_, model.item_factors_, 0.05)
    assert objective == pytest.approx(model.history_[-1]["loss"], rel=1e-9)
    assert blockals.open_store(store.path).store_id == store.store_id


def test_a_store_replaced_under_a_training_stops_it_with_nothing_saved(tmp_path, client2):
    R, M = random_ratings(60, 40, 0.2, seed=13)
    path = tmp_path / "r.zarr"
    blockals.ingest(to_frame(R, M), path, n_user_blocks=3, n_item_blocks=2)
    # Same shape and ids, other ratings: nothing but the store id tells the two apart.
    blockals.ingest(to_frame(R[::-1], M[::-1]), tmp_path / "b.zarr", n_user_blocks=3, n_item_blocks=2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    train = subprocess.Popen(
        [sys.executable, "-m", "blockals.cli", "train", str(path), str(tmp_path / "m.zarr"), "--rank", "4",
         "--max-iter", "100000", "--scheduler", client2.scheduler.address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in train.stdout:
        if line.startswith("iteration   2"):
            break
    os.rename(path, tmp_path / "old.zarr")  # by hand, not by blockals: no lease is asked
    os.rename(tmp_path / "b.zarr", path)
    _, err = train.communicate(timeout=600)
    lines = err.strip().splitlines()
    assert train.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0] == (f"blockals: error: ratings store {path} was replaced or removed while the training read it; "
                        f"the training stopped and saved nothing, so run it again on the store now there.")
    assert not (tmp_path / "m.zarr").exists() and not list(tmp_path.glob(".m.zarr*"))
