"""The Dask dashboard shows training as the algorithm's stages."""

from __future__ import annotations

import urllib.request

import numpy as np
import pandas as pd
from distributed import Client, LocalCluster

import blockals


def test_dashboard_serves_and_task_prefixes_name_the_stages(tmp_path):
    rng = np.random.default_rng(0)
    # Sparse enough that item blocks need under half of each user block: those pairs get route tasks.
    frame = pd.DataFrame({"user": rng.integers(0, 20000, 3000), "item": rng.integers(0, 100, 3000)}).drop_duplicates()
    frame["rating"] = rng.integers(1, 6, len(frame)).astype(float)
    store = blockals.ingest(frame, tmp_path / "r.zarr", n_user_blocks=3, n_item_blocks=2)
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        model = blockals.ALS(rank=3, max_iter=2, implicit=True).fit(store, client)
        model.recommend_all(3, tmp_path / "recs", client=client)
        with urllib.request.urlopen(client.dashboard_link, timeout=30) as response:
            assert response.status == 200
            assert b"Dask" in response.read()
        prefixes = client.run_on_scheduler(lambda dask_scheduler: set(dask_scheduler.task_prefixes))
    for stage in ("blockals-init-users", "blockals-route-items", "blockals-gram-items",
                  "blockals-gramsum-items", "blockals-solve-items", "blockals-solve-users", "blockals-loss-users",
                  "blockals-checkpoint-items", "blockals-restart-users", "blockals-recommend-users"):
        assert stage in prefixes, stage
