"""blockals side by side with Spark MLlib's ALS and implicit, on the same data, in one run.

Each implementation runs in its own process, so the peak resident memory of its whole
process tree (workers and JVM included) is measured alike. Per-iteration seconds:

* blockals: median of ``history_[t]["seconds"]`` over iterations 2..N (iteration 1 also
  reads every block from disk);
* Spark: ``(T(maxIter=N) - T(maxIter=1)) / (N - 1)`` after a warm-up fit, which cancels
  its set-up cost; its quality is that of the ``N``-iteration model, like the others';
* implicit: median of its per-iteration callback times over iterations 2..N.

Quality: test RMSE (explicit) or precision@10 over a sample of users (implicit), on a
random 20% of the ratings held out.

Also printed for blockals: the rate of the normal-equation build (``nnz * k^2``
multiply-adds of each side's largest block, rebuilt from the trained factors on one
thread) against this machine's float32 GEMM rate on one thread, and the bytes routed per
iteration against broadcasting each side's whole factor matrix to every block of the
other.

    python benchmarks/compare.py --ratings 1000000 --users 6000 --items 4000 --rank 10
    python benchmarks/compare.py --mode implicit --rank 64 --peers implicit
    python benchmarks/compare.py --shape ml20m --rank 64 --peers spark,implicit
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "storage" / "data" / "bench"
# (users, items, ratings) of the two datasets.
SHAPES = {"1m": (6000, 4000, 1_000_000), "ml20m": (138_000, 27_000, 20_000_000)}


def dataset(args) -> tuple[Path, Path]:
    """Train and test Parquet files of the synthetic set, made once and reused."""
    name = f"synthetic-{args.users}x{args.items}-{args.ratings}-s{args.seed}"
    train, test = DATA / f"{name}-train.parquet", DATA / f"{name}-test.parquet"
    if not train.exists():
        from blockals.datasets import synthetic_frame

        DATA.mkdir(parents=True, exist_ok=True)
        frame = synthetic_frame(args.users, args.items, args.ratings, seed=args.seed)
        held = np.random.default_rng(args.seed).random(len(frame)) < 0.2
        frame[~held].to_parquet(train)
        frame[held].to_parquet(test)
    return train, test


# -- quality -------------------------------------------------------------------------


def rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    known = np.isfinite(pred)
    return float(np.sqrt(np.mean((pred[known] - truth[known]) ** 2)))


def precision_at_10(U, V, user_index, item_index, train: pd.DataFrame, test: pd.DataFrame, n_users=2000, seed=0) -> float:
    """Mean over sampled test users of |top-10 (training items excluded) ∩ test items| / 10."""
    test = test[test["rating"] > 0]
    users = np.random.default_rng(seed).permutation(test["user"].unique())[:n_users]
    tr = train.groupby("user")["item"].apply(lambda s: item_index.get_indexer(s))
    te = test.groupby("user")["item"].apply(lambda s: set(item_index.get_indexer(s)))
    hits = []
    for chunk in np.array_split(users, max(1, len(users) // 500)):
        rows = user_index.get_indexer(chunk)
        scores = U[rows] @ V.T
        for r, u in enumerate(chunk):
            if u in tr.index:
                scores[r, tr[u]] = -np.inf
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        hits += [len(te[u] & set(t)) / 10 for u, t in zip(chunk, top)]
    return float(np.mean(hits))


# -- kernel rates ----------------------------------------------------------------------------


def gemm_rate(n: int = 2000, repeats: int = 5) -> float:
    """float32 GFLOP/s of one ``n x n`` matrix product on one thread (best of ``repeats``)."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    with threadpool_limits(1):
        a @ a
        best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def build_rate(model, store) -> float:
    """GFLOP/s (``2 nnz k^2`` per build) of forming every row's system of each side's largest
    block, on one thread, with the trained factors routed as in training."""
    from blockals import kernels
    from blockals.objectives import Objective

    factors = {"users": model.user_factors_, "items": model.item_factors_}
    flops = seconds = 0.0
    for side, other in (("users", "items"), ("items", "users")):
        block = int(np.argmax(store.block_nnz(side)))
        inblock = store.inblock(side, block)
        messages = [factors[other][store.rows(other, src)[inblock.out_block(src)]] for src in range(store.n_blocks(other))]
        M = np.ascontiguousarray(np.concatenate(messages), dtype=np.float32)
        k = M.shape[1]
        systems = Objective(k, 0.1, "count").systems(inblock, M, None, None)
        args = systems.kernel_arrays().system
        rows = np.flatnonzero(inblock.counts)
        Ms, bs = np.empty((rows.size, k, k)), np.empty((rows.size, k))
        kernels._form_rows(rows[:1], *args, Ms, bs)  # compile or load outside the timing
        seconds += min(_timed(lambda: kernels._form_rows(rows, *args, Ms, bs)) for _ in range(3))
        flops += 2.0 * inblock.nnz * k * k
    return flops / seconds / 1e9


