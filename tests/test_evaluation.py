"""Metrics against per-user brute force written here."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

import blockals
from blockals.evaluation import evaluate, ranking_metrics, split, top_k_order
from test_model import random_ratings, to_frame


def brute_user(scores, relevant, excluded, k):
    """One user's metrics, by the written definitions, with plain Python."""
    candidates = [j for j in range(scores.size) if j not in set(excluded)]
    ranked = sorted(candidates, key=lambda j: (-scores[j], j))
    rel = set(relevant) & set(candidates)
    top = ranked[:k]
    hits = [1 if j in rel else 0 for j in top]
    n_rel = len(set(relevant))
    dcg = sum(h / math.log2(p + 2) for p, h in enumerate(hits))
    idcg = sum(1 / math.log2(p + 2) for p in range(min(k, n_rel)))
    ap = sum(sum(hits[: p + 1]) / (p + 1) for p in range(len(hits)) if hits[p]) / min(k, n_rel)
    pos = [scores[j] for j in candidates if j in rel]
    neg = [scores[j] for j in candidates if j not in rel]
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in pos for b in neg]
    return {
        "precision": sum(hits) / k,
        "recall": sum(hits) / n_rel,
        "ndcg": dcg / idcg,
        "map": ap,
        "auc": sum(pairs) / len(pairs) if pairs else float("nan"),
    }


@pytest.mark.parametrize("k", [1, 3, 5, 20])
def test_ranking_metrics_match_brute_force(k):
    rng = np.random.default_rng(1)
    n, m = 30, 12
    scores = rng.integers(0, 5, (n, m)).astype(float)  # ties everywhere
    relevant = [rng.choice(m, rng.integers(1, 5), replace=False) for _ in range(n)]
    excluded = [rng.choice(m, rng.integers(0, 9), replace=False) for _ in range(n)]
    excluded[0] = np.setdiff1d(np.arange(m), relevant[0])[:-1]  # fewer candidates than k
    got = ranking_metrics(scores, relevant, excluded, k)
    for r in range(n):
        expected = brute_user(scores[r], relevant[r], excluded[r], k)
        for name, value in expected.items():
            if math.isnan(value):
                assert math.isnan(got[name][r])
            else:
                assert got[name][r] == pytest.approx(value), (name, r)


@pytest.mark.parametrize("k", [0, 1, 4, 9, 15])
def test_top_k_order_is_the_head_of_a_sort_by_score_then_index(k):
    rng = np.random.default_rng(k)
    scores = rng.integers(0, 4, (40, 9)).astype(float)  # ties at every k-th score
    scores[rng.random(scores.shape) < 0.2] = -np.inf  # excluded items
    scores[3] = -np.inf
    scores[5, 2] = np.nan
    got = top_k_order(scores, k)
    for r, row in enumerate(scores):
        key = [(-(v if not math.isnan(v) else -math.inf), j) for j, v in enumerate(row)]
        assert list(got[r]) == [j for _, j in sorted(key)][:k], r


def test_evaluate_matches_brute_force(client2, tmp_path):
    R, M = random_ratings(50, 30, 0.2, seed=4)
    store = blockals.ingest(to_frame(R, M), tmp_path / "r.zarr", n_user_blocks=3, n_item_blocks=2)
    model = blockals.ALS(rank=3, max_iter=3, reg=0.1, biases=True, dtype="float64").fit(store, client2)
    got = evaluate(model, store, None, k=4, relevance=3.0, client=client2)
    pred = (model.global_mean_ + model.user_bias_[:, None] + model.item_bias_[None, :]
            + model.user_factors_ @ model.item_factors_.T)
    err = (pred - R)[M]
    assert got["rmse"] == pytest.approx(np.sqrt(np.mean(err**2)))
    assert got["mae"] == pytest.approx(np.mean(np.abs(err)))
    scores = model.user_factors_ @ model.item_factors_.T + model.item_bias_[None, :]
    per_user = [brute_user(scores[u], np.flatnonzero(M[u] & (R[u] > 3.0)), [], 4)
                for u in range(50) if (M[u] & (R[u] > 3.0)).any()]
    for name in ("precision", "recall", "ndcg", "map"):
        assert got[f"{name}@4"] == pytest.approx(np.mean([p[name] for p in per_user]))
    assert got["auc"] == pytest.approx(np.nanmean([p["auc"] for p in per_user]))
    assert got["n_ranked_users"] == len(per_user)


