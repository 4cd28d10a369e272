"""Model selection (blockals.search), against a fixed-grid loop written here.

The reference carves the same validation split with :func:`blockals.evaluation.split`,
then fits every surviving candidate *from scratch* for each rung's iterations and keeps
the best by the evaluated metric: the search, which instead runs candidates concurrently
and continues survivors from their checkpoints, must find the same scores, the same
winner and the same refitted model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from distributed import get_task_stream

import blockals
from blockals.datasets import synthetic_frame
from blockals.evaluation import evaluate, split
from blockals.search import SPLIT_SEED

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("search") / "ratings.zarr"
    return blockals.ingest(synthetic_frame(150, 80, 3000, seed=3), str(path), n_user_blocks=2, n_item_blocks=2)


def fixed_grid(store, tmp_path, client, grid, rungs, metric, implicit=False, ranking=False):
    """Successive halving by hand: fresh fits of every survivor at each rung's iterations."""
    train, held = split(store, str(tmp_path / "t.zarr"), str(tmp_path / "v.zarr"),
                        method="ratio" if ranking else "random", fraction=0.1, seed=SPLIT_SEED)
    better = (lambda s: s) if metric in ("rmse", "mae") else (lambda s: -s)
    alive, scores = list(range(len(grid))), {}
    for n, iterations in rungs:
        alive = sorted(alive, key=lambda i: better(scores[i]))[:n] if scores else alive
        for i in alive:
            model = blockals.ALS(**grid[i], implicit=implicit, max_iter=iterations, checkpoint_interval=0).fit(train, client)
            scores[i] = evaluate(model, held, train if ranking else None, client=client)[metric]
        yield iterations, {i: scores[i] for i in alive}


def test_halving_matches_fresh_fits_of_a_fixed_grid(store, tmp_path, client2):
    grid = [{"seed": 0, "rank": r, "reg": g} for r in (2, 5) for g in (0.03, 0.3)]
    with get_task_stream(client2) as stream:
        result = blockals.search(store, {"rank": [2, 5], "reg": [0.03, 0.3]}, min_iter=1, max_iter=4, factor=2,
                                 client=client2, verbose=0)
    reference = list(fixed_grid(store, tmp_path, client2, grid, [(4, 1), (2, 2), (1, 4)], "rmse"))
    table = result.candidates
    for iterations, scores in reference:
        column = table[f"rmse_it{iterations}"]
        assert sorted(column.dropna().index) == sorted(scores)  # the same survivors
        np.testing.assert_allclose([column[i] for i in scores], list(scores.values()), rtol=1e-5)
    (winner,) = reference[-1][1]
    assert result.best_params == {**grid[winner], "implicit": False, "max_iter": 4}
    assert table["iterations"].tolist() == [4 if i == winner else 2 if i in reference[1][1] else 1 for i in range(4)]
    fresh = blockals.ALS(**result.best_params, checkpoint_interval=0).fit(store, client2)
    np.testing.assert_allclose(result.best_model.user_factors_, fresh.user_factors_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.best_model.item_factors_, fresh.item_factors_, rtol=1e-4, atol=1e-5)
    keys = {t["key"] for t in stream.data}
    assert any(k.startswith("blockals-search-solve-users-") for k in keys), sorted(keys)[:5]
    assert not os.path.exists(f"{store.path}/search")  # the split and checkpoints are gone


def test_ranking_metric_holds_out_ratings_per_user(store, tmp_path, client2):
    grid = [{"seed": 0, "alpha": a} for a in (1.0, 20.0)]
    result = blockals.search(store, {"alpha": [1.0, 20.0]}, implicit=True, min_iter=2, max_iter=2, client=client2,
                             verbose=0)
    ((_, scores),) = fixed_grid(store, tmp_path, client2, grid, [(2, 2)], "ndcg@10", implicit=True, ranking=True)
    assert result.metric == "ndcg@10"
    np.testing.assert_allclose(result.candidates["ndcg@10_it2"].to_numpy(), [scores[0], scores[1]], rtol=1e-5)
    assert result.best_params["alpha"] == grid[max(scores, key=scores.get)]["alpha"]


