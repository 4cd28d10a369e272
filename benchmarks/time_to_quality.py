"""Time to quality: wall seconds from a Parquet file to a model as good as the reference's.

The reference is what a user of the other library gets with its usual settings: Spark's
ALS after 10 iterations (explicit mode, test RMSE) or the ``implicit`` library's after 15
(implicit mode, precision@10 over sampled test users; same definitions as
``benchmarks/compare.py``). For every implementation, the reference's own included, the
script finds the fewest iterations whose model reaches that quality (within
``--tolerance``, relative), then times, in a fresh process, everything a user waits for to
get that model: reading the Parquet file (blockals: ingesting it into a store), starting
Spark or the Dask cluster, compiling, and the iterations. Iterations are counted on the
same data in a separate process, so the timed run does not pay for evaluating.

    python benchmarks/time_to_quality.py --shape 1m --mode explicit --rank 10
    python benchmarks/time_to_quality.py --shape 1m --mode implicit --rank 64
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd
from dask.system import cpu_count

from compare import DATA, SHAPES, dataset, precision_at_10, rmse

REFERENCE = {"explicit": ("spark", 10), "implicit": ("implicit", 15)}
PEERS = {"explicit": ("blockals", "spark"), "implicit": ("blockals", "spark", "implicit")}


# -- one model per implementation: (factors-or-model, quality) after `iters` iterations ---


def quality(args, predict=None, factors=None) -> float:
    train, test = dataset(args)
    te = pd.read_parquet(test)
    if args.mode == "explicit":
        return rmse(predict(te["user"].to_numpy(), te["item"].to_numpy()), te["rating"].to_numpy())
    U, V, users, items = factors
    return precision_at_10(U, V, users, items, pd.read_parquet(train), te)


def blockals_fit(args, iters: int, store=None):
    import blockals

    train, _ = dataset(args)
    tmp = None
    if store is None:
        tmp = tempfile.TemporaryDirectory(dir=DATA)
        store = blockals.ingest(str(train), f"{tmp.name}/r.zarr")
    params = dict(rank=args.rank, max_iter=iters, reg=args.reg, seed=0)
    if args.mode == "implicit":
        params.update(implicit=True, alpha=args.alpha, reg_scaling="none", solver="cg")
    model = blockals.ALS(**params).fit(store)
    if tmp is not None:
        tmp.cleanup()
    return model


def blockals_quality(args, model) -> float:
    return quality(args, model.predict, (model.user_factors_, model.item_factors_, pd.Index(model.user_ids_),
                                         pd.Index(model.item_ids_)))


def spark_session(args):
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(f"local[{args.cores}]").config("spark.ui.enabled", "false")
             .config("spark.driver.memory", "8g").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def spark_fit(args, spark, iters: int):
    from pyspark.ml.recommendation import ALS

    train, _ = dataset(args)
    df = spark.read.parquet(str(train)).selectExpr("cast(user as int) user", "cast(item as int) item",
                                                    "cast(rating as float) rating")
    als = ALS(rank=args.rank, maxIter=iters, regParam=args.reg, seed=0, implicitPrefs=args.mode == "implicit",
              alpha=args.alpha, coldStartStrategy="nan")
    model = als.fit(df)
    model.userFactors.count()
    return model


def spark_quality(args, spark, model) -> float:
    def predict(users, items):
        te = pd.DataFrame({"user": users, "item": items})
        pred = model.transform(spark.createDataFrame(te)).toPandas().set_index(["user", "item"])["prediction"]
        return pred.reindex(pd.MultiIndex.from_arrays([users, items])).to_numpy(dtype=float)

    U = model.userFactors.toPandas().sort_values("id")
    V = model.itemFactors.toPandas().sort_values("id")
    return quality(args, predict, (np.stack(U["features"]), np.stack(V["features"]), pd.Index(U["id"]), pd.Index(V["id"])))


def implicit_fit(args, iters: int, on_iteration=None):
    """implicit's CG ALS (its default); ``on_iteration(model, users, items, iteration)`` after each iteration."""
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares

    train, _ = dataset(args)
    tr = pd.read_parquet(train)
    users, items = pd.Index(np.sort(tr["user"].unique())), pd.Index(np.sort(tr["item"].unique()))
    # implicit's confidence is alpha * r; 1 + alpha * r gives the objective the others minimize.
    conf = (1.0 + args.alpha * np.abs(tr["rating"].to_numpy())).astype(np.float32)
    m = sp.csr_matrix((conf, (users.get_indexer(tr["user"]), items.get_indexer(tr["item"]))), shape=(len(users), len(items)))
    model = AlternatingLeastSquares(factors=args.rank, regularization=args.reg, alpha=1.0, iterations=iters,
                                    use_cg=True, num_threads=args.cores, random_state=0)
    callback = None if on_iteration is None else (lambda it, elapsed, loss: on_iteration(model, users, items, it + 1))
    model.fit(m, show_progress=False, callback=callback)
    return model, users, items


