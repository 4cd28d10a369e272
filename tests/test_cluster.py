"""Real `dask scheduler` and `dask worker` processes on 127.0.0.1: the deployment shape."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dask.system import cpu_count
from distributed import Client, LocalCluster

import blockals
from blockals.cluster import IN_PROCESS_RATINGS, blas_limits, connect, retain_freed_memory, reusing_memory
from blockals.store import BLOCK_CACHE
from conftest import dask_processes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def process_cluster(tmp_path):
    """A scheduler and two single-threaded workers, each its own process, as on Kubernetes."""
    with dask_processes(tmp_path, 2, ("--memory-limit", "1GiB")) as client:
        yield client


@pytest.mark.slow  # the kill tests below run on the same process cluster in CI
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


def test_a_worker_killed_mid_training_changes_nothing(process_cluster, tmp_path, monkeypatch):
    frame = blockals.datasets.synthetic_frame(3000, 1500, 150_000, seed=3)
    store = blockals.ingest(frame, tmp_path / "r.zarr", n_user_blocks=4, n_item_blocks=4)
    params = dict(rank=16, max_iter=6, reg=0.05, seed=1, dtype="float64")
    undisturbed = blockals.ALS(**params).fit(store, process_cluster, checkpoint_path=str(tmp_path / "a"))

    killed = []

    def kill_one_worker_during_iteration_three(entry):
        if entry["iteration"] == 2 and not killed:
            pid = next(iter(process_cluster.run(os.getpid).values()))
            # Iteration 3's tasks are already queued: kill then. Nothing is committed before
            # the last iteration (checkpoints by elapsed time), so Dask recomputes the lost
            # results from their lineage.
            threading.Timer(0.05, os.kill, (pid, signal.SIGKILL)).start()
            killed.append(pid)

    # The per-iteration hook verbose=1 calls.
    monkeypatch.setattr(blockals.training, "print_iteration", kill_one_worker_during_iteration_three)
    model = blockals.ALS(**params, verbose=1)
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
    options = ["--rank", "16", "--max-iter", "8", "--reg", "0.05", "--seed", "1", "--dtype", "float64",
               "--checkpoint-interval", "1"]
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
    assert (tmp_path / "mb.zarr.lock").exists()  # the dead training's lease: left behind, but free

    resumed = subprocess.run([*train, str(tmp_path / "b.zarr"), str(tmp_path / "mb.zarr"), *options, "--resume"],
                             capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "iteration   1" not in resumed.stdout and "iteration   4" in resumed.stdout  # it did resume
    a = blockals.ALS.load(tmp_path / "ma.zarr")
    b = blockals.ALS.load(tmp_path / "mb.zarr")
    np.testing.assert_allclose(b.user_factors_, a.user_factors_, atol=1e-10)
    np.testing.assert_allclose(b.item_factors_, a.item_factors_, atol=1e-10)
    assert [h["iteration"] for h in b.history_] == list(range(1, 9))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockals.cli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DASK_SCHEDULER_ADDRESS": ""})


def _finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _one_sentence(done: subprocess.CompletedProcess, message: str) -> str:
    """The refusal the CLI printed: exit 2, one line on stderr, no traceback."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert message in lines[0], lines[0]
    return lines[0]


