"""Where one block's half-step spends its time, stage by stage, outside Dask.

For the largest block of each side of a store: read its in-block from the store (cold, as a
worker whose cache cannot hold it does), build the routed rows' message indices
(``InBlock.col``), turn the ratings into row systems (``Objective.systems``) and solve them
(:func:`blockals.kernels.solve`), each timed alone on one thread and reported in seconds and
nanoseconds per rating. Routed rows are random factors of the right shape, so no training
is needed; the solve's arithmetic does not depend on their values.

    python benchmarks/blockcost.py storage/data/outofcore/1380000x27000-200000000-b1024M.zarr

Run it on stores of two sizes to see which stage's cost per rating grows with the data.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def timed(fn, repeat: int = 3):
    """Best of ``repeat`` calls (the first also warms numba's cache), and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> None:
    from threadpoolctl import threadpool_limits

    import blockals
    from blockals import kernels
    from blockals.params import parse_params
    from blockals.store import BLOCK_CACHE, load_inblock

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store")
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--implicit", action="store_true")
    p.add_argument("--solver", default="cholesky")
    args = p.parse_args(argv)

    store = blockals.open_store(args.store)
    config = parse_params({"rank": args.rank, "implicit": args.implicit, "solver": args.solver}).config
    obj = config.objective(float(store.stats["rating_mean"]))
    report = {"store": args.store, "rank": args.rank, "implicit": args.implicit, "solver": args.solver}
    with threadpool_limits(1, user_api="blas"):
        for side in ("users", "items"):
            nnz = [int(n) for n in store.block_nnz(side)]
            b = int(np.argmax(nnz))

            def load():
                BLOCK_CACHE.clear()
                return load_inblock(store.ref, side, b, 0)

            t_load, inblock = timed(load, 2)
            t_col, _ = timed(lambda: inblock.col)
            m = int(inblock.need_ptr[-1])
            M = np.random.default_rng(0).standard_normal((m, obj.width)).astype(config.dtype)
            t_sys, sys = timed(lambda: obj.systems(inblock, M, None, None))
            x0 = np.zeros((inblock.n_rows, sys.width))
            t_solve, _ = timed(lambda: kernels.solve(sys, x0, obj.rank, config.solver, config.cg_steps, config.nonnegative, loss=True))
            per = {k: v / inblock.nnz * 1e9 for k, v in (("load", t_load), ("col", t_col), ("systems", t_sys), ("solve", t_solve))}
            report[side] = {
                "block": b, "rows": inblock.n_rows, "nnz": inblock.nnz, "routed_rows": m,
                "routed_mib": M.nbytes / 2**20, "seconds": {"load": t_load, "col": t_col, "systems": t_sys, "solve": t_solve},
                "ns_per_rating": {k: round(v, 1) for k, v in per.items()},
            }
            print(json.dumps({side: report[side]}), flush=True)


if __name__ == "__main__":
    main()