def broadcast_bytes(store, width: int) -> int:
    """Bytes one iteration would ship if every block received the other side's whole matrix."""
    return 4 * width * (store.n_user_blocks * store.n_items + store.n_item_blocks * store.n_users)


# -- the implementations, each run in a child process ---------------------------------------


def run_blockals(args, train: Path, test: Path) -> dict:
    import contextlib

    import blockals
    from distributed import Client, LocalCluster

    with tempfile.TemporaryDirectory(dir=DATA) as tmp, contextlib.ExitStack() as stack:
        client = None  # --cluster default: fit starts the cluster it chooses, as a user's call does
        if args.cluster == "processes":
            cluster = stack.enter_context(LocalCluster(n_workers=args.cores, threads_per_worker=1, host="127.0.0.1",
                                                       dashboard_address="127.0.0.1:0"))
            client = stack.enter_context(Client(cluster))
        t = time.perf_counter()
        store = blockals.ingest(str(train), f"{tmp}/r.zarr", n_user_blocks=args.blocks, n_item_blocks=args.blocks)
        ingest_s = time.perf_counter() - t
        params = dict(rank=args.rank, max_iter=args.iters, reg=args.reg, seed=0, checkpoint_interval=args.checkpoint_interval)
        if args.mode == "implicit":
            params.update(implicit=True, alpha=args.alpha, reg_scaling="none", solver=args.solver)
        model = blockals.ALS(**params).fit(store, client)
        fit_s = time.perf_counter() - t - ingest_s
        secs = [h["seconds"] for h in model.history_]
        out = {"per_iter": float(np.median(secs[1:] if len(secs) > 1 else secs)), "ingest_s": ingest_s,
               "fit_s": fit_s, "first_iter": secs[0],
               "bytes_routed": model.history_[-1]["bytes_routed"], "bytes_broadcast": broadcast_bytes(store, args.rank),
               "blocks": [store.n_user_blocks, store.n_item_blocks], "build_gflops": build_rate(model, store),
               "gemm_gflops": gemm_rate()}
    te = pd.read_parquet(test)
    if args.mode == "explicit":
        out["quality"] = rmse(model.predict(te["user"].to_numpy(), te["item"].to_numpy()), te["rating"].to_numpy())
    else:
        out["quality"] = precision_at_10(model.user_factors_, model.item_factors_, pd.Index(model.user_ids_),
                                         pd.Index(model.item_ids_), pd.read_parquet(train), te)
    return out


def run_spark(args, train: Path, test: Path) -> dict:
    with tempfile.TemporaryDirectory(dir=DATA) as checkpoints:
        return _spark_fits(args, train, test, checkpoints)


def _spark_fits(args, train: Path, test: Path, checkpoints: str) -> dict:
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(f"local[{args.cores}]").config("spark.ui.enabled", "false")
             .config("spark.driver.memory", "8g").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    spark.sparkContext.setCheckpointDir(checkpoints)  # bounds ALS lineage, as in real use
    df = spark.read.parquet(str(train)).selectExpr("cast(user as int) user", "cast(item as int) item", "cast(rating as float) rating").cache()
    df.count()
    times = {}
    # The first fit warms the JVM up; then the difference of two fits cancels set-up costs.
    # The last fit runs as many iterations as the others get, for the quality figure.
    for iters in (2, 1, args.iters):
        als = ALS(rank=args.rank, maxIter=iters, regParam=args.reg, seed=0, numUserBlocks=args.spark_blocks,
                  numItemBlocks=args.spark_blocks, implicitPrefs=args.mode == "implicit", alpha=args.alpha,
                  coldStartStrategy="nan")
        t = time.perf_counter()
        model = als.fit(df)
        model.userFactors.count()
        times[iters] = time.perf_counter() - t
    out = {"per_iter": (times[args.iters] - times[1]) / (args.iters - 1)}
    te = pd.read_parquet(test)
    if args.mode == "explicit":
        pred = model.transform(spark.createDataFrame(te[["user", "item", "rating"]].astype({"rating": float}))).toPandas()
        out["quality"] = rmse(pred["prediction"].to_numpy(dtype=float), pred["rating"].to_numpy())
    else:
        U = model.userFactors.toPandas().sort_values("id")
        V = model.itemFactors.toPandas().sort_values("id")
        out["quality"] = precision_at_10(np.stack(U["features"]), np.stack(V["features"]), pd.Index(U["id"]),
                                         pd.Index(V["id"]), pd.read_parquet(train), te)
    spark.stop()
    return out