def triples(store):
    rows = [store.triples("users", b) for b in range(store.n_user_blocks)]
    u = np.concatenate([r[0] for r in rows])
    i = np.concatenate([r[1] for r in rows])
    return set(zip(store.user_ids[u], store.item_ids[i]))


@pytest.fixture(scope="module")
def source():
    R, M = random_ratings(80, 50, 0.25, seed=9)
    return to_frame(R, M)


@pytest.mark.parametrize("method", ["random", "leave_k_out", "ratio"])
def test_split_partitions_the_ratings_and_keeps_ids_and_blocks(method, source, tmp_path):
    store = blockals.ingest(source, tmp_path / "all.zarr", n_user_blocks=3, n_item_blocks=2)
    train, test = split(store, tmp_path / "train.zarr", tmp_path / "test.zarr", method=method, fraction=0.3, k=2, seed=5)
    everything = set(zip(source["user"], source["item"]))
    assert triples(train) | triples(test) == everything and not triples(train) & triples(test)
    for s in (train, test):
        assert list(s.user_ids) == list(store.user_ids) and list(s.item_ids) == list(store.item_ids)
        np.testing.assert_array_equal(s.assignment("users")[0], store.assignment("users")[0])
    per_user = source.groupby("user").size()
    in_test = pd.Series([u for u, _ in triples(test)]).value_counts().reindex(per_user.index, fill_value=0)
    if method == "leave_k_out":
        np.testing.assert_array_equal(in_test, np.where(per_user > 2, 2, 0))
    elif method == "ratio":
        np.testing.assert_array_equal(in_test, np.floor(0.3 * per_user))
    else:
        assert abs(len(triples(test)) / len(everything) - 0.3) < 0.05
    # The same seed on another block split picks the same pairs.
    other = blockals.ingest(source, tmp_path / "other.zarr", n_user_blocks=1, n_item_blocks=1)
    _, test2 = split(other, tmp_path / "tr2.zarr", tmp_path / "te2.zarr", method=method, fraction=0.3, k=2, seed=5)
    assert triples(test2) == triples(test)


def test_evaluate_on_a_split_excludes_training_items(source, client2, tmp_path):
    store = blockals.ingest(source, tmp_path / "all.zarr", n_user_blocks=3, n_item_blocks=2)
    train, test = split(store, tmp_path / "train.zarr", tmp_path / "test.zarr", method="ratio", fraction=0.3)
    model = blockals.ALS(rank=3, max_iter=3, reg=0.1, dtype="float64").fit(train, client2)
    got = evaluate(model, test, train, k=5, client=client2)
    scores = model.user_factors_ @ model.item_factors_.T
    uid, iid = pd.Index(model.user_ids_), pd.Index(model.item_ids_)
    seen = pd.DataFrame(list(triples(train)), columns=["u", "i"]).groupby("u")["i"].apply(list)
    held = pd.DataFrame(list(triples(test)), columns=["u", "i"]).groupby("u")["i"].apply(list)
    per_user = [brute_user(scores[uid.get_loc(u)], iid.get_indexer(items), iid.get_indexer(seen.get(u, [])), 5)
                for u, items in held.items()]
    for name in ("precision", "recall", "ndcg", "map"):
        assert got[f"{name}@5"] == pytest.approx(np.mean([p[name] for p in per_user]))
    pairs = np.array(list(triples(test)))
    truth = source.set_index(["user", "item"]).loc[list(map(tuple, pairs)), "rating"].to_numpy()
    pred = model.predict(pairs[:, 0], pairs[:, 1])
    assert got["rmse"] == pytest.approx(np.sqrt(np.mean((pred - truth) ** 2)))


