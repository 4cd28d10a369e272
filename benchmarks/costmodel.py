"""The cost model of docs/scaling.md: one ALS iteration's bytes routed, tasks and seconds.

Two uses:

    # a store on disk, trained with W single-threaded workers on C cores (block counts and
    # out-block sizes read from the store's stats)
    python benchmarks/costmodel.py store storage/data/outofcore/1380000x27000-200000000-b1024M.zarr --workers 2 --cores 2

    # a shape nobody has generated: block counts from the ingest rule, out-block sizes
    # estimated from the ratings per row
    python benchmarks/costmodel.py shape --ratings 1e10 --users 6.9e7 --items 2.7e4 --nodes 32 \
        --workers 512 --cores 512 --memory-limit 4GiB --network-gbps 10

The per-rating constants are measured (benchmarks/RESULTS.md, 2026-12-03); the model is
what docs/scaling.md explains.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

# In-cluster nanoseconds per rating at rank 10, two single-threaded workers on two cores
# (task stream, 2026-12-03): the solve of a rating whose routed row is in cache, the
# extra for routed rows tiled from memory (an item block at 200M), and decoding an
# in-block that is not in the worker's cache.
SOLVE_NS = 35.0
FROM_MEMORY_NS = 15.0
READ_NS = 6.5
IN_CACHE_BYTES = 16 * 2**20  # kernels.TILED_ABOVE_BYTES
INBLOCK_BYTES_PER_RATING = 9  # src_block (1), src_index (4), rating (4), decoded
TASK_SECONDS = 0.002  # scheduler time per task (Dask's scheduler runs some 500-5000 tasks/s)
HALF_STEP_LATENCY = 0.05  # a chain of dependent tasks across processes, per half-step


@dataclass(frozen=True)
class Side:
    rows: int
    blocks: int
    nnz: list[int]  # per block
    message_rows: list[list[int]]  # [other side's block][this side's block]: rows routed
    block_rows: list[int]  # this side's rows per block


@dataclass(frozen=True)
class Cluster:
    workers: int  # worker processes
    threads: int  # threads per worker
    cores: int  # cores in all
    nodes: int
    memory_limit: int  # per worker
    network: float  # bytes/s into each node (between processes on one node: LOOPBACK)

    @property
    def cache_bytes(self) -> int:  # cluster.cache_bytes
        return min(1 << 30, self.memory_limit // 4)

    @property
    def budget(self) -> int:  # ingest.cluster_budget
        return self.memory_limit // self.threads // 3


LOOPBACK = 2e9  # bytes/s between two worker processes on one host


def half_step(dst: Side, src: Side, rank: int, cluster: Cluster) -> dict:
    """Seconds, bytes and tasks of the half-step that solves ``dst`` from ``src``."""
    workers, cores = cluster.workers, cluster.cores
    width_bytes = 4 * rank
    whole, sliced_rows, routes = 0, 0, 0
    for j, row in enumerate(dst.message_rows):
        for b, m in enumerate(row):
            if m == 0:
                continue
            if 2 * m > src.block_rows[j]:  # routing.ship_whole: the block, once per worker
                whole += 1
            else:
                sliced_rows += m
                routes += 1
    # A whole block goes once to each worker that solves a block needing it.
    whole_blocks_per_worker = min(whole, src.blocks * min(workers, dst.blocks))
    routed_bytes = whole_blocks_per_worker * (src.rows / src.blocks) * width_bytes + sliced_rows * width_bytes
    ratings = sum(dst.nnz)
    routed_per_block = [sum(dst.message_rows[j][b] for j in range(src.blocks)) * width_bytes for b in range(dst.blocks)]
    solve = sum(n * (SOLVE_NS + (FROM_MEMORY_NS if r > IN_CACHE_BYTES else 0.0)) * 1e-9
                for n, r in zip(dst.nnz, routed_per_block))
    store_bytes = ratings * INBLOCK_BYTES_PER_RATING
    hit = min(1.0, workers * cluster.cache_bytes / max(1, 2 * store_bytes))  # both sides share the cache
    read = ratings * (1 - hit) * READ_NS * 1e-9
    parallel = min(workers * cluster.threads, cores)
    # Whole blocks: one task per destination and stage; the largest block sets the tail.
    rounds = math.ceil(dst.blocks / parallel)
    balance = rounds * parallel / dst.blocks
    compute = (solve + read) / parallel * balance
    tasks = 3 * dst.blocks + routes  # solve, checkpoint, restart; route tasks for slices
    # Bytes that cross between processes: all but a worker's own share; across nodes
    # they share the nodes' links.
    crossing = routed_bytes * (1 - 1 / workers)
    transfer = crossing / (cluster.nodes * cluster.network) if cluster.nodes > 1 else crossing / LOOPBACK
    seconds = max(compute, tasks * TASK_SECONDS) + transfer + HALF_STEP_LATENCY
    return {"seconds": seconds, "compute_s": compute, "transfer_s": transfer, "scheduler_s": tasks * TASK_SECONDS,
            "routed_bytes": routed_bytes, "tasks": tasks, "route_tasks": routes, "cache_hit": hit}


def iteration(users: Side, items: Side, **kw) -> dict:
    steps = {"items": half_step(items, users, **kw), "users": half_step(users, items, **kw)}
    total = {key: sum(s[key] for s in steps.values()) for key in ("seconds", "routed_bytes", "tasks", "route_tasks")}
    return {**total, "half_steps": steps}


def from_store(path: str) -> tuple[Side, Side]:
    import blockals

    store = blockals.open_store(path)
    sides = {}
    for side in ("users", "items"):
        stats = store.stats[side]
        sides[side] = Side(rows=int(store.stats[f"n_{side}"]), blocks=len(stats["block_rows"]),
                           nnz=[int(n) for n in stats["block_nnz"]], message_rows=stats["message_rows"],
                           block_rows=[int(r) for r in stats["block_rows"]])
    return sides["users"], sides["items"]


def from_shape(ratings: int, n_users: int, n_items: int, budget: int) -> tuple[Side, Side]:
    """Block counts by the ingest rule; out-block sizes as if each row's ratings fell on
    the other side's blocks uniformly (a row with ``r`` ratings reaches a block of
    ``n`` of the other side's ``N`` rows with probability ``1 - (1 - n/N)^r``)."""
    from blockals.partition import default_n_blocks

    shape = {"users": (n_users, n_items), "items": (n_items, n_users)}
    blocks = {side: default_n_blocks(rows, ratings, budget, other) for side, (rows, other) in shape.items()}
    sides = {}
    for side, (rows, other) in shape.items():
        other_side = "items" if side == "users" else "users"
        per_source_row = ratings / other
        reach = 1 - (1 - 1 / blocks[side]) ** per_source_row  # a source row is needed by a destination block
        src_rows = other / blocks[other_side]
        message = [[round(src_rows * reach)] * blocks[side] for _ in range(blocks[other_side])]
        sides[side] = Side(rows=rows, blocks=blocks[side], nnz=[ratings // blocks[side]] * blocks[side],
                           message_rows=message, block_rows=[round(rows / blocks[side])] * blocks[side])
    return sides["users"], sides["items"]


def main(argv: list[str] | None = None) -> None:
    from dask.utils import parse_bytes

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("store")
    s.add_argument("path")
    h = sub.add_parser("shape")
    h.add_argument("--ratings", type=float, required=True)
    h.add_argument("--users", type=float, required=True)
    h.add_argument("--items", type=float, required=True)
    h.add_argument("--block-budget", help="ingest's block budget (default: a third of a worker thread's memory)")
    for q in (s, h):
        q.add_argument("--rank", type=int, default=10)
        q.add_argument("--workers", type=int, default=2, help="worker processes")
        q.add_argument("--threads", type=int, default=1, help="threads per worker")
        q.add_argument("--cores", type=int, default=2, help="cores in all")
        q.add_argument("--nodes", type=int, default=1)
        q.add_argument("--memory-limit", default="2GiB", help="per worker")
        q.add_argument("--network-gbps", type=float, default=10.0, help="into each node, Gbit/s")
    args = p.parse_args(argv)
    cluster = Cluster(workers=args.workers, threads=args.threads, cores=args.cores, nodes=args.nodes,
                      memory_limit=parse_bytes(args.memory_limit), network=args.network_gbps * 1e9 / 8)
    if args.what == "store":
        from blockals.errors import StoreError

        try:
            users, items = from_store(args.path)
        except StoreError as exc:
            raise SystemExit(str(exc)) from None
    else:
        budget = parse_bytes(args.block_budget) if args.block_budget else cluster.budget
        users, items = from_shape(int(args.ratings), int(args.users), int(args.items), budget)
    result = iteration(users, items, rank=args.rank, cluster=cluster)
    result["blocks"] = [users.blocks, items.blocks]
    print(json.dumps(result, indent=1, default=lambda v: round(v, 4)))


if __name__ == "__main__":
    main()