def test_ingest_killed_midway_is_refused_then_rerun_from_scratch(tmp_path):
    """SIGKILL `blockals ingest` while it builds its blocks: the half-written store, staged
    beside the path, never opens, nothing appears at the path, and the same command run
    again writes exactly the source's ratings and ids and removes what the first one left."""
    frame = blockals.datasets.synthetic_frame(8000, 3000, 500_000, seed=11)[["user", "item", "rating"]]
    (tmp_path / "src").mkdir()
    for k, part in enumerate(np.array_split(np.arange(len(frame)), 5)):
        frame.iloc[part].to_csv(tmp_path / "src" / f"part{k}.csv", index=False)
    store = tmp_path / "r.zarr"
    command = [sys.executable, "-m", "blockals.cli", "ingest", str(tmp_path / "src" / "*.csv"), str(store),
               "--n-user-blocks", "6", "--n-item-blocks", "4"]

    victim = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def staged_users() -> list[Path]:
        return [p for p in tmp_path.glob(".r.zarr.ingest-*/_staging/users") if any(p.iterdir())]

    while victim.poll() is None and not staged_users():
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)  # some user blocks written, the item blocks not yet
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    staged = staged_users()[0].parent.parent
    assert (staged / "users" / "blocks" / "0").is_dir()  # really half-written
    assert not store.exists()

    with pytest.raises(blockals.StoreError, match="is incomplete"):
        blockals.open_store(staged)
    with pytest.raises(blockals.StoreError, match="is not a blockals store"):
        blockals.open_store(store)
    _one_sentence(_cli("train", str(store), str(tmp_path / "m.zarr")), "is not a blockals store")
    assert not (tmp_path / "m.zarr").exists()

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    done = blockals.open_store(store)
    assert not (store / "_staging").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zarr", "src"]
    # The source read again, independently, by pandas.
    source = pd.concat([pd.read_csv(f) for f in sorted((tmp_path / "src").glob("*.csv"))], ignore_index=True)
    np.testing.assert_array_equal(done.user_ids.to_numpy(), np.unique(source["user"]))
    np.testing.assert_array_equal(done.item_ids.to_numpy(), np.unique(source["item"]))
    expected = source.sort_values(["user", "item"], ignore_index=True)
    for side, n_blocks in (("users", done.n_user_blocks), ("items", done.n_item_blocks)):
        rows, others, ratings = (np.concatenate(a) for a in zip(*(done.triples(side, b) for b in range(n_blocks))))
        users, items = (rows, others) if side == "users" else (others, rows)
        stored = pd.DataFrame({"user": done.user_ids.to_numpy()[users], "item": done.item_ids.to_numpy()[items],
                               "rating": ratings}).sort_values(["user", "item"], ignore_index=True)
        np.testing.assert_array_equal(stored["user"], expected["user"])
        np.testing.assert_array_equal(stored["item"], expected["item"])
        np.testing.assert_array_equal(stored["rating"], expected["rating"].astype(np.float32))


