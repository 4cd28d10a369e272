"""Out-of-core scale: a Parquet source ingested, trained and recommended from by workers
with a hard memory limit.

Each stage runs on a LocalCluster of ``--workers`` single-threaded workers, each with
``--memory-limit``:

1. *source*: synthetic ratings (:func:`blockals.datasets.synthetic_ratings`) written to
   Parquet partition by partition (never whole in memory);
2. *ingest*: the Parquet source read once into a store, blocks from ``--block-budget``;
3. *train*: ``--iters`` iterations at ``--rank``, checkpointed as ``ALS`` does by default
   (once a minute); ``--checkpoint-interval 1`` writes one after every iteration, the
   series' setting before 2026-12-03;
4. *recommend* (``--recommend``): the top 10 items of every user, written to Zarr.

The peak RSS of this process's whole tree (driver, nannies, workers) is sampled every
0.2 s for each stage, and the disk each stage leaves is measured. Per-iteration seconds
are the median over iterations 2..N. Run it at two sizes to see how time grows:

    python benchmarks/outofcore.py --ratings 20000000 --users 138000 --items 27000 --iters 12
    python benchmarks/outofcore.py --ratings 200000000 --users 1380000 --items 27000 --iters 5

Sources and stores stay under ``storage/data/outofcore`` for reuse (``--fresh`` rebuilds
them); checkpoints and recommendations are removed after they are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
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


def disk_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


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
    p.add_argument("--checkpoint-interval", type=int,
                   help="iterations between checkpoints (default: ALS's, by elapsed time)")
    p.add_argument("--recommend", action="store_true", help="also write the top 10 items of every user")
    p.add_argument("--fresh", action="store_true", help="rebuild the stored source and store")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import blockals
    from blockals.datasets import synthetic_ratings
    from dask.utils import parse_bytes
    from distributed import Client, LocalCluster

    args = parse(argv)
    budget = parse_bytes(args.block_budget or args.memory_limit) // (1 if args.block_budget else 2)
    name = f"{args.users}x{args.items}-{args.ratings}"
    parquet_path, store_path = DATA / f"{name}.parquet", DATA / f"{name}-b{budget >> 20}M.zarr"
    if args.fresh:
        for path in (parquet_path, store_path):
            shutil.rmtree(path, ignore_errors=True)
    DATA.mkdir(parents=True, exist_ok=True)
    report: dict = {"ratings": args.ratings, "users": args.users, "items": args.items, "rank": args.rank,
                    "workers": args.workers, "memory_limit": args.memory_limit, "block_budget": budget,
                    "checkpoint_interval": args.checkpoint_interval,
                    "machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
                               f"{platform.processor() or platform.machine()}", "date": time.strftime("%Y-%m-%d")}

    def show() -> None:  # after every stage: a later one failing keeps these figures
        print(json.dumps(report), flush=True)

    with LocalCluster(n_workers=args.workers, threads_per_worker=1, memory_limit=args.memory_limit,
                      host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        if not parquet_path.exists():
            # Written beside and renamed when whole: a run stopped midway leaves nothing the
            # next one would take for a finished source.
            partial = parquet_path.with_name(f".{parquet_path.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            with PeakRSS() as made:
                synthetic_ratings(n_users=args.users, n_items=args.items, n_ratings=args.ratings).to_parquet(
                    str(partial), write_index=False)
            partial.rename(parquet_path)
            report.update(source_s=round(made.seconds, 1), source_rss_gib=round(made.gib, 2))
        report["source_gb"] = round(disk_bytes(parquet_path) / 1e9, 2)
        if not store_path.exists():
            with PeakRSS() as ingested:
                blockals.ingest(str(parquet_path), str(store_path), block_budget=budget)
            report.update(ingest_s=round(ingested.seconds, 1), ingest_rss_gib=round(ingested.gib, 2),
                          ingest_ratings_per_s=round(args.ratings / ingested.seconds))
        store = blockals.open_store(str(store_path))
        report.update(store_gb=round(disk_bytes(store_path) / 1e9, 2), blocks=[store.n_user_blocks, store.n_item_blocks])
        show()
        checkpoints = Path(tempfile.mkdtemp(dir=DATA, prefix="checkpoints-"))
        try:
            with PeakRSS() as trained:
                model = blockals.ALS(rank=args.rank, max_iter=args.iters, reg=0.05, seed=0,
                                     checkpoint_interval=args.checkpoint_interval).fit(
                    store, client, checkpoint_path=str(checkpoints / "als"))
            secs = [h["seconds"] for h in model.history_]
            report.update(seconds=[round(s, 2) for s in secs],
                          per_iter=round(float(np.median(secs[1:] if len(secs) > 1 else secs)), 2),
                          train_rss_gib=round(trained.gib, 2), train_rmse=model.history_[-1].get("train_rmse"),
                          checkpoint_gb=round(disk_bytes(checkpoints) / 1e9, 2))
        finally:
            shutil.rmtree(checkpoints, ignore_errors=True)
        show()
        if args.recommend:
            output = DATA / f"{name}-top10.zarr"
            shutil.rmtree(output, ignore_errors=True)
            try:
                with PeakRSS() as recommended:
                    model.recommend_all(10, str(output), client=client)
                report.update(recommend_s=round(recommended.seconds, 1), recommend_rss_gib=round(recommended.gib, 2),
                              recommend_gb=round(disk_bytes(output) / 1e9, 2))
            finally:
                shutil.rmtree(output, ignore_errors=True)
            show()


if __name__ == "__main__":
    main()
