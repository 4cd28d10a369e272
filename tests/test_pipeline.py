"""The pipeline script's --resume: stages whose outputs are complete and whose inputs are
unchanged are skipped, changed ones run again, and training resumes from its checkpoint.

The script runs as users run it, in a subprocess, against the session's cluster
(``--scheduler``), on a small CSV source.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import blockals
from conftest import cluster_client

SCRIPT = Path(__file__).resolve().parents[1] / "pipelines" / "als_pipeline.py"


def pipeline(data: Path, source: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(data), "--source", str(source), "--stages", "ingest,split,train",
         "--scheduler", cluster_client(2).scheduler.address, *args],
        capture_output=True, text=True, timeout=600,
    )


def store_ids(data: Path) -> dict[str, str]:
    return {name: blockals.open_store(data / name).store_id for name in ("ratings.zarr", "train.zarr", "test.zarr")}


def test_resume_skips_unchanged_stages_and_reruns_changed_ones(tmp_path):
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"user": rng.integers(0, 30, 400), "item": rng.integers(0, 20, 400)}).drop_duplicates()
    frame["rating"] = rng.integers(1, 6, len(frame)).astype(float)
    source, data = tmp_path / "r.csv", tmp_path / "data"
    frame.to_csv(source, index=False)

    first = pipeline(data, source, "--max-iter", "2", "--progress")
    assert first.returncode == 0, first.stderr[-2000:]
    ids = store_ids(data)
    # Every stage reports its passes: a line each with its duration, and with --progress
    # their blocks on standard error, in plain lines since it is not a terminal here.
    ratings = blockals.open_store(data / "ratings.zarr")
    nu, ni = ratings.n_user_blocks, ratings.n_item_blocks
    for name in ("ingest", "split train", "split test"):
        assert f"{name} users: {nu}/{nu} blocks\n" in first.stderr and f"{name} items: {ni}/{ni} blocks\n" in first.stderr
        assert re.search(rf"^{name} items: {ni} blocks in \d+\.\d\d s$", first.stdout, re.M)
    assert f"iteration   2: {nu + ni}/{nu + ni} blocks\n" in first.stderr and "\r" not in first.stderr

    # Unchanged source and parameters: ingest and split are skipped, their stores are the
    # same ones, and training continues from its checkpoint at iteration 2.
    again = pipeline(data, source, "--max-iter", "3", "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert re.search(r"^ingest: .*ratings\.zarr is complete and its source and parameters are unchanged; "
                     r"skipped \(--resume\)$", again.stdout, re.M)
    assert re.search(r"^split: .* are complete and unchanged; skipped \(--resume\)$", again.stdout, re.M)
    assert "iteration   2" not in again.stdout and "iteration   3" in again.stdout
    assert store_ids(data) == ids

    # Another rank with --resume names what differs, before any stage or cluster work.
    other = pipeline(data, source, "--max-iter", "3", "--rank", "3", "--resume")
    assert other.returncode == 2 and other.stdout == "" and "Traceback" not in other.stderr
    assert other.stderr.strip().endswith("only one made with rank=10 (not rank=3); resume with rank=10, "
                                         "or train without resume."), other.stderr
    assert store_ids(data) == ids

    # The source edited in place (same path): ingest and split run again, and training,
    # whose store was rewritten, starts over.
    frame.loc[0, "rating"] = 6 - frame.loc[0, "rating"]
    frame.to_csv(source, index=False)
    changed = pipeline(data, source, "--max-iter", "2", "--resume")
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "skipped" not in changed.stdout
    assert "train: the training store was written again, so training starts from iteration 1" in changed.stdout
    assert "iteration   1" in changed.stdout
    new_ids = store_ids(data)
    assert all(new_ids[name] != ids[name] for name in ids)
    assert blockals.open_store(data / "ratings.zarr").nnz == len(frame)


def test_a_second_pipeline_on_one_data_directory_is_refused(tmp_path):
    """While a run holds --data (here this process, as a first pipeline would), another is
    refused in one line, exit 2, before it writes anything there."""
    import os

    from blockals.lock import Lease

    rng = np.random.default_rng(4)
    frame = pd.DataFrame({"user": rng.integers(0, 30, 300), "item": rng.integers(0, 20, 300)}).drop_duplicates()
    frame["rating"] = 3.0
    source, data = tmp_path / "r.csv", tmp_path / "data"
    frame.to_csv(source, index=False)
    with Lease(str(data), "pipeline data directory"):
        second = pipeline(data, source)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and second.stdout == "" and len(lines) == 1, second.stderr[-2000:]
    assert lines[0].startswith(f"als_pipeline: error: pipeline data directory {data} is being written by another "
                               f"process (process {os.getpid()} on "), lines[0]
    assert not data.exists()


def test_stores_overlapping_the_source_are_refused_before_any_stage(tmp_path):
    frame = pd.DataFrame({"user": [1, 1, 2, 3], "item": [1, 2, 2, 3], "rating": [1.0, 2.0, 3.0, 4.0]})
    (tmp_path / "src").mkdir()
    frame.to_parquet(tmp_path / "src" / "part.parquet")
    (tmp_path / "data" / "ratings.zarr").mkdir(parents=True)
    frame.to_parquet(tmp_path / "data" / "ratings.zarr" / "part.parquet")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cases = [
        (tmp_path / "src" / "out", tmp_path / "src", r"--data's ratings\.zarr .*src/out/ratings\.zarr lies inside the source .*src;"),
        (tmp_path / "data", tmp_path / "data" / "ratings.zarr", r"--data's ratings\.zarr .*data/ratings\.zarr is the source"),
    ]
    for data, source, message in cases:
        done = subprocess.run([sys.executable, str(SCRIPT), "--data", str(data), "--source", str(source),
                               "--stages", "ingest,split,train"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert re.search(message, done.stderr) and done.stderr.strip().count("\n") == 0, done.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
