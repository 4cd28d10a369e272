"""The blockals command line and the pipeline script, run as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import blockals

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def blockals_cli(*args):
    return run("-m", "blockals.cli", *args)


@pytest.fixture
def csv(tmp_path):
    rng = np.random.default_rng(0)
    pairs = pd.DataFrame({"user": rng.integers(0, 40, 400), "item": rng.integers(0, 30, 400)}).drop_duplicates()
    pairs["rating"] = rng.integers(1, 6, len(pairs)).astype(float)
    path = tmp_path / "r.csv"
    pairs.to_csv(path, index=False)
    return path, pairs


def test_ingest_info_train(csv, tmp_path):
    path, pairs = csv
    done = blockals_cli("ingest", str(path), str(tmp_path / "s.zarr"), "--n-user-blocks", "3", "--n-item-blocks", "2")
    assert done.returncode == 0, done.stderr
    assert f"{len(pairs):,} ratings" in done.stdout
    info = blockals_cli("info", str(tmp_path / "s.zarr"))
    assert info.returncode == 0 and "3 user blocks" in info.stdout and "complete" in info.stdout
    done = blockals_cli("train", str(tmp_path / "s.zarr"), str(tmp_path / "m.zarr"), "--rank", "3", "--max-iter", "2")
    assert done.returncode == 0, done.stderr
    assert "iteration   2" in done.stdout and "dashboard" in done.stdout
    model = blockals.ALS.load(tmp_path / "m.zarr")
    assert model.user_factors_.shape == (pairs["user"].nunique(), 3)


@pytest.mark.parametrize(
    "args,message",
    [
        (["ingest", "{missing}", "{out}"], "does not exist"),
        (["ingest", "{csv}", "{out}", "--rating-col", "score"], "rating column 'score' is not in the source"),
        (["ingest", "{csv}", "{out}", "--n-user-blocks", "0"], "n_user_blocks must be a positive integer"),
        (["info", "{missing}"], "is not a blockals store"),
        (["train", "{missing}", "{out}"], "is not a blockals store"),
    ],
)
def test_bad_input_exits_with_one_sentence(args, message, csv, tmp_path):
    path, _ = csv
    fill = {"missing": str(tmp_path / "nope"), "out": str(tmp_path / "o.zarr"), "csv": str(path)}
    done = blockals_cli(*[a.format(**fill) for a in args])
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "o.zarr").exists()


def test_bad_training_parameter(csv, tmp_path):
    path, _ = csv
    assert blockals_cli("ingest", str(path), str(tmp_path / "s.zarr")).returncode == 0
    done = blockals_cli("train", str(tmp_path / "s.zarr"), str(tmp_path / "m.zarr"), "--rank", "0")
    assert done.returncode == 2 and "rank must be at least 1" in done.stderr and "Traceback" not in done.stderr


def test_pipeline_default_job(tmp_path):
    # The README's main job, on its embedded default, with a LocalCluster of its own.
    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": ""}
    done = run(str(ROOT / "pipelines" / "als_pipeline.py"), "--data", str(tmp_path), "--max-iter", "4", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "Dask dashboard: http://127.0.0.1:" in out
    assert out.count("objective") == 4
    held_out = float(out.split("held-out RMSE ")[1].split()[0])
    # Better than predicting every rating with the training mean, by a clear margin.
    frame = blockals.datasets.movielens_like()
    assert held_out < 0.85 * frame["rating"].std()
    assert blockals.ALS.load(tmp_path / "model.zarr").history_[-1]["iteration"] == 4
