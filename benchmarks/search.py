"""Model selection against the user's guess: blockals.search with its defaults on one split.

A ratings source (default: the MovieLens-100K-shaped synthetic set of blockals.datasets,
or a MovieLens file such as ``u.data``) is split 80/20 at random; the Spark-like guess
(rank 10, λ 0.1 scaled by counts, 10 iterations) and ``blockals.search`` with its default
space are both fitted on the 80% and scored on the 20% the search never sees. Prints a
Markdown table: test RMSE and wall seconds (search: split, every rung and the refit).

    python benchmarks/search.py
    python benchmarks/search.py ml-100k/u.data --workers 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time


def main() -> None:
    from distributed import Client, LocalCluster

    import blockals
    from blockals.evaluation import evaluate, split

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", help="ratings file (default: blockals.datasets.movielens_like(seed=0))")
    p.add_argument("--workers", type=int, default=2, help="single-threaded worker processes (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--implicit", action="store_true",
                   help="1M synthetic ratings (6,000 x 4,000) as implicit feedback, split 80/20 per user: a search of "
                        "rank x reg x alpha against each point of the 9-point rank x alpha grid fitted whole, by nDCG@10")
    args = p.parse_args()
    if args.implicit:
        return implicit(args)

    source = args.source or blockals.datasets.movielens_like(seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="blockals-search-") as tmp, \
            LocalCluster(n_workers=args.workers, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        store = blockals.ingest(source, f"{tmp}/ratings.zarr")
        train, test = split(store, f"{tmp}/train.zarr", f"{tmp}/test.zarr", method="random", fraction=0.2, seed=args.seed)
        rows = []
        start = time.perf_counter()
        guess = blockals.ALS(rank=10, reg=0.1, max_iter=10, seed=args.seed, checkpoint_interval=0).fit(train, client)
        rows.append(("guess: rank 10, reg 0.1 (count), 10 iterations", evaluate(guess, test, client=client)["rmse"],
                     time.perf_counter() - start))
        start = time.perf_counter()
        result = blockals.search(train, seed=args.seed, client=client)
        seconds = time.perf_counter() - start
        best = ", ".join(f"{k} {v}" for k, v in result.best_params.items() if k not in ("seed", "implicit"))
        rows.append((f"search defaults ({len(result.candidates)} candidates) -> {best}",
                     evaluate(result.best_model, test, client=client)["rmse"], seconds))
        iterations = int(result.candidates["iterations"].sum())
    print(f"\n{store.nnz:,} ratings, {store.n_users:,} users x {store.n_items:,} items; 80/20 random split; "
          f"{args.workers} single-threaded workers; search ran {iterations} candidate-iterations\n")
    print("| model | test RMSE | seconds |\n|---|---|---|")
    for name, rmse, secs in rows:
        print(f"| {name} | {rmse:.4f} | {secs:.1f} |")
    print(json.dumps({"rungs": result.rungs}, indent=1))


def implicit(args: argparse.Namespace) -> None:
    from distributed import Client, LocalCluster

    import blockals
    from blockals.evaluation import evaluate, split

    source = args.source or blockals.datasets.synthetic_frame(6000, 4000, 1_000_000, seed=args.seed)
    grid = [{"rank": r, "alpha": a, "reg": 0.1, "reg_scaling": "none"} for r in (16, 32, 64) for a in (1.0, 10.0, 40.0)]
    with tempfile.TemporaryDirectory(prefix="blockals-search-") as tmp, \
            LocalCluster(n_workers=args.workers, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        store = blockals.ingest(source, f"{tmp}/ratings.zarr")
        train, test = split(store, f"{tmp}/train.zarr", f"{tmp}/test.zarr", method="ratio", fraction=0.2, seed=args.seed)
        rows, start = [], time.perf_counter()
        for point in grid:
            model = blockals.ALS(**point, implicit=True, max_iter=10, checkpoint_interval=0).fit(train, client)
            rows.append((f"grid: rank {point['rank']}, alpha {point['alpha']:g}, 10 iterations",
                         evaluate(model, test, train, client=client)["ndcg@10"]))
        grid_seconds = time.perf_counter() - start
        start = time.perf_counter()
        result = blockals.search(train, {"rank": [16, 32, 64], "alpha": [1.0, 10.0, 40.0], "reg": [0.01, 0.1, 1.0],
                                         "reg_scaling": ["none"]}, implicit=True, min_iter=1, max_iter=10, client=client)
        seconds = time.perf_counter() - start
        found = evaluate(result.best_model, test, train, client=client)["ndcg@10"]
    best = max(rows, key=lambda row: row[1])
    print(f"\n{store.nnz:,} ratings as implicit feedback; 80/20 per-user split; {args.workers} single-threaded workers\n")
    print("| model | test nDCG@10 | seconds |\n|---|---|---|")
    print(f"| best of the 9-point grid ({best[0]}) | {best[1]:.4f} | {grid_seconds:.1f} (all 9 fits) |")
    print(f"| search of 27 candidates -> {result.best_params} | {found:.4f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