@pytest.mark.parametrize("kwargs,message", [
    ({"space": {}}, "space is empty"),
    ({"space": {"rnak": [4]}}, "space has unknown parameter 'rnak'; did you mean 'rank'?"),
    ({"space": {"rank": []}}, "space gives rank no value"),
    ({"space": {"reg": [0.1, -1.0]}}, "space: reg must be at least 0, got -1."),
    ({"space": {"max_iter": [5]}}, "space cannot hold max_iter"),
    ({"space": {"biases": [True]}, "implicit": True}, "biases=True applies to explicit feedback"),
    ({"validation": 1.0}, "validation=1 leaves no training rating"),
    ({"space": {"rank": [2, 4]}, "min_iter": 2, "budget": 3}, "budget=3 is too small for one rung: 2 candidates x 2"),
    ({"metric": "ndgc@10"}, "unknown metric 'ndgc@10'; did you mean 'ndcg@10'?"),
    ({"min_iter": 5, "max_iter": 3}, "max_iter must be at least 5, got 3."),
])
def test_bad_input_is_refused_before_any_work(store, kwargs, message):
    with pytest.raises(blockals.InputError) as info:
        blockals.search(store, **kwargs)  # no client: refused before a cluster would start
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not os.path.exists(f"{store.path}/search")


def test_rungs_past_the_budget_are_not_run(store, client2, tmp_path):
    result = blockals.search(store, {"rank": [2, 3, 4, 5]}, min_iter=1, max_iter=4, factor=2, budget=7,
                             client=client2, verbose=0)
    # 4 x 1 + 2 x 1 more fit in 7; the last rung (1 x 2 more) would not.
    assert sorted(result.candidates["iterations"]) == [1, 1, 2, 2]
    assert result.best_params["max_iter"] == 2 and len(result.rungs) == 2
    fig = result.plot(str(tmp_path / "search.png"))  # one line per candidate, through its rungs' scores
    assert (tmp_path / "search.png").stat().st_size > 0
    lines = fig.axes[0].lines
    assert [list(line.get_xdata()) for line in lines] == [[1, 2]] * 4
    np.testing.assert_array_equal(np.array([line.get_ydata() for line in lines], dtype=float),
                                  result.candidates[["rmse_it1", "rmse_it2"]].to_numpy())


def cli(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "blockals.cli", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_cli_refuses_in_one_line_and_keeps_the_model(store, tmp_path, client2):
    model = tmp_path / "model.zarr"
    blockals.ALS(rank=2, max_iter=1, checkpoint_interval=0).fit(store, client2).save(str(model))
    before = sorted((p, p.stat().st_mtime_ns) for p in model.rglob("*"))
    out, err = cli("search", store.path, model, "--space", '{"rnak": [2]}').communicate(timeout=120)
    assert err.strip() == "blockals: error: space has unknown parameter 'rnak'; did you mean 'rank'?", err
    assert sorted((p, p.stat().st_mtime_ns) for p in model.rglob("*")) == before


@pytest.mark.slow  # two searches from the command line: about a minute
def test_interrupted_search_leaves_nothing_and_reruns(store, tmp_path):
    model, table = tmp_path / "best.zarr", tmp_path / "candidates.csv"
    args = ("search", store.path, model, "--space", '{"rank": [2, 3, 4, 5], "reg": [0.05, 0.5]}', "--min-iter", "1",
            "--max-iter", "9", "--candidates", table)
    run = cli(*args)
    for line in run.stdout:  # interrupted once the first rung is scored, with the survivors training
        if line.startswith("rung 1/"):
            run.send_signal(signal.SIGINT)
            break
    run.communicate(timeout=120)
    assert run.returncode == 130
    assert not model.exists() and not table.exists() and not os.path.exists(f"{store.path}/search")
    out, err = cli(*args).communicate(timeout=300)
    assert "model written to" in out, err
    assert blockals.ALS.load(str(model)).max_iter == 9
    assert len(table.read_text().splitlines()) == 9  # a header and eight candidates


@pytest.mark.slow  # the pipeline's subprocess starts its own cluster
def test_pipeline_search_stage(store, tmp_path):
    config = tmp_path / "search.yaml"
    config.write_text("search:\n  enabled: true\n  space: {rank: [2, 3]}\n  min_iter: 1\n  max_iter: 2\n")
    data = tmp_path / "data"
    blockals.evaluation.split(store, str(data / "train.zarr"), str(data / "test.zarr"), fraction=0.2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DASK_SCHEDULER_ADDRESS": ""}
    done = subprocess.run([sys.executable, str(ROOT / "pipelines" / "als_pipeline.py"), "--config", str(config),
                           "--data", str(data), "--stages", "search,evaluate", "--dashboard-address", "127.0.0.1:0"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| search |" in done.stdout and "| evaluate |" in done.stdout
    assert blockals.ALS.load(str(data / "model.zarr")).max_iter == 2
    assert len((data / "search.csv").read_text().splitlines()) == 3
    config.write_text("search:\n  enabled: true\n  space: {rank: [2]}\n  budjet: 4\n")
    done = subprocess.run([sys.executable, str(ROOT / "pipelines" / "als_pipeline.py"), "--config", str(config),
                           "--data", str(data)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "unknown key 'budjet' in section 'search'; did you mean 'budget'?" in done.stderr