def test_a_second_training_of_one_path_is_refused_while_the_first_runs(tmp_path, client2):
    """Training A holds its model's and its checkpoint's leases; B (same model path, other
    seed) and C (same store and parameters, other model path) are refused with one sentence
    while A runs, and A's model is saved whole, equal to the same training run alone."""
    frame = blockals.datasets.synthetic_frame(2000, 1000, 60_000, seed=4)
    store = blockals.ingest(frame, tmp_path / "r.zarr", n_user_blocks=3, n_item_blocks=3)
    model = tmp_path / "m.zarr"
    options = ["--rank", "8", "--max-iter", "4", "--reg", "0.05", "--dtype", "float64"]
    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    a_err = tmp_path / "a.err"  # a file, not a pipe: nobody reads A's stderr while it runs
    with a_err.open("w") as err:
        a = subprocess.Popen([sys.executable, "-m", "blockals.cli", "train", str(store.path), str(model), *options,
                              "--seed", "1", "--dashboard-address", "127.0.0.1:0"],
                             stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    try:
        printed = []
        for line in a.stdout:
            printed.append(line)
            if line.startswith("iteration   1"):
                break
        assert printed[0].startswith("dashboard: http://127.0.0.1:") and ":8787/" not in printed[0]
        # Frozen mid-training: alive, holding both leases, for as long as B and C take.
        os.kill(a.pid, signal.SIGSTOP)
        both = [subprocess.Popen([sys.executable, "-m", "blockals.cli", "train", str(store.path), str(path), *options,
                                  "--seed", seed], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                for path, seed in [(model, "2"), (tmp_path / "c.zarr", "1")]]
        b, c = map(_finish, both)
    finally:
        os.kill(a.pid, signal.SIGCONT)
    a.communicate(timeout=600)
    assert a.returncode == 0, a_err.read_text()[-2000:]
    assert f"process {a.pid} " in _one_sentence(b, f"model {model} is being written by another process")
    assert f"process {a.pid} " in _one_sentence(c, "is being written by another process")
    assert "checkpoint" in c.stderr and not (tmp_path / "c.zarr").exists()
    assert not list(tmp_path.glob("*.lock")) and not list((tmp_path / "r.zarr" / "checkpoints").glob("*.lock"))

    saved = blockals.ALS.load(model)
    alone = blockals.ALS(rank=8, max_iter=4, reg=0.05, dtype="float64", seed=1).fit(
        store, client2, checkpoint_path=str(tmp_path / "alone"))
    assert saved.seed == 1 and [h["iteration"] for h in saved.history_] == [1, 2, 3, 4]
    np.testing.assert_allclose(saved.user_factors_, alone.user_factors_, atol=1e-10)
    np.testing.assert_allclose(saved.item_factors_, alone.item_factors_, atol=1e-10)


_FAULTS_OF_A_REUSED_ARRAY = """
import resource, sys
import numpy as np
from blockals.cluster import retain_freed_memory

def faults_of_second_array():
    np.ones(2**24).sum()  # 128 MB allocated, touched and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    np.ones(2**24).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = faults_of_second_array()
kept = retain_freed_memory()
print(plain, kept, faults_of_second_array())
"""


def test_a_worker_reuses_freed_arrays_instead_of_faulting_them_in(client2):
    # As Dask's nanny starts a worker: freed arrays go back to the OS, and the next one is
    # faulted in again (a fault per 4 KiB page, or per 2 MiB page where NumPy asks for huge
    # pages: at least 64 for 128 MB).
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_REUSED_ARRAY], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    plain, kept, reused = (int(v) for v in out)
    assert plain >= 64
    assert kept == 1 << 30  # not on a worker: 1 GiB
    assert reused < plain / 10
    # On a worker: a quarter of its memory limit.
    limits = client2.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
    for addr, limit in limits.items():
        assert client2.submit(retain_freed_memory, workers=[addr], pure=False).result() == min(1 << 30, limit // 4)


_FAULTS_IN_A_THREAD = """
import resource, threading
import numpy as np
from blockals.cluster import retain_freed_memory

def faults_of_second_array(out):
    np.ones(2**24).sum()  # 128 MB, above a thread arena's 64 MiB heaps
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    np.ones(2**24).sum()
    out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

retain_freed_memory()
out = []
thread = threading.Thread(target=faults_of_second_array, args=(out,))
thread.start(); thread.join()
print(out[0])
"""


@reusing_memory()
def _faults_of_a_second_large_array() -> int:
    np.ones(2**24).sum()
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    np.ones(2**24).sum()
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


def test_a_worker_thread_reuses_arrays_above_a_thread_arena():
    # Without one malloc arena, a thread maps a 128 MB array afresh each time, thresholds
    # raised or not (at least 64 faults: one per 2 MiB huge page)...
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    alone = subprocess.run([sys.executable, "-c", _FAULTS_IN_A_THREAD], env=env, capture_output=True, text=True,
                           check=True).stdout
    assert int(alone) >= 64
    # ...and the workers Dask's nannies spawn after blockals is imported have one, so a
    # solve's thread reuses it. A worker of its own: one that earlier tasks left near its
    # limit has handed pages of its free chunks back (malloc_trim), which fault in again.
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                      memory_limit="2GiB") as cluster, Client(cluster, set_as_default=False) as client:
        assert set(client.run(lambda: os.environ.get("MALLOC_ARENA_MAX")).values()) == {"1"}
        assert client.submit(_faults_of_a_second_large_array, pure=False).result() < int(alone) / 10


@reusing_memory()
def _hold_and_free(n_bytes: int) -> int:
    # 8 MB arrays, as many of a solve's: a worker thread's malloc arena serves them and
    # keeps some once they are freed. Touched, then freed.
    arrays = [np.ones((8 << 20) // 8) for _ in range(n_bytes // (8 << 20))]
    return len(arrays)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _release_above(fraction: float) -> None:
    import blockals.cluster

    blockals.cluster.RELEASE_ABOVE = fraction


def test_a_worker_near_its_limit_hands_freed_memory_back():
    # Retained memory must not keep a worker at Dask's pause threshold, where it would run
    # nothing that could free it: a task ending above RELEASE_ABOVE of the limit releases it.
    # The same task twice, with the threshold out of reach and then at zero.
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="2GiB", host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.submit(retain_freed_memory, pure=False).result()
        (base,) = client.run(_rss).values()
        client.run(_release_above, 1.0)
        client.submit(_hold_and_free, 1300 << 20, pure=False).result()
        (kept,) = client.run(_rss).values()
        client.run(_release_above, 0.0)
        client.submit(_hold_and_free, 1300 << 20, pure=False).result()
        (released,) = client.run(_rss).values()
    assert kept - base > 64 << 20, (base, kept)
    assert released - base < (kept - base) / 2, (base, kept, released)


@pytest.mark.parametrize("ratings, in_process", [(1_000, True), (IN_PROCESS_RATINGS + 1, False), (None, False)])
def test_a_started_cluster_runs_a_small_training_in_threads_of_this_process(ratings, in_process, tmp_path):
    store = blockals.ingest(blockals.datasets.synthetic_frame(60, 40, 600, seed=1), tmp_path / "r.zarr",
                            n_user_blocks=2, n_item_blocks=2)
    BLOCK_CACHE.clear()
    with connect(ratings=ratings, dashboard_address="127.0.0.1:0") as client:
        assert (set(client.run(os.getpid).values()) == {os.getpid()}) == in_process
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        assert sum(w["nthreads"] for w in workers) == cpu_count()  # one Dask thread per core either way
        assert set(blas_limits(client).values()) == {1}  # and one BLAS thread per Dask thread
        model = blockals.ALS(rank=3, max_iter=2).fit(store, client)
        assert np.isfinite(model.user_factors_).all()
        assert (len(BLOCK_CACHE) > 0) == in_process  # the in-process worker caches its in-blocks here
    assert len(BLOCK_CACHE) == 0  # and they go with the cluster


@pytest.fixture
def port_8787_taken():
    """Port 8787 held on every interface, as another Dask's dashboard holds it."""
    held = socket.socket()
    try:
        held.bind(("0.0.0.0", 8787))
        held.listen()
    except OSError:  # something else holds it already
        held.close()
    with pytest.raises(OSError):  # taken, whoever holds it
        socket.create_server(("127.0.0.1", 8787)).close()
    yield
    held.close()


def test_a_training_with_port_8787_taken_serves_its_dashboard_on_a_free_port(port_8787_taken, tmp_path):
    store = blockals.ingest(blockals.datasets.synthetic_frame(300, 100, 6_000, seed=3), tmp_path / "r.zarr",
                            n_user_blocks=2, n_item_blocks=2)
    train = subprocess.Popen([sys.executable, "-m", "blockals.cli", "train", store.path, str(tmp_path / "m.zarr"),
                              "--rank", "4", "--max-iter", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "DASK_SCHEDULER_ADDRESS": ""})
    first = train.stdout.readline()
    link = re.fullmatch(r"dashboard: http://127\.0\.0\.1:(\d+)/status\n", first)
    assert link and link.group(1) != "8787", first
    # Asked while the training runs (30 iterations): the printed port is the one this cluster serves.
    with urllib.request.urlopen(f"http://127.0.0.1:{link.group(1)}/health", timeout=30) as response:
        assert response.read() == b"ok"
    out, err = train.communicate(timeout=600)
    assert train.returncode == 0, err[-2000:]
    assert "already in use" not in err and "Traceback" not in err and "still alive" not in err, err
    assert blockals.ALS.load(tmp_path / "m.zarr").history_[-1]["iteration"] == 30


def test_a_started_cluster_waits_for_its_worker_processes_to_exit(tmp_path):
    # Workers that take 6 seconds to exit (as on a busy machine) are waited for, not killed
    # with "Worker process still alive after 4.0 seconds, killing" on stderr.
    script = (
        "from blockals.cluster import connect\n"
        "def slow_exit():\n"
        "    import atexit, time\n"
        "    atexit.register(time.sleep, 6)\n"
        "if __name__ == '__main__':\n"
        "    with connect(dashboard_address='127.0.0.1:0') as client:\n"
        "        client.run(slow_exit)\n"
        "    print('closed')\n"
    )
    (tmp_path / "slow.py").write_text(script)
    done = subprocess.run([sys.executable, str(tmp_path / "slow.py")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DASK_SCHEDULER_ADDRESS": ""})
    assert done.returncode == 0 and done.stdout == "closed\n", done.stderr[-2000:]
    assert done.stderr == "", done.stderr[-2000:]