# -- the two kinds of child run -----------------------------------------------------------


def scan(args, name: str, target: float) -> dict:
    """Quality after 1, 2, ... iterations, until it reaches ``target`` or --max-iters."""
    out: dict[int, float] = {}
    if name == "implicit":  # one fit, evaluated after every iteration (its factors change in place)
        def record(model, users, items, n):
            out[n] = quality(args, factors=(model.user_factors, model.item_factors, users, items))

        implicit_fit(args, args.max_iters, record)
        return out
    if name == "spark":
        spark = spark_session(args)
        fit = lambda n: spark_quality(args, spark, spark_fit(args, spark, n))  # noqa: E731
    else:
        import blockals

        tmp = tempfile.TemporaryDirectory(dir=DATA)
        store = blockals.ingest(str(dataset(args)[0]), f"{tmp.name}/r.zarr")
        fit = lambda n: blockals_quality(args, blockals_fit(args, n, store))  # noqa: E731
    for n in range(1, args.max_iters + 1):
        out[n] = fit(n)
        if reached(out[n], target, args):
            break
    return out


def timed(args, name: str, iters: int) -> dict:
    """Wall seconds from the Parquet file to a model of ``iters`` iterations, in this fresh process."""
    t = time.perf_counter()
    if name == "blockals":
        model = blockals_fit(args, iters)
        seconds = time.perf_counter() - t
        return {"seconds": seconds, "quality": blockals_quality(args, model)}
    if name == "spark":
        spark = spark_session(args)
        model = spark_fit(args, spark, iters)
        seconds = time.perf_counter() - t
        out = {"seconds": seconds, "quality": spark_quality(args, spark, model)}
        spark.stop()
        return out
    model, users, items = implicit_fit(args, iters)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "quality": quality(args, factors=(model.user_factors, model.item_factors, users, items))}


def child(args, *task: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", *task], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(task)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def reached(q: float, target: float, args) -> bool:
    if args.mode == "explicit":
        return q <= target * (1 + args.tolerance)
    return q >= target * (1 - args.tolerance)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=["explicit", "implicit"], default="explicit")
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--reg", type=float, default=0.05)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--tolerance", type=float, default=0.002, help="relative slack on the reference's quality")
    p.add_argument("--max-iters", type=int, default=20, help="iterations scanned for the target")
    p.add_argument("--cores", type=int, default=cpu_count())
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.users, args.items, args.ratings = SHAPES[args.shape]
    return args


def main(argv=None) -> None:
    args = parse(argv)
    dataset(args)  # made once, before any timing
    if args.child:
        kind, name, *rest = args.child
        result = scan(args, name, float(rest[0])) if kind == "scan" else timed(args, name, int(rest[0]))
        print(json.dumps(result))
        return
    ref_name, ref_iters = REFERENCE[args.mode]
    target = child(args, "timed", ref_name, str(ref_iters))
    rows = {}
    for name in PEERS[args.mode]:  # the reference too: its quality may peak before its last iteration
        curve = {int(n): q for n, q in child(args, "scan", name, repr(target["quality"])).items()}
        enough = [n for n in sorted(curve) if reached(curve[n], target["quality"], args)]
        rows[name] = {"iters": None} if not enough else {"iters": enough[0], **child(args, "timed", name, str(enough[0]))}
    metric = "test RMSE" if args.mode == "explicit" else "precision@10"
    print(f"# time to {ref_name}'s {metric} after {ref_iters} iterations ({target['quality']:.4f}, tolerance "
          f"{args.tolerance:.1%}): {args.mode}, rank {args.rank}, λ={args.reg}, {args.ratings:,} ratings "
          f"({args.users:,} x {args.items:,}), {args.cores} cores, {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"| implementation | iterations | seconds, Parquet to model | {metric} | blockals / this |")
    print("|---|---|---|---|---|")
    base = rows["blockals"].get("seconds")
    for name, r in rows.items():
        if r["iters"] is None:
            print(f"| {name} | not reached in {args.max_iters} | — | — | |")
            continue
        ratio = "" if name == "blockals" or base is None else f"{base / r['seconds']:.2f}"
        print(f"| {name} | {r['iters']} | {r['seconds']:.1f} | {r['quality']:.4f} | {ratio} |")


if __name__ == "__main__":
    main()