def run_implicit(args, train: Path, test: Path) -> dict:
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares

    tr = pd.read_parquet(train)
    users, items = pd.Index(np.sort(tr["user"].unique())), pd.Index(np.sort(tr["item"].unique()))
    # implicit's confidence is alpha * r; giving it 1 + alpha * r matches the objective here.
    conf = 1.0 + args.alpha * np.abs(tr["rating"].to_numpy())
    m = sp.csr_matrix((conf.astype(np.float32), (users.get_indexer(tr["user"]), items.get_indexer(tr["item"]))),
                      shape=(len(users), len(items)))
    times = []
    model = AlternatingLeastSquares(factors=args.rank, regularization=args.reg, alpha=1.0, iterations=args.iters,
                                    use_cg=args.solver == "cg", num_threads=args.cores, random_state=0)
    model.fit(m, show_progress=False, callback=lambda it, elapsed, loss: times.append(elapsed))
    return {"per_iter": float(np.median(times[1:])),
            "quality": precision_at_10(model.user_factors, model.item_factors, users, items, tr, pd.read_parquet(test))}


RUNNERS = {"blockals": run_blockals, "spark": run_spark, "implicit": run_implicit}


def measure(name: str, argv: list[str]) -> dict:
    """Run one implementation in a child process, sampling its process tree's RSS."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", name, *argv], stdout=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"{name} failed with exit status {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_gb"] = peak / 2**30
    return result


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), help="preset users, items and ratings")
    p.add_argument("--users", type=int, default=6000)
    p.add_argument("--items", type=int, default=4000)
    p.add_argument("--ratings", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=["explicit", "implicit"], default="explicit")
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--iters", type=int, default=5, help="at least 2 (Spark's time is a difference of fits)")
    p.add_argument("--reg", type=float, default=0.05)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--solver", choices=["cholesky", "cg"], default="cholesky")
    p.add_argument("--blocks", type=int, default=None, help="blockals blocks per side (default: automatic)")
    p.add_argument("--spark-blocks", type=int, default=4)
    p.add_argument("--checkpoint-interval", type=int, default=None,
                   help="blockals: checkpoint every N iterations (default: the library's, by elapsed time)")
    p.add_argument("--cluster", choices=["default", "processes"], default="default",
                   help="blockals: the cluster fit starts by itself (default), or one of --cores single-threaded "
                        "worker processes passed to it")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--peers", default="spark", help="comma-separated: spark, implicit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.shape:
        args.users, args.items, args.ratings = SHAPES[args.shape]
    return args


def main(argv=None) -> None:
    args = parse(argv)
    train, test = dataset(args)
    if args.child:
        print(json.dumps(RUNNERS[args.child](args, train, test)))
        return
    argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    names = ["blockals", *[p for p in args.peers.split(",") if p]]
    results = {name: measure(name, argv) for name in names}
    metric = "test RMSE" if args.mode == "explicit" else "precision@10"
    print(f"# {args.mode} ALS, rank {args.rank}, {args.iters} iterations, λ={args.reg}, "
          f"{args.ratings:,} ratings ({args.users:,} users x {args.items:,} items), {args.cores} cores, "
          f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}")
    print(f"| implementation | s / iteration | peak RSS (GiB) | {metric} | blockals / peer time |")
    print("|---|---|---|---|---|")
    base = results["blockals"]["per_iter"]
    for name, r in results.items():
        ratio = "" if name == "blockals" else f"{base / r['per_iter']:.2f}"
        print(f"| {name} | {r['per_iter']:.3f} | {r['peak_rss_gb']:.2f} | {r['quality']:.4f} | {ratio} |")
    b = results["blockals"]
    print(f"blockals: {b['blocks'][0]} x {b['blocks'][1]} blocks, ingest {b['ingest_s']:.1f} s, fit {b['fit_s']:.1f} s "
          f"(first iteration {b['first_iter']:.2f} s); "
          f"normal-equation build {b['build_gflops']:.1f} GFLOP/s per core = {b['build_gflops'] / b['gemm_gflops']:.0%} "
          f"of float32 GEMM ({b['gemm_gflops']:.1f} GFLOP/s on one thread); routed per iteration "
          f"{b['bytes_routed'] / 2**20:.1f} MiB vs {b['bytes_broadcast'] / 2**20:.1f} MiB broadcast "
          f"({b['bytes_routed'] / b['bytes_broadcast']:.0%})")


if __name__ == "__main__":
    main()
