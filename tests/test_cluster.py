"""Real `dask scheduler` and `dask worker` processes on 127.0.0.1: the deployment shape."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

import blockals

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def process_cluster(tmp_path):
    """A scheduler and two single-threaded workers, each its own process, as on Kubernetes."""
    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    deadline = time.monotonic() + 60
    while not scheduler_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    for _ in range(2):
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                       str(scheduler_file), "--nworkers", "1", "--nthreads", "1", "--memory-limit", "1GiB",
                                       "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
    client = Client(scheduler_file=str(scheduler_file), set_as_default=False)
    client.wait_for_workers(2, timeout=60)
    yield client
    client.close()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def test_pipeline_on_process_cluster_matches_local_cluster(process_cluster, tmp_path):
    address = process_cluster.scheduler.address
    common = [str(ROOT / "pipelines" / "als_pipeline.py"), "--max-iter", "3", "--stages", "ingest,split,train"]
    remote = subprocess.run([sys.executable, *common, "--data", str(tmp_path / "remote")], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "DASK_SCHEDULER_ADDRESS": address})
    assert remote.returncode == 0, remote.stderr[-2000:]
    # The job really ran on the process cluster: its workers hold the store blocks' cache.
    assert process_cluster.run_on_scheduler(lambda dask_scheduler: "blockals-solve-users" in dask_scheduler.task_prefixes)
    local = subprocess.run([sys.executable, *common, "--data", str(tmp_path / "local")], capture_output=True, text=True,
                           timeout=600, env={**os.environ, "DASK_SCHEDULER_ADDRESS": ""})
    assert local.returncode == 0, local.stderr[-2000:]
    a = blockals.ALS.load(tmp_path / "remote" / "model.zarr")
    b = blockals.ALS.load(tmp_path / "local" / "model.zarr")
    np.testing.assert_array_equal(a.user_ids_, b.user_ids_)
    np.testing.assert_allclose(a.user_factors_, b.user_factors_, atol=1e-5)
    np.testing.assert_allclose(a.item_factors_, b.item_factors_, atol=1e-5)


def test_a_worker_killed_mid_training_changes_nothing(process_cluster, tmp_path):
    frame = blockals.datasets.synthetic_frame(3000, 1500, 150_000, seed=3)
    store = blockals.ingest(frame, tmp_path / "r.zarr", n_user_blocks=4, n_item_blocks=4)
    params = dict(rank=16, max_iter=6, reg=0.05, seed=1, dtype="float64")
    undisturbed = blockals.ALS(**params).fit(store, process_cluster, checkpoint_path=str(tmp_path / "a"))

    killed = []

    def kill_one_worker_during_iteration_three(entry):
        if entry["iteration"] == 2 and not killed:
            pid = next(iter(process_cluster.run(os.getpid).values()))
            # After iteration 2 is committed, iteration 3's tasks are already queued: kill then.
            threading.Timer(0.05, os.kill, (pid, signal.SIGKILL)).start()
            killed.append(pid)

    model = blockals.ALS(**params)
    model._report = kill_one_worker_during_iteration_three  # the per-iteration hook verbose=True calls
    model.verbose = True
    model.fit(store, process_cluster, checkpoint_path=str(tmp_path / "b"))
    assert killed and killed[0] not in process_cluster.run(os.getpid).values()  # it really died
    np.testing.assert_allclose(model.user_factors_, undisturbed.user_factors_, atol=1e-5)
    np.testing.assert_allclose(model.item_factors_, undisturbed.item_factors_, atol=1e-5)


def test_driver_killed_mid_training_resumes_to_the_same_model(tmp_path):
    """SIGKILL the training command after its third iteration; the rerun with --resume ends
    where an uninterrupted run does (two copies of the data keep their checkpoints apart)."""
    frame = blockals.datasets.synthetic_frame(3000, 1500, 150_000, seed=5)
    for name in ("a", "b"):
        blockals.ingest(frame, tmp_path / f"{name}.zarr", n_user_blocks=4, n_item_blocks=3)
    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    train = [sys.executable, "-m", "blockals.cli", "train"]
    options = ["--rank", "16", "--max-iter", "8", "--reg", "0.05", "--seed", "1", "--dtype", "float64"]
    whole = subprocess.run([*train, str(tmp_path / "a.zarr"), str(tmp_path / "ma.zarr"), *options],
                           capture_output=True, text=True, timeout=600, env=env)
    assert whole.returncode == 0, whole.stderr[-2000:]

    victim = subprocess.Popen([*train, str(tmp_path / "b.zarr"), str(tmp_path / "mb.zarr"), *options],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                              start_new_session=True)
    for line in victim.stdout:
        if line.startswith("iteration   3"):
            os.killpg(victim.pid, signal.SIGKILL)  # the driver and the cluster it started
            break
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "mb.zarr").exists()

    resumed = subprocess.run([*train, str(tmp_path / "b.zarr"), str(tmp_path / "mb.zarr"), *options, "--resume"],
                             capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "iteration   1" not in resumed.stdout and "iteration   4" in resumed.stdout  # it did resume
    a = blockals.ALS.load(tmp_path / "ma.zarr")
    b = blockals.ALS.load(tmp_path / "mb.zarr")
    np.testing.assert_allclose(b.user_factors_, a.user_factors_, atol=1e-10)
    np.testing.assert_allclose(b.item_factors_, a.item_factors_, atol=1e-10)
    assert [h["iteration"] for h in b.history_] == list(range(1, 9))
