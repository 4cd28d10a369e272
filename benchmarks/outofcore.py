"""Out-of-core scale: a synthetic store made partition by partition, trained by workers with
a hard memory limit, and a Parquet source of the same size ingested within the same bound.

The store is generated straight into Zarr by :func:`blockals.datasets.make_store` (never
whole in memory); a LocalCluster of ``--workers`` single-threaded workers, each with
``--memory-limit``, trains it. The peak RSS of this process's whole tree (driver, nannies,
workers) is sampled every 0.2 s for each stage. Per-iteration seconds are the median over
iterations 2..N. Run it at two sizes to see how time grows with the data:

    python benchmarks/outofcore.py --ratings 20000000 --users 138000 --items 27000
    python benchmarks/outofcore.py --ratings 200000000 --users 1380000 --items 27000 --parquet

Stores and Parquet files stay under ``storage/data/outofcore`` for reuse (``--fresh``
rebuilds them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "storage" / "data" / "outofcore"


class PeakRSS:
    """Peak resident memory of this process and all its descendants while the block runs."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak = 0
        self.seconds = 0.0
        self._done = threading.Event()

    def _sample(self) -> None:
        root = psutil.Process()
        while not self._done.is_set():
            total = 0
            for proc in [root, *root.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
        self._done.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratings", type=int, default=200_000_000)
    p.add_argument("--users", type=int, default=1_380_000)
    p.add_argument("--items", type=int, default=27_000)
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", default="2GiB")
    p.add_argument("--block-budget", help="ingest's block budget (default: half of --memory-limit; "
                   "a worker runs one block at a time)")
    p.add_argument("--parquet", action="store_true", help="also write a Parquet source of the same ratings and ingest it")
    p.add_argument("--fresh", action="store_true", help="rebuild stored inputs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import blockals
    from blockals.datasets import make_store, synthetic_ratings
    from dask.utils import parse_bytes
    from distributed import Client, LocalCluster

    args = parse(argv)
    budget = parse_bytes(args.block_budget or args.memory_limit) // (1 if args.block_budget else 2)
    name = f"{args.users}x{args.items}-{args.ratings}"
    store_path, parquet_path = DATA / f"{name}-b{budget >> 20}M.zarr", DATA / f"{name}.parquet"
    if args.fresh:
        for path in (store_path, parquet_path):
            shutil.rmtree(path, ignore_errors=True)
    DATA.mkdir(parents=True, exist_ok=True)
    shape = dict(n_users=args.users, n_items=args.items, n_ratings=args.ratings)
    report: dict = {"ratings": args.ratings, "users": args.users, "items": args.items, "rank": args.rank,
                    "workers": args.workers, "memory_limit": args.memory_limit, "block_budget": budget}
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, memory_limit=args.memory_limit,
                      host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        if store_path.exists():
            store = blockals.open_store(str(store_path))
        else:
            with PeakRSS() as made:
                store = make_store(str(store_path), block_budget=budget, **shape)
            report.update(generate_s=made.seconds, generate_rss_gib=made.gib)
        report["blocks"] = [store.n_user_blocks, store.n_item_blocks]
        with PeakRSS() as trained:
            model = blockals.ALS(rank=args.rank, max_iter=args.iters, reg=0.05, seed=0).fit(store, client)
        secs = [h["seconds"] for h in model.history_]
        report.update(per_iter=float(np.median(secs[1:] if len(secs) > 1 else secs)), train_rss_gib=trained.gib,
                      train_rmse=model.history_[-1].get("train_rmse"))
        print(json.dumps(report), flush=True)  # a later stage failing keeps these figures
        if args.parquet:
            if not parquet_path.exists():
                synthetic_ratings(**shape).to_parquet(str(parquet_path), write_index=False)
            target = DATA / f"{name}-from-parquet.zarr"
            shutil.rmtree(target, ignore_errors=True)
            with PeakRSS() as ingested:
                blockals.ingest(str(parquet_path), str(target), block_budget=budget)
            report.update(parquet_ingest_s=ingested.seconds, parquet_ingest_rss_gib=ingested.gib)
            shutil.rmtree(target)
    report.update(machine=f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
                  f"{platform.processor() or platform.machine()}", date=time.strftime("%Y-%m-%d"))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
