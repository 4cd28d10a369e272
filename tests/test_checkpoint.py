"""Checkpoints: factor blocks read back as written, and checked against recorded shapes."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

import blockals
from blockals.checkpoint import Checkpoint, write_block

BLOCK_ROWS = {"users": [3, 2], "items": [4]}
WIDTH = 5


def started(path, **shapes) -> Checkpoint:
    ckpt = Checkpoint(str(path), "store-id", {"rank": 4}, **shapes)
    ckpt.start()
    return ckpt


def test_blocks_read_back_as_written_and_survive_a_commit(tmp_path):
    ckpt = started(tmp_path / "c", block_rows=BLOCK_ROWS, width=WIDTH)
    rng = np.random.default_rng(0)
    written = {(side, b): rng.random((n, WIDTH)) for side, rows in BLOCK_ROWS.items() for b, n in enumerate(rows)}
    for (side, b), factors in written.items():
        write_block(ckpt.path, None, 1, side, b, factors)
    ckpt.commit(1, 1, [{"iteration": 1}])
    resumed = Checkpoint(ckpt.path, "store-id", {"rank": 4})  # made without shapes: reads the recorded ones
    assert resumed.load().slot == 1
    for (side, b), factors in written.items():
        np.testing.assert_array_equal(resumed.read_block(1, side, b), factors)


@pytest.mark.parametrize("shape", [(2, WIDTH), (3, WIDTH - 1), (3,)], ids=["rows", "width", "1-D"])
def test_a_block_of_another_shape_is_refused_naming_it(shape, tmp_path):
    ckpt = started(tmp_path / "c", block_rows=BLOCK_ROWS, width=WIDTH)
    write_block(ckpt.path, None, 0, "users", 0, np.ones(shape))
    ckpt.commit(1, 0, [])  # a commit keeps the recorded shapes
    message = f"c/slot0/users/0 has shape {shape}, but the checkpoint records (3, {WIDTH}); it is damaged."
    with pytest.raises(blockals.StoreError, match=re.escape(message)):
        ckpt.read_block(0, "users", 0)


def test_a_checkpoint_without_shapes_reads_unchecked(tmp_path):
    ckpt = started(tmp_path / "c")
    write_block(ckpt.path, None, 0, "items", 0, np.ones((7, 2)))
    assert ckpt.read_block(0, "items", 0).shape == (7, 2)


def test_rows_and_width_are_given_together():
    with pytest.raises(ValueError, match=r"block_rows and width together"):
        Checkpoint("c", "store-id", {}, block_rows=BLOCK_ROWS)


def test_a_checkpoint_path_overlapping_the_ratings_store_is_refused_before_training(tmp_path):
    frame = pd.DataFrame({"user": [1, 1, 2, 3], "item": [1, 2, 2, 3], "rating": [1.0, 2.0, 3.0, 4.0]})
    store = blockals.ingest(frame, tmp_path / "r.zarr")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for path, relation in ((tmp_path / "r.zarr", "is"), (tmp_path / "r.zarr" / "users" / "ck", "lies inside"),
                           (tmp_path, "contains")):
        with pytest.raises(blockals.InputError, match=rf"the checkpoint path .* {relation} the ratings store .*r\.zarr;"):
            blockals.ALS(rank=2, max_iter=1, checkpoint_interval=1).fit(store, checkpoint_path=str(path))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
