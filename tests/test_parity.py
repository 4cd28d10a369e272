"""Parity with Spark MLlib's ALS: same hyperparameters, same split, same quality.

Both models are scored by the same code (blockals.evaluation.evaluate), Spark's factors
loaded into an ALS object, so the comparison measures the models, not two metric
implementations.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest

import blockals
from blockals.evaluation import evaluate, split

pyspark = pytest.importorskip("pyspark", reason="pyspark is in the 'parity' extra: pip install -e '.[parity]'")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("Spark needs Java (java on PATH or JAVA_HOME); none found", allow_module_level=True)

SAMPLE = os.path.join(os.path.dirname(pyspark.__file__), "data", "mllib", "als", "sample_movielens_ratings.txt")


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    from pyspark.sql import SparkSession

    # Without a checkpoint directory Spark's ALS lineage grows with the iterations until
    # serializing a task overflows the JVM stack; checkpoints (every checkpointInterval=10
    # iterations by default) and a larger stack keep it well clear.
    session = (SparkSession.builder.master("local[2]").appName("blockals-parity")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "4")
               .config("spark.driver.extraJavaOptions", "-Xss16m").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    session.sparkContext.setCheckpointDir(str(tmp_path_factory.mktemp("spark-checkpoints")))
    yield session
    session.stop()


def frame_of(store) -> pd.DataFrame:
    parts = [store.triples("users", b) for b in range(store.n_user_blocks)]
    return pd.DataFrame({
        "user": np.concatenate([store.user_ids.to_numpy()[p[0]] for p in parts]),
        "item": np.concatenate([store.item_ids.to_numpy()[p[1]] for p in parts]),
        "rating": np.concatenate([p[2] for p in parts]).astype(float),
    })


def spark_model(spark, train: pd.DataFrame, like: blockals.ALS, **params) -> blockals.ALS:
    """Fit Spark's ALS and carry its factors in a blockals model aligned with ``like``."""
    from pyspark.ml.recommendation import ALS as SparkALS

    df = spark.createDataFrame(list(train.itertuples(index=False, name=None)), "user int, item int, rating float")
    fitted = SparkALS(seed=0, numUserBlocks=4, numItemBlocks=4, checkpointInterval=5, **params).fit(df)
    model = blockals.ALS(rank=params["rank"])
    model.user_ids_, model.item_ids_ = like.user_ids_, like.item_ids_
    for side, ids, frame in (("user", like.user_ids_, fitted.userFactors), ("item", like.item_ids_, fitted.itemFactors)):
        f = frame.toPandas()
        F = np.zeros((len(ids), params["rank"]), dtype=np.float32)
        F[pd.Index(ids).get_indexer(f["id"])] = np.stack(f["features"])
        setattr(model, f"{side}_factors_", F)
    return model


# The 200k-rating comparison is the stronger one and takes most of the time: it runs with -m slow.
@pytest.fixture(scope="module", params=[pytest.param("synthetic-200k", marks=pytest.mark.slow), "spark-sample"])
def splits(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "synthetic-200k":
        source = blockals.datasets.synthetic_frame(3000, 2000, 200_000, seed=1)
    else:
        source = SAMPLE  # read from the installed package, in its own user::item::rating::time form
    store = blockals.ingest(source, tmp / "all.zarr")
    train, test = split(store, tmp / "train.zarr", tmp / "test.zarr", method="random", fraction=0.2, seed=0)
    return train, test


def relative_gap(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / abs(theirs)


def test_explicit_rmse_within_one_percent_of_spark(splits, spark, client2):
    train, test = splits
    ours = blockals.ALS(rank=10, max_iter=15, reg=0.1, seed=0).fit(train, client2)
    theirs = spark_model(spark, frame_of(train), ours, rank=10, maxIter=15, regParam=0.1)
    a = evaluate(ours, test, train, client=client2)["rmse"]
    b = evaluate(theirs, test, train, client=client2)["rmse"]
    assert relative_gap(a, b) < 0.01 or a < b, (a, b)


def test_implicit_ranking_within_three_percent_of_spark(splits, spark, client2):
    train, test = splits
    ours = blockals.ALS(rank=10, max_iter=15, reg=0.1, implicit=True, alpha=1.0, seed=0).fit(train, client2)
    theirs = spark_model(spark, frame_of(train), ours, rank=10, maxIter=15, regParam=0.1, implicitPrefs=True, alpha=1.0)
    a = evaluate(ours, test, train, k=10, client=client2)
    b = evaluate(theirs, test, train, k=10, client=client2)
    for metric in ("precision@10", "ndcg@10"):
        assert relative_gap(a[metric], b[metric]) < 0.03 or a[metric] > b[metric], (metric, a[metric], b[metric])


def test_docs_spark_table_maps_every_spark_parameter_and_model_member_to_ours():
    """docs/spark.md's table names every parameter of Spark's ALS and everything its ALSModel
    adds (bar the get/set accessors), and every blockals method or argument it offers exists."""
    import inspect
    import re
    from pathlib import Path

    from pyspark.ml.param import Param
    from pyspark.ml.recommendation import ALS, ALSModel

    text = (Path(__file__).resolve().parents[1] / "docs" / "spark.md").read_text()
    table = text.split("## Parameters and methods", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| `")]
    spark_side = " ".join(r[0] for r in rows)
    ours = " ".join(r[1] for r in rows)
    spark_params = {n for n in dir(ALS) if isinstance(getattr(ALS, n), Param)}
    model_members = {n for n in vars(ALSModel) if not n.startswith(("_", "get", "set"))}
    for name in sorted(spark_params | model_members):
        assert re.search(rf"\b{name}\b", spark_side), f"docs/spark.md does not map Spark's {name}"
    for method in re.findall(r"model\.(\w+)\(", ours):
        assert callable(getattr(blockals.ALS, method, None)), f"docs/spark.md offers model.{method}, which ALS lacks"
    accepted = set(blockals.ALS().get_params()) | set(inspect.signature(blockals.ingest).parameters)
    for method in ("fit", "recommend", "recommend_all", "predict"):
        accepted |= set(inspect.signature(getattr(blockals.ALS, method)).parameters)
    accepted |= set(inspect.signature(blockals.search).parameters)
    for argument in re.findall(r"(\w+)=", ours):
        assert argument in accepted, f"docs/spark.md offers {argument}=, which no blockals call takes"
