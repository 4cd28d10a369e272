"""The blockals command line and the pipeline script, run as a user runs them."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import threading
import tty
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import blockals
from blockals.cli import main
from blockals.recstore import read_recommendations

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
    # By default, as train prints a line per iteration: a line per pass with its duration.
    for line in ("ingest scan: 1 partitions", "ingest stage: 1 partitions", "ingest users: 3 blocks",
                 "ingest items: 2 blocks"):
        assert re.search(rf"^{line} in \d+\.\d\d s$", done.stdout, re.M), done.stdout
    assert done.stderr == ""
    info = blockals_cli("info", str(tmp_path / "s.zarr"))
    assert info.returncode == 0 and "3 user blocks" in info.stdout and "complete" in info.stdout
    done = blockals_cli("train", str(tmp_path / "s.zarr"), str(tmp_path / "m.zarr"), "--rank", "3", "--max-iter", "2")
    assert done.returncode == 0, done.stderr
    assert "iteration   2" in done.stdout and "dashboard" in done.stdout
    model = blockals.ALS.load(tmp_path / "m.zarr")
    assert model.user_factors_.shape == (pairs["user"].nunique(), 3)


def test_split_train_evaluate_recommend(csv, tmp_path):
    path, pairs = csv
    s, tr, te, m = (str(tmp_path / n) for n in ("s.zarr", "train.zarr", "test.zarr", "m.zarr"))
    assert blockals_cli("ingest", str(path), s).returncode == 0
    done = blockals_cli("split", s, tr, te, "--method", "ratio", "--fraction", "0.25", "--progress")
    assert done.returncode == 0, done.stderr
    n_user_blocks, n_item_blocks = blockals.open_store(s).n_user_blocks, blockals.open_store(s).n_item_blocks
    for name in ("train", "test"):
        assert f"split {name} users: {n_user_blocks}/{n_user_blocks} blocks\n" in done.stderr
        assert f"split {name} items: {n_item_blocks}/{n_item_blocks} blocks\n" in done.stderr
        assert re.search(rf"^split {name} items: {n_item_blocks} blocks in \d+\.\d\d s$", done.stdout, re.M)
    assert "\r" not in done.stderr
    done = blockals_cli("train", tr, m, "--rank", "3", "--max-iter", "3", "--implicit", "--alpha", "2",
                        "--progress", "--report", str(tmp_path / "report.html"), "--plot", str(tmp_path / "loss.png"))
    assert done.returncode == 0, done.stderr
    blocks = blockals.open_store(tr).n_user_blocks + blockals.open_store(tr).n_item_blocks
    assert done.stderr.count(f"{blocks}/{blocks} blocks") == 3  # the progress ends each iteration
    assert "\r" not in done.stderr  # standard error is not a terminal here: plain lines, as in a log
    assert (tmp_path / "report.html").stat().st_size > 1000
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = blockals.ALS.load(m)
    assert model.implicit and model.alpha == 2.0 and len(model.history_) == 3
    done = blockals_cli("evaluate", m, te, "--train", tr, "--k", "5", "--json", str(tmp_path / "metrics.json"),
                        "--progress")
    assert done.returncode == 0, done.stderr
    assert "precision@5" in done.stdout
    assert done.stderr.endswith(f"evaluate: {n_user_blocks}/{n_user_blocks} blocks\n") and "\r" not in done.stderr
    assert re.search(rf"^evaluate: {n_user_blocks} blocks in \d+\.\d\d s$", done.stdout, re.M)
    assert json.loads((tmp_path / "metrics.json").read_text())["n_test_ratings"] > 0
    user = str(pairs["user"].iloc[0])
    done = blockals_cli("recommend", m, "--users", user, "--n", "4")
    assert done.returncode == 0, done.stderr
    expected = model.recommend([int(user)], n=4)
    assert done.stdout.split()[4:] == expected.to_string(index=False).split()[4:]
    done = blockals_cli("recommend", m, "--output", str(tmp_path / "recs.zarr"), "--n", "2", "--progress")
    assert done.returncode == 0 and read_recommendations(tmp_path / "recs.zarr")["rank"].max() == 2
    assert done.stderr.endswith(f"recommend users: {n_user_blocks}/{n_user_blocks} blocks\n"), done.stderr
    done = blockals_cli("recommend", m, "--output", str(tmp_path / "users.parquet"), "--n", "2", "--side", "items")
    assert done.returncode == 0 and "users for every item" in done.stdout, done.stderr
    expected = model.recommend_all(2, side="items")
    got = pd.read_parquet(tmp_path / "users.parquet").sort_values(["item", "rank"], ignore_index=True)
    pd.testing.assert_frame_equal(got, expected.sort_values(["item", "rank"], ignore_index=True), check_dtype=False)


def test_progress_on_a_terminal_is_a_bar_redrawn_in_place(csv, tmp_path):
    from test_ingest import assert_store_holds

    path, pairs = csv
    master, terminal = pty.openpty()
    tty.setraw(terminal)  # the bytes as written, without the terminal turning \n into \r\n
    proc = subprocess.Popen([sys.executable, "-m", "blockals.cli", "ingest", str(path), str(tmp_path / "s.zarr"),
                             "--n-user-blocks", "3", "--n-item-blocks", "2", "--progress"],
                            stdout=subprocess.PIPE, stderr=terminal, text=True)
    os.close(terminal)
    written = []

    def drain():  # read as it comes, so a full terminal buffer never blocks the command
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the command has closed the terminal
                return
            if not data:
                return
            written.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    out = proc.communicate(timeout=600)[0]
    reader.join(timeout=60)
    os.close(master)
    err = b"".join(written).decode()
    assert proc.returncode == 0, err
    for step, total in (("users", 3), ("items", 2)):
        bars = "".join(rf"\ringest {step} \[{'#' * (30 * d // total):<30}\] {d}/{total} blocks"
                       for d in range(1, total + 1))
        assert re.search(bars + "\n", err), err  # redrawn in place, then a newline
    assert "ingest users: 3 blocks in " in out  # the pass lines stay on standard output
    assert_store_holds(blockals.open_store(tmp_path / "s.zarr"), pairs)


def test_version_names_blockals_and_its_engine():
    from importlib.metadata import version

    done = blockals_cli("--version")
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 1
    assert done.stdout.startswith(f"blockals {version('blockals')} (")
    for name in ("dask", "distributed", "zarr", "numba", "numpy"):
        assert f"{name} {version(name)}" in done.stdout


def test_info_reports_an_incomplete_store(csv, tmp_path):
    path, _ = csv
    store = tmp_path / "s.zarr"
    assert blockals_cli("ingest", str(path), str(store)).returncode == 0
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["blockals"]["complete"] = False
    (store / "zarr.json").write_text(json.dumps(meta))
    done = blockals_cli("info", str(store))
    assert done.returncode == 1 and "INCOMPLETE" in done.stdout and "Traceback" not in done.stderr


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


PIPELINE = str(ROOT / "pipelines" / "als_pipeline.py")


def test_pipeline_default_job(tmp_path):
    # The README's main job, on its embedded default, with a LocalCluster of its own.
    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": ""}
    done = run(PIPELINE, "--data", str(tmp_path), "--max-iter", "4", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert out.splitlines()[0].startswith("Dask dashboard: http://127.0.0.1:")
    assert sum(line.startswith("iteration ") for line in out.splitlines()) == 4
    for stage in ("ingest", "split", "train", "evaluate", "recommend"):
        assert f"| {stage} |" in out
    for line in ("ingest users", "split train items", "split test users", "evaluate", "recommend users"):
        assert re.search(rf"^{line}: \d+ blocks in \d+\.\d\d s$", out, re.M), out  # each stage's passes
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # Better than predicting every rating with one constant, by a clear margin.
    frame = blockals.datasets.movielens_like()
    assert metrics["rmse"] < 0.85 * frame["rating"].std()
    model = blockals.ALS.load(tmp_path / "model.zarr")
    assert model.history_[-1]["iteration"] == 4
    # Beside the metrics: every parameter the run used, the versions, the history, a plot and a report.
    from importlib.metadata import version

    assert metrics["parameters"]["model"]["max_iter"] == 4 and metrics["parameters"]["split"]
    assert metrics["versions"]["blockals"] == version("blockals") and metrics["versions"]["dask"] == version("dask")
    assert [h["loss"] for h in metrics["history"]] == [h["loss"] for h in model.history_]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.html").read_text()
    assert f"{metrics['rmse']:.6g}" in report and "model.max_iter" in report and "data:image/png;base64," in report
    recs = read_recommendations(tmp_path / "recommendations.zarr")
    assert recs["user"].nunique() == frame["user"].nunique()


@pytest.mark.slow  # the default pipeline job above runs in CI
def test_pipeline_config_flags_and_single_stages(tmp_path):
    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": ""}
    config = ROOT / "pipelines" / "configs" / "implicit.yaml"
    done = run(PIPELINE, "--config", str(config), "--data", str(tmp_path), "--rank", "4", "--max-iter", "2",
               "--stages", "ingest,split,train", "--dashboard-address", "127.0.0.1:0", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    dashboard = done.stdout.splitlines()[0]
    assert dashboard.startswith("Dask dashboard: http://127.0.0.1:") and ":8787/" not in dashboard
    model = blockals.ALS.load(tmp_path / "model.zarr")
    assert model.rank == 4 and model.implicit and model.solver == "cg"
    assert not (tmp_path / "metrics.json").exists()
    done = run(PIPELINE, "--config", str(config), "--data", str(tmp_path), "--stages", "evaluate", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "metrics.json").read_text())["n_ranked_users"] > 0


@pytest.mark.parametrize("args,message", [
    (["train"], "blockals train: error: the following arguments are required: store, model; see 'blockals train --help'."),
    (["ingest", "r.csv", "s.zarr", "--n-user-blocks", "x"],
     "blockals ingest: error: argument --n-user-blocks: invalid int value: 'x'; see 'blockals ingest --help'."),
    (["frobnicate"], "blockals: error: argument COMMAND: invalid choice: 'frobnicate'"),
])
def test_usage_errors_are_one_line(args, message, capsys):
    # One line naming the argument, not argparse's whole usage text before it.
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err


@pytest.mark.parametrize("args,message", [
    (["--rank", "x"], "als_pipeline: error: argument --rank: invalid int value: 'x'; see 'als_pipeline --help'."),
    (["--stages", "train,deploy"], "--stages has 'deploy'"),
    (["--config", "/nonexistent.yaml"], "config file /nonexistent.yaml cannot be read"),
    (["--rank", "0", "--stages", "ingest,split,train"], "rank must be at least 1"),
])
def test_pipeline_bad_input(args, message, tmp_path):
    done = run(PIPELINE, "--data", str(tmp_path), *args, env={**os.environ, "DASK_SCHEDULER_ADDRESS": ""})
    assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