def test_split_and_evaluate_refuse_bad_arguments(source, tmp_path):
    store = blockals.ingest(source, tmp_path / "all.zarr")
    with pytest.raises(blockals.InputError, match="method must be one of"):
        split(store, tmp_path / "a", tmp_path / "b", method="by_time")
    with pytest.raises(blockals.InputError, match="fraction must be above 0 and below 1"):
        split(store, tmp_path / "a", tmp_path / "b", fraction=1.5)
    other = blockals.ingest(source[source["user"] != source["user"].iloc[0]], tmp_path / "other.zarr")
    with pytest.raises(blockals.InputError, match="is not in"):
        blockals.ingest(source, tmp_path / "c.zarr", like=other)


def test_temporal_split_holds_out_each_users_latest_ratings(tmp_path):
    frame = blockals.datasets.synthetic_frame(300, 120, 6000, seed=2)
    frame["timestamp"] = frame["timestamp"] // 86400  # coarse days: ties between ratings happen
    store = blockals.ingest(frame, tmp_path / "all.zarr", timestamp_col="timestamp", n_user_blocks=3, n_item_blocks=2)
    assert store.has_timestamps
    train, test = split(store, tmp_path / "train.zarr", tmp_path / "test.zarr", method="temporal", fraction=0.25)
    assert train.has_timestamps and test.has_timestamps
    held = set(triples(test))
    is_test = np.array([(u, i) in held for u, i in zip(frame["user"], frame["item"])])
    for user, group in frame.assign(test=is_test).groupby("user"):
        n_test = int(np.floor(0.25 * len(group)))
        assert group["test"].sum() == n_test
        if n_test:
            assert group.loc[group["test"], "timestamp"].min() >= group.loc[~group["test"], "timestamp"].max()


def test_temporal_split_needs_timestamps_and_bad_timestamps_are_named(source, tmp_path):
    store = blockals.ingest(source, tmp_path / "all.zarr")
    with pytest.raises(blockals.InputError, match="temporal split needs timestamps"):
        split(store, tmp_path / "a", tmp_path / "b", method="temporal")
    bad = source.assign(timestamp=np.where(np.arange(len(source)) == 7, np.nan, 1.0e9))
    with pytest.raises(blockals.InputError, match="timestamp in row 7 is nan, not a whole number"):
        blockals.ingest(bad, tmp_path / "c.zarr", timestamp_col="timestamp")


def test_movielens_files_bring_their_timestamps(tmp_path):
    (tmp_path / "u.data").write_text("1\t10\t5\t881250949\n2\t10\t3\t891717742\n2\t11\t4\t878887116\n")
    store = blockals.ingest(tmp_path / "u.data", tmp_path / "ml.zarr")
    assert store.has_timestamps
    times = np.concatenate([blockals.store.load_times(store.ref, b) for b in range(store.n_user_blocks)])
    assert sorted(times) == [878887116, 881250949, 891717742]


