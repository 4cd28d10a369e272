"""Time per rating as the data grows: a scaled-down version of benchmarks/outofcore.py.

Users, ratings and block counts grow 4x together while the catalogue stays fixed, as from
20M to 200M MovieLens-shaped ratings: every block keeps its size, every item block is
rated by more users, and there are 4x as many blocks on each side. Work that grows with
blocks x rows (routing whole factor matrices once per block, per-task overheads) makes
the larger run cost more per rating; this test catches it. The figures that matter are
measured at full scale in benchmarks/RESULTS.md; this is the guard against regressions,
with room for this machine's run-to-run spread (1.5x where the target is 1.2x).
"""

from __future__ import annotations

import numpy as np
import pytest

import blockals
from blockals.datasets import make_store

pytestmark = pytest.mark.slow

ITEMS = 20_000
SHAPES = {"2M": (12_000, 2_000_000, 2, 3), "8M": (48_000, 8_000_000, 8, 12)}  # users, ratings, blocks


def seconds_per_iteration(store, client) -> float:
    model = blockals.ALS(rank=10, max_iter=5, reg=0.05, seed=0).fit(store, client)
    return float(np.median([h["seconds"] for h in model.history_[1:]]))  # the first reads cold


def test_time_per_rating_stays_flat_as_ratings_users_and_blocks_grow_4x(tmp_path):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="2GiB", host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        per_rating = {}
        for name, (users, ratings, user_blocks, item_blocks) in SHAPES.items():
            store = make_store(str(tmp_path / name), n_users=users, n_items=ITEMS, n_ratings=ratings,
                               n_user_blocks=user_blocks, n_item_blocks=item_blocks)
            per_rating[name] = seconds_per_iteration(store, client) / ratings
    assert per_rating["8M"] <= 1.5 * per_rating["2M"], per_rating
