"""Soak run: many iterations of a mid-size model, watching for leaks on workers and scheduler.

Trains an explicit rank-32 model on ~1M synthetic ratings with two single-threaded worker
processes on 127.0.0.1, committing a checkpoint every few iterations, and after every
iteration samples (through the engine's ``on_iteration`` hook):

* each worker's resident memory (RSS);
* the tasks the scheduler holds, and the futures the driver's client holds, once the
  client's releases have reached the scheduler (the count is read until it stops moving).

Two checks, printed at the end; the exit status is 1 if either fails:

* no worker's RSS grows by more than 10% from iteration 5 to the last;
* the scheduler's task count does not grow: iterations at the same place in the
  checkpoint cycle hold the same number of tasks in the last cycle as in the second
  (the first warms the caches), and the client holds no more futures at the end than then.

    python benchmarks/soak.py
    python benchmarks/soak.py --ratings 2000000 --iterations 100 --checkpoint-interval 10
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil
from distributed import Client, LocalCluster

from blockals.checkpoint import Checkpoint
from blockals.params import ALSConfig
from blockals.datasets import make_store
from blockals.engine import Engine

MIB = 1 << 20
RSS_GROWTH_LIMIT = 0.10


@dataclass(frozen=True)
class Sample:
    iteration: int
    seconds: float
    loss: float
    worker_rss: dict[str, int]
    scheduler_tasks: int
    client_futures: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratings", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--items", type=int, default=8_000)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--checkpoint-interval", type=int, default=5)
    p.add_argument("--blocks", type=int, default=4, help="user and item blocks (default: 4 x 4)")
    return p.parse_args(argv)


def _worker_rss() -> int:
    return psutil.Process().memory_info().rss


def _scheduler_tasks(dask_scheduler) -> int:
    return len(dask_scheduler.tasks)


def settled_task_count(client: Client, tries: int = 50) -> int:
    """The scheduler's task count once it has stopped moving (releases travel asynchronously)."""
    last = client.run_on_scheduler(_scheduler_tasks)
    for _ in range(tries):
        time.sleep(0.02)
        now = client.run_on_scheduler(_scheduler_tasks)
        if now == last:
            return now
        last = now
    return last


def run(args: argparse.Namespace, workdir: str) -> list[Sample]:
    store = make_store(os.path.join(workdir, "ratings.zarr"), n_users=args.users, n_items=args.items,
                       n_ratings=args.ratings, n_user_blocks=args.blocks, n_item_blocks=args.blocks, seed=0)
    print(f"{store.nnz:,} ratings, {store.n_users:,} users x {store.n_items:,} items, "
          f"{store.n_user_blocks}x{store.n_item_blocks} blocks, rank {args.rank}, {args.workers} workers, "
          f"checkpoint every {args.checkpoint_interval} iterations", flush=True)
    config = ALSConfig.parse(rank=args.rank, reg=0.05, reg_scaling="count", solver="cholesky", seed=0, dtype="float32")
    checkpoint = Checkpoint(os.path.join(workdir, "checkpoint"), store.store_id, config.to_dict())
    samples: list[Sample] = []
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:

        def sample(entry: dict) -> None:
            tasks = settled_task_count(client)
            rss = client.run(_worker_rss)
            s = Sample(entry["iteration"], entry["seconds"], entry["loss"], rss, tasks, len(client.futures))
            samples.append(s)
            print(f"{s.iteration:>4} {s.seconds:7.2f} s  objective {s.loss:12.6g}  worker RSS "
                  f"{' '.join(f'{v / MIB:7.1f}' for v in rss.values())} MiB  scheduler tasks {tasks:4d}  "
                  f"client futures {s.client_futures:4d}", flush=True)

        engine = Engine(client, store, config, checkpoint, args.checkpoint_interval, on_iteration=sample)
        engine.run(args.iterations)
    return samples


def check(samples: list[Sample], interval: int) -> list[tuple[str, bool]]:
    """The two verdicts: (sentence, passed)."""
    by_it = {s.iteration: s for s in samples}
    first, last = by_it[min(5, len(samples))], samples[-1]
    growth = {w: last.worker_rss[w] / first.worker_rss[w] - 1 for w in first.worker_rss if w in last.worker_rss}
    rss_ok = len(growth) == len(first.worker_rss) and all(g <= RSS_GROWTH_LIMIT for g in growth.values())
    rss_text = ", ".join(f"{first.worker_rss[w] / MIB:.1f} -> {last.worker_rss[w] / MIB:.1f} MiB ({g:+.1%})"
                         for w, g in growth.items())
    # The same phase of the checkpoint cycle: cycle 2 against the last complete cycle.
    early = range(interval + 1, 2 * interval + 1)
    end = len(samples) - len(samples) % interval
    late = range(end - interval + 1, end + 1)
    early_tasks = [by_it[i].scheduler_tasks for i in early]
    late_tasks = [by_it[i].scheduler_tasks for i in late]
    futures_ok = last.client_futures <= max(by_it[i].client_futures for i in early)
    tasks_ok = late_tasks == early_tasks and futures_ok
    return [
        (f"worker RSS, iteration {first.iteration} -> {last.iteration}: {rss_text}; limit +{RSS_GROWTH_LIMIT:.0%}", rss_ok),
        (f"scheduler tasks per iteration of the checkpoint cycle: iterations {early.start}-{early.stop - 1} "
         f"{early_tasks}, iterations {late.start}-{late.stop - 1} {late_tasks}; client futures at the end "
         f"{last.client_futures}", tasks_ok),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.iterations < 2 * args.checkpoint_interval or args.iterations < 5:
        sys.exit("soak: --iterations must cover two checkpoint cycles and at least 5 iterations.")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / (1 << 30):.1f} GiB; Python {platform.python_version()}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="blockals-soak-") as workdir:
        samples = run(args, workdir)
    print(f"\n{len(samples)} iterations in {time.perf_counter() - t0:.0f} s")
    verdicts = check(samples, args.checkpoint_interval)
    for sentence, passed in verdicts:
        print(f"{'PASS' if passed else 'FAIL'}  {sentence}")
    return 0 if all(passed for _, passed in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
