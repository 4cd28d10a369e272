"""Stores and models on S3: a real S3 API (moto's server) on 127.0.0.1, no local files."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pandas as pd
import pytest

import blockals
from blockals.errors import LeaseError
from blockals.lock import Lease

s3fs = pytest.importorskip("s3fs", reason="S3 support is in the 's3' extra: pip install -e '.[s3]'")


@pytest.fixture(scope="module")
def s3(s3_endpoint):
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "eu-west-1"}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("blockals-test")
    return fs, options


def test_ingest_train_save_load_recommend_on_s3(s3, client2, tmp_path, monkeypatch):
    fs, options = s3
    monkeypatch.chdir(tmp_path)  # anything written locally by mistake would land here
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"user": rng.integers(0, 60, 900), "item": rng.integers(0, 40, 900)}).drop_duplicates()
    frame["rating"] = rng.integers(1, 6, len(frame)).astype(float)
    store = blockals.ingest(frame, "s3://blockals-test/ratings.zarr", n_user_blocks=3, n_item_blocks=2,
                            storage_options=options)
    assert fs.exists("blockals-test/ratings.zarr/zarr.json")
    model = blockals.ALS(rank=3, max_iter=3, reg=0.1, dtype="float64").fit(store, client2)
    assert fs.exists("blockals-test/ratings.zarr/checkpoints")
    model.save("s3://blockals-test/model.zarr", storage_options=options)
    loaded = blockals.ALS.load("s3://blockals-test/model.zarr", storage_options=options)
    np.testing.assert_array_equal(loaded.user_factors_, model.user_factors_)
    recs = loaded.recommend([0, 1], n=3, seen=store)
    seen = frame.groupby("user")["item"].apply(set)
    assert all(item not in seen[user] for user, item in zip(recs["user"], recs["item"]))
    assert list(tmp_path.iterdir()) == []
    # The same model trained from a local copy of the data.
    local = blockals.ALS(rank=3, max_iter=3, reg=0.1, dtype="float64").fit(
        blockals.ingest(frame, tmp_path / "local.zarr", n_user_blocks=3, n_item_blocks=2), client2)
    np.testing.assert_allclose(local.user_factors_, model.user_factors_, atol=1e-10)


@pytest.mark.slow  # every pipeline stage over S3; the API round trip above runs in CI
def test_pipeline_writes_every_stage_to_s3(s3, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    fs, options = s3
    endpoint = options["client_kwargs"]["endpoint_url"]
    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": "", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "eu-west-1"}
    script = Path(__file__).resolve().parents[1] / "pipelines" / "als_pipeline.py"
    done = subprocess.run([sys.executable, str(script), "--data", "s3://blockals-test/run", "--max-iter", "2"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("ratings.zarr", "train.zarr", "test.zarr", "model.zarr", "recommendations.zarr"):
        assert fs.exists(f"blockals-test/run/{name}/zarr.json"), name
    assert fs.exists("blockals-test/run/metrics.json")
    model = blockals.ALS.load("s3://blockals-test/run/model.zarr", storage_options=options)
    assert model.history_[-1]["iteration"] == 2
    assert list(tmp_path.iterdir()) == []



class _Holder(threading.Thread):
    """A thread (standing for another process) that takes the lease and holds it until released."""

    def __init__(self, path: str, options: dict, shared: bool, start: threading.Barrier | None = None,
                 break_lease: bool = False) -> None:
        super().__init__(daemon=True)  # a failing test does not wait for it
        self.lease = Lease(path, "ratings store", options, shared=shared, break_lease=break_lease)
        self.barrier, self.taken, self.done = start, threading.Event(), threading.Event()
        self.refusal: str | None = None

    def run(self) -> None:
        if self.barrier is not None:
            self.barrier.wait()
        try:
            self.lease.acquire()
        except LeaseError as exc:
            self.refusal = str(exc)
            return
        finally:
            self.taken.set()
        self.done.wait()
        self.lease.release()

    def release(self) -> None:
        self.done.set()
        self.join()


def _hold(path: str, options: dict, shared: bool, break_lease: bool = False) -> _Holder:
    holder = _Holder(path, options, shared, break_lease=break_lease)
    holder.start()
    holder.taken.wait()
    return holder


def _refusal(path: str, options: dict, shared: bool) -> str | None:
    holder = _hold(path, options, shared)
    holder.release()
    return holder.refusal


def test_leases_on_s3_readers_share_writers_exclude_and_break(s3):
    fs, options = s3
    path = "s3://blockals-test/leased.zarr"
    readers = [_hold(path, options, shared=True) for _ in range(2)]
    assert [r.refusal for r in readers] == [None, None]  # readers coexist
    refused = _refusal(path, options, shared=False)
    assert refused.startswith(f"ratings store {path} is being read by 2 other processes (process {os.getpid()} ")
    assert refused.endswith(f"if those processes are dead, pass break_lease=True (--break-lease) or delete {path}.lock, "
                            f"else wait for them to finish.")
    for r in readers:
        r.release()
    fs.invalidate_cache()
    assert fs.find("blockals-test/leased.zarr.lock") == []  # each reader removed its own object

    writer = _hold(path, options, shared=False)
    assert writer.refusal is None
    for shared in (True, False):
        refused = _refusal(path, options, shared)
        assert refused.startswith(f"ratings store {path} is being written by another process (process {os.getpid()} ")
    # The writer stands for one that died holding it: a reader breaks it; then a writer
    # breaks in too, clearing the readers.
    breaker = _hold(path, options, shared=True, break_lease=True)
    assert breaker.refusal is None
    assert _refusal(path, options, shared=True) is None
    taker = Lease(path, "ratings store", options, break_lease=True)
    taker.acquire()
    writer.release()  # the broken holder, back: it must not delete its successor's lease
    fs.invalidate_cache()
    assert fs.find("blockals-test/leased.zarr.lock") == ["blockals-test/leased.zarr.lock/exclusive"]
    assert taker.holder.token in fs.cat_file("blockals-test/leased.zarr.lock/exclusive").decode()
    taker.release()
    breaker.release()  # its object was cleared by the taker: nothing to remove, no error
    fs.invalidate_cache()
    assert fs.find("blockals-test/leased.zarr.lock") == []


def test_a_racing_reader_and_writer_on_s3_are_never_both_admitted(s3):
    fs, options = s3
    path = "s3://blockals-test/raced.zarr"
    outcomes = []
    for _ in range(200):
        start = threading.Barrier(2)
        pair = [_Holder(path, options, shared, start) for shared in (True, False)]
        for h in pair:
            h.start()
        for h in pair:
            h.taken.wait()
        outcomes.append(sum(h.refusal is None for h in pair))
        for h in pair:
            h.release()
    # Never both; one of them in some races, both refused in others (each saw the other's
    # object before it was withdrawn), which the lease allows.
    assert max(outcomes) == 1 and 1 in outcomes
    fs.invalidate_cache()
    assert fs.find("blockals-test/raced.zarr.lock") == []


def test_a_failed_ingest_over_an_s3_store_leaves_it_loadable(s3, tmp_path, monkeypatch):
    fs, options = s3
    monkeypatch.chdir(tmp_path)
    path = "s3://blockals-test/swap.zarr"

    def pairs(store):
        rows = [store.triples("users", b) for b in range(store.n_user_blocks)]
        return {(store.user_ids[u], store.item_ids[i], r) for u, i, r in zip(*map(np.concatenate, zip(*rows)))}

    first = pd.DataFrame({"user": [1, 1, 2, 3, 4], "item": [1, 2, 2, 3, 1], "rating": [1.0, 2.0, 3.0, 4.0, 5.0]})
    blockals.ingest(first, path, n_user_blocks=2, n_item_blocks=2, storage_options=options)
    repeated = pd.DataFrame({"user": [7, 8, 7], "item": [1, 2, 1], "rating": [1.0, 2.0, 3.0]})
    with pytest.raises(blockals.InputError, match=r"duplicate \(user, item\) pair"):
        blockals.ingest(repeated, path, overwrite=True, storage_options=options)
    expected = set(zip(first["user"], first["item"], first["rating"]))
    assert pairs(blockals.open_store(path, storage_options=options)) == expected
    second = pd.DataFrame({"user": [5, 6], "item": [9, 9], "rating": [0.5, 1.5]})
    store = blockals.ingest(second, path, overwrite=True, storage_options=options)
    assert pairs(store) == set(zip(second["user"], second["item"], second["rating"]))
    fs.invalidate_cache()
    assert not [p for p in fs.ls("blockals-test") if p.rsplit("/", 1)[-1].startswith(".swap.zarr.")]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a minute of copies on moto; the failed-ingest test above keeps S3 swaps in the default run
def test_a_move_on_s3_cut_short_leaves_the_target_incomplete_and_the_source_whole(s3, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    fs, options = s3
    source, target = "s3://blockals-test/moving.zarr", "s3://blockals-test/moved.zarr"
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"user": rng.integers(0, 300, 3000), "item": rng.integers(0, 200, 3000)}).drop_duplicates()
    frame["rating"] = 1.0
    blockals.ingest(frame, source, n_user_blocks=12, n_item_blocks=12, storage_options=options)
    n_objects = len(fs.find("blockals-test/moving.zarr"))
    mover = subprocess.Popen(
        [sys.executable, "-c", "import json, sys; from blockals.formats import move_path; "
                               "move_path(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))",
         source, target, json.dumps(options)], env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:  # until part of the tree is copied
        fs.invalidate_cache()
        copied = fs.find("blockals-test/moved.zarr")
        if len(copied) > n_objects // 4:
            break
        assert mover.poll() is None and time.monotonic() < deadline, "the move ended before it could be cut short"
        time.sleep(0.05)
    mover.send_signal(signal.SIGKILL)
    mover.wait()
    fs.invalidate_cache()
    assert "blockals-test/moved.zarr/zarr.json" in fs.find("blockals-test/moved.zarr")  # marked, as incomplete
    with pytest.raises(blockals.StoreError, match=r"moved\.zarr is incomplete"):
        blockals.open_store(target, storage_options=options)
    assert blockals.open_store(source, storage_options=options).nnz == len(frame)
