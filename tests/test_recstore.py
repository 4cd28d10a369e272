"""Recommendation stores: what the writer recorded is what the reader returns, and a store
that was cut short or edited is refused with the block named."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import zarr

import blockals
from blockals import recstore
from conftest import dask_processes

USER_IDS = np.array([5, 6, 7, 8])
ITEM_IDS = np.array(["a", "b", "c"], dtype=object)
# Two user blocks; user 8 has one candidate only (-1 and NaN pad its row).
BLOCKS = [
    (np.array([0, 2]), np.array([[2, 0], [1, 2]]), np.array([[0.9, 0.5], [0.7, 0.1]])),
    (np.array([1, 3]), np.array([[0, 1], [2, -1]]), np.array([[0.3, 0.2], [0.8, np.nan]])),
]


def written(path):
    recstore.create(str(path), 2, len(BLOCKS), USER_IDS, ITEM_IDS)
    for b, (users, items, scores) in enumerate(BLOCKS):
        recstore.write_block(str(path), None, b, users, items, scores)
    recstore.commit(str(path))
    return path


def test_reader_returns_what_was_written(tmp_path):
    got = recstore.read_recommendations(written(tmp_path / "r.zarr"))
    rows = []
    for users, items, scores in BLOCKS:
        for u, its, scs in zip(users, items, scores):
            rows += [(USER_IDS[u], rank + 1, ITEM_IDS[i], s) for rank, (i, s) in enumerate(zip(its, scs)) if i >= 0]
    expected = pd.DataFrame(rows, columns=["user", "rank", "item", "score"]).sort_values(["user", "rank"], ignore_index=True)
    pd.testing.assert_frame_equal(got[["user", "rank", "item"]], expected[["user", "rank", "item"]], check_dtype=False)
    np.testing.assert_allclose(got["score"], expected["score"], rtol=1e-6)


def test_a_store_whose_writing_was_cut_short_is_refused(tmp_path):
    path = tmp_path / "r.zarr"
    recstore.create(str(path), 2, len(BLOCKS), USER_IDS, ITEM_IDS)
    recstore.write_block(str(path), None, 0, *BLOCKS[0])
    with pytest.raises(blockals.StoreError, match=r"r\.zarr is incomplete"):
        recstore.read_recommendations(path)


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("items", np.array([[0, 1, 2], [2, 1, 0]]), r"blocks/1 does not hold 2 recommendations for each of its 2 users"),
        ("users", np.array([1, 9]), r"blocks/1 refers to users or items that .* do not hold"),
        ("items", np.array([[0, 1], [2, 7]]), r"blocks/1 refers to users or items"),
    ],
)
def test_an_edited_block_is_refused(name, value, match, tmp_path):
    path = written(tmp_path / "r.zarr")
    group = zarr.open_group(str(path / "blocks" / "1"), mode="r+")
    del group[name]
    group.create_array(name, data=value)
    with pytest.raises(blockals.StoreError, match=match):
        recstore.read_recommendations(path)


def test_never_written_over_something_else(tmp_path):
    (tmp_path / "r.zarr").mkdir()
    (tmp_path / "r.zarr" / "keep.txt").write_text("x")
    with pytest.raises(blockals.InputError, match=r"not a blockals recommendations store; refusing to write over it"):
        recstore.create(str(tmp_path / "r.zarr"), 2, 1, USER_IDS, ITEM_IDS)
    assert (tmp_path / "r.zarr" / "keep.txt").exists()


def test_recommend_all_refuses_an_output_inside_its_ratings_store(tmp_path):
    from blockals.recommend import recommend_all

    frame = pd.DataFrame({"user": [5, 5, 6, 7], "item": [1, 2, 2, 3], "rating": [1.0, 2.0, 3.0, 4.0]})
    store = blockals.ingest(frame, tmp_path / "r.zarr")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    F, G = np.ones((3, 2)), np.ones((3, 2))
    for output, relation in ((tmp_path / "r.zarr" / "recs.zarr", "lies inside"), (tmp_path / "r.zarr", "is"),
                             (tmp_path, "contains")):
        with pytest.raises(blockals.InputError, match=rf"the output .* {relation} the ratings store .*r\.zarr;"):
            recommend_all(store, "users", F, G, None, store.user_ids.to_numpy(), store.item_ids.to_numpy(), 2,
                          str(output), "zarr")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.fixture
def worker_elsewhere(tmp_path):
    """A real scheduler and one worker process started in a directory of its own."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with dask_processes(tmp_path, 1, cwd=elsewhere) as client:
        yield client, elsewhere


def test_a_relative_output_lands_beside_the_caller_not_the_workers(worker_elsewhere, tmp_path):
    client, elsewhere = worker_elsewhere
    caller = tmp_path / "caller"
    caller.mkdir()
    rng = np.random.default_rng(0)
    pairs = rng.choice(12 * 8, 40, replace=False)
    frame = pd.DataFrame({"user": pairs // 8, "item": pairs % 8, "rating": rng.integers(1, 6, 40).astype(float)})
    store = blockals.ingest(frame, caller / "r.zarr", n_user_blocks=2, n_item_blocks=2)
    model = blockals.ALS(rank=2, max_iter=2, seed=0).fit(store, client=client)
    model.save(caller / "m.zarr")
    command = [sys.executable, "-m", "blockals.cli", "recommend", "m.zarr", "--output", "recs.zarr", "--n", "3",
               "--scheduler", client.scheduler.address]
    done = subprocess.run(command, cwd=caller, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = recstore.read_recommendations(caller / "recs.zarr")
    assert sorted(set(got["user"])) == sorted(set(frame["user"])) and len(got) <= 3 * frame["user"].nunique()
    assert list(elsewhere.iterdir()) == [] or all("dask-scratch" in p.name for p in elsewhere.iterdir())
    assert sorted(p.name for p in caller.iterdir()) == ["m.zarr", "r.zarr", "recs.zarr"]