def test_split_and_evaluate_report_their_passes_only_when_asked(source, client2, capsys, tmp_path):
    store = blockals.ingest(source, tmp_path / "all.zarr", n_user_blocks=3, n_item_blocks=2)
    train, test = split(store, tmp_path / "train.zarr", tmp_path / "test.zarr", method="ratio", fraction=0.3,
                        verbose=2)
    assert triples(train) | triples(test) == set(zip(source["user"], source["item"]))
    assert not triples(train) & triples(test)
    out, err = capsys.readouterr()
    assert "\r" not in err  # standard error is not a terminal here: plain lines, as in a log
    for name in ("train", "test"):  # each ingest's passes: the source's partitions are the user blocks
        for step, total, unit in (("scan", 3, "partitions"), ("stage", 3, "partitions"), ("users", 3, "blocks"),
                                  ("items", 2, "blocks")):
            assert f"split {name} {step}: {total}/{total} {unit}\n" in err
            assert re.search(rf"^split {name} {step}: {total} {unit} in \d+\.\d\d s$", out, re.M)

    model = blockals.ALS(rank=3, max_iter=2, reg=0.1, dtype="float64").fit(train, client2)
    capsys.readouterr()
    got = evaluate(model, test, train, k=5, client=client2, verbose=2)
    out, err = capsys.readouterr()
    assert err == "evaluate: 1/3 blocks\nevaluate: 2/3 blocks\nevaluate: 3/3 blocks\n"
    assert re.fullmatch(r"evaluate: 3 blocks in \d+\.\d\d s\n", out)
    pairs = pd.DataFrame(list(triples(test)), columns=["user", "item"]).merge(source, on=["user", "item"])
    u = pd.Index(model.user_ids_).get_indexer(pairs["user"])
    i = pd.Index(model.item_ids_).get_indexer(pairs["item"])
    pred = np.einsum("ij,ij->i", model.user_factors_[u], model.item_factors_[i])
    assert got["rmse"] == pytest.approx(np.sqrt(np.mean((pred - pairs["rating"]) ** 2)))
    assert got["n_test_ratings"] == len(pairs)
    assert evaluate(model, test, train, k=5, client=client2) == got  # quiet by default
    assert capsys.readouterr() == ("", "")


def tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_split_refuses_outputs_overlapping_its_input_or_each_other(source, tmp_path):
    store = blockals.ingest(source, tmp_path / "all.zarr", n_user_blocks=2, n_item_blocks=2)
    before = tree(tmp_path / "all.zarr")
    cases = [
        (tmp_path / "all.zarr", tmp_path / "te.zarr", r"the train store .*all\.zarr is the input store .*all\.zarr;"),
        (tmp_path / "tr.zarr", tmp_path / "all.zarr", r"the test store .*all\.zarr is the input store .*all\.zarr;"),
        (tmp_path / "tr.zarr", tmp_path / "tr.zarr", r"the train store .*tr\.zarr is the test store .*tr\.zarr;"),
        (tmp_path / "all.zarr" / "tr", tmp_path / "te.zarr", r"the train store .*all\.zarr/tr lies inside the input store"),
        (tmp_path, tmp_path / "te.zarr", r"the train store .* contains the input store .*all\.zarr;"),
    ]
    for train, test, match in cases:
        with pytest.raises(blockals.InputError, match=match):
            split(store, train, test, overwrite=True)
        assert tree(tmp_path / "all.zarr") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.zarr"]
    assert triples(blockals.open_store(tmp_path / "all.zarr")) == set(zip(source["user"], source["item"]))


def test_split_failing_on_its_test_side_keeps_both_previous_outputs(source, tmp_path, monkeypatch):
    import blockals.evaluation as evaluation

    store = blockals.ingest(source, tmp_path / "all.zarr", n_user_blocks=2, n_item_blocks=2)
    old_train, old_test = source.iloc[:40], source.iloc[40:90]
    blockals.ingest(old_train, tmp_path / "tr.zarr")
    blockals.ingest(old_test, tmp_path / "te.zarr")
    real = evaluation._split_part

    def failing_on_test(block, **kwargs):
        if kwargs["test"]:
            raise OSError("the test side is unreadable")
        return real(block, **kwargs)

    monkeypatch.setattr(evaluation, "_split_part", failing_on_test)  # a failure injected after train is written
    with pytest.raises(OSError, match="the test side is unreadable"):
        split(store, tmp_path / "tr.zarr", tmp_path / "te.zarr", overwrite=True)
    assert triples(blockals.open_store(tmp_path / "tr.zarr")) == set(zip(old_train["user"], old_train["item"]))
    assert triples(blockals.open_store(tmp_path / "te.zarr")) == set(zip(old_test["user"], old_test["item"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.zarr", "te.zarr", "tr.zarr"]  # nothing staged is left

    monkeypatch.setattr(evaluation, "_split_part", real)
    train, test = split(store, tmp_path / "tr.zarr", tmp_path / "te.zarr", overwrite=True)
    assert triples(train) | triples(test) == set(zip(source["user"], source["item"]))
