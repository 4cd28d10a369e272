"""Spark MLlib's ALS and blockals on the same split of any ratings file, side by side.

Both train with the same hyperparameters on the same train store (split 80/20 at random
by blockals.evaluation.split) and are scored by the same code, Spark's factors loaded into
a blockals model. Prints test RMSE (explicit), precision@10 and nDCG@10 (implicit), and
the fit times.

    python benchmarks/spark_parity.py                      # pyspark's sample MovieLens file
    python benchmarks/spark_parity.py ratings.csv --rank 20 --max-iter 10
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    import pyspark
    from distributed import Client, LocalCluster
    from pyspark.sql import SparkSession

    import blockals
    from blockals.evaluation import evaluate, split
    from test_parity import frame_of, spark_model

    default = os.path.join(os.path.dirname(pyspark.__file__), "data", "mllib", "als", "sample_movielens_ratings.txt")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", default=default, help="ratings file (default: pyspark's sample)")
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--max-iter", type=int, default=10)
    p.add_argument("--reg", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=1.0)
    args = p.parse_args()

    spark = SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    spark.sparkContext.setCheckpointDir(tempfile.mkdtemp())
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                                                            dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        store = blockals.ingest(args.source, f"{tmp}/all.zarr")
        train, test = split(store, f"{tmp}/train.zarr", f"{tmp}/test.zarr", fraction=0.2, seed=0)
        frame = frame_of(train)
        for mode, extra, spark_extra in (("explicit", {}, {}),
                                         ("implicit", {"implicit": True, "alpha": args.alpha},
                                          {"implicitPrefs": True, "alpha": args.alpha})):
            t = time.perf_counter()
            ours = blockals.ALS(rank=args.rank, max_iter=args.max_iter, reg=args.reg, seed=0, **extra).fit(train, client)
            ours_s = time.perf_counter() - t
            t = time.perf_counter()
            theirs = spark_model(spark, frame, ours, rank=args.rank, maxIter=args.max_iter, regParam=args.reg, **spark_extra)
            theirs_s = time.perf_counter() - t
            for name, model, secs in (("blockals", ours, ours_s), ("spark", theirs, theirs_s)):
                m = evaluate(model, test, train, k=10, client=client)
                rows.append({"mode": mode, "implementation": name, "rmse": m["rmse"], "precision@10": m["precision@10"],
                             "ndcg@10": m["ndcg@10"], "fit seconds": secs})
    spark.stop()
    table = pd.DataFrame(rows)
    print(f"# {args.source}: {store.nnz:,} ratings, rank {args.rank}, {args.max_iter} iterations, λ={args.reg}")
    print(table.to_markdown(index=False, floatfmt=".4f") if _has_tabulate() else table.to_string(index=False))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
