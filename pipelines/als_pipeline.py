"""The blockals pipeline: data -> ratings store -> ALS model, on a Dask cluster.

With no arguments it runs the embedded default: a synthetic MovieLens-shaped data set
(943 users x 1682 items, ~100k half-star ratings, made locally from a seed), ingested into
``storage/data/demo/ratings.zarr`` and trained with Spark's explicit ALS objective on a
LocalCluster started for the run. It prints the dashboard link, one line per iteration,
and the final training and held-out RMSE, and writes the model to
``storage/data/demo/model.zarr``.

    python pipelines/als_pipeline.py                      # embedded default
    python pipelines/als_pipeline.py --source ratings.csv --rank 32 --max-iter 15
    python pipelines/als_pipeline.py --scheduler tcp://10.0.0.5:8786
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "storage" / "data" / "demo"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", help="ratings to ingest (default: the synthetic MovieLens-shaped set)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="directory for the store and the model")
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--max-iter", type=int, default=10)
    p.add_argument("--reg", type=float, default=0.1)
    p.add_argument("--reg-scaling", default="count", choices=["count", "none"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of the default data held out for RMSE")
    p.add_argument("--scheduler", default=os.environ.get("DASK_SCHEDULER_ADDRESS"),
                   help="attach to this Dask scheduler (default: $DASK_SCHEDULER_ADDRESS, else a LocalCluster)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import blockals
    from blockals.datasets import movielens_like
    from blockals.engine import connect

    args = parse_args(argv)
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    test = None
    if args.source:
        source = args.source
    else:
        frame = movielens_like(seed=args.seed)
        held = np.random.default_rng(args.seed).random(len(frame)) < args.holdout
        source, test = frame[~held], frame[held]
        print(f"synthetic MovieLens-shaped data: {len(frame):,} ratings, {held.sum():,} held out")

    client = None
    if args.scheduler:
        from distributed import Client

        client = Client(args.scheduler)
    with connect(client) as c:
        print(f"Dask dashboard: {c.dashboard_link}", flush=True)
        store = blockals.ingest(source, data / "ratings.zarr", overwrite=True)
        print(store.summary(), flush=True)
        model = blockals.ALS(
            rank=args.rank, max_iter=args.max_iter, reg=args.reg, reg_scaling=args.reg_scaling,
            seed=args.seed, verbose=True,
        ).fit(store, c)
    model.save(data / "model.zarr")
    print(f"final train RMSE {model.history_[-1]['train_rmse']:.4f}")
    if test is not None:
        pred = model.predict(test["user"].to_numpy(), test["item"].to_numpy())
        known = ~np.isnan(pred)
        rmse = np.sqrt(np.mean((pred[known] - test["rating"].to_numpy()[known]) ** 2))
        print(f"held-out RMSE {rmse:.4f} on {known.sum():,} ratings ({(~known).sum()} with unseen ids skipped)")
    print(f"model written to {data / 'model.zarr'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # one sentence for known bad input, as the CLI does
        from blockals.errors import BlockalsError

        if isinstance(exc, BlockalsError):
            print(f"als_pipeline: error: {exc}", file=sys.stderr)
            sys.exit(2)
        raise
