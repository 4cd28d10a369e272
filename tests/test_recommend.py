"""Recommendations, similarity and fold-in against dense brute force."""

from __future__ import annotations

import re
import sys

import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster

import blockals
from blockals.recommend import Seen, recommend_rows, seen_csr
from blockals.recstore import read_recommendations
from conftest import run_twice_at_once
from test_model import random_ratings, to_frame


def brute_top(scores, k):
    """Sort each row by (-score, column) and keep the finite ones among the first k."""
    out = []
    for row in scores:
        order = sorted(range(row.size), key=lambda j: (-row[j], j))
        out.append([j for j in order[:k] if np.isfinite(row[j])])
    return out


@pytest.mark.parametrize("k", [1, 3, 7, 12])
@pytest.mark.parametrize("n_items", [9, 2000])
def test_recommend_rows_with_ties_exclusions_and_short_rows(k, n_items):
    # 0/1 factors make integer scores, so ties are exact; 2000 items at rank 40 span several
    # tiles of columns, and 150 rows several groups of rows.
    rng = np.random.default_rng(k)
    U = rng.integers(0, 2, (150, 40)).astype(np.float32)
    V = rng.integers(0, 2, (n_items, 40)).astype(np.float32)
    bias = rng.integers(-2, 3, n_items).astype(float)
    seen = [np.flatnonzero(rng.random(n_items) < 0.3) for _ in range(150)]
    seen[0] = np.arange(n_items)  # a row with no candidates
    seen[1] = rng.permutation(seen[1])  # any order
    candidates = np.flatnonzero(rng.random(n_items) < 0.8)
    S = U.astype(float) @ V.T.astype(float) + bias
    for r, items in enumerate(seen):
        S[r, items] = -np.inf
    S[:, np.setdiff1d(np.arange(n_items), candidates)] = -np.inf
    idx, val = recommend_rows(U, V, k, bias, seen_csr(seen), candidates)
    for r, expected in enumerate(brute_top(S, k)):
        got = [j for j in idx[r] if j >= 0]
        assert got == expected
        np.testing.assert_array_equal(val[r, : len(got)], S[r, got])
        assert np.isnan(val[r, len(got) :]).all() and (idx[r, len(got) :] == -1).all()


@pytest.mark.parametrize("k", [1, 10, 40])
def test_recommend_rows_that_stop_on_the_norm_bound(k):
    # Item norms over eight orders of magnitude put the best scores in the first tiles, so
    # rows stop early; a few items of tiny norm carry a bias large enough to win anyway.
    # Seen items come as indices into a lookup array, as a user block's in-block holds them.
    rng = np.random.default_rng(k)
    n_items = 9000
    U = rng.standard_normal((70, 8))
    V = rng.standard_normal((n_items, 8)) * np.exp(rng.uniform(-9, 9, n_items))[:, None]
    bias = np.zeros(n_items)
    small = np.argsort(np.linalg.norm(V, axis=1))[:3]
    bias[small] = 1e9
    lookup = rng.permutation(n_items)[:4000]
    local = [rng.choice(lookup.size, rng.integers(0, 50), replace=False) for _ in range(70)]
    local[0] = np.flatnonzero(np.isin(lookup, small))  # the first row has seen the biased items
    seen = seen_csr(local)
    S = U @ V.T + bias
    for r, rows in enumerate(local):
        S[r, lookup[rows]] = -np.inf
    idx, val = recommend_rows(U, V, k, bias, Seen(seen.indptr, seen.items, lookup))
    for r, expected in enumerate(brute_top(S, k)):
        assert list(idx[r]) == expected
        np.testing.assert_allclose(val[r], S[r, expected], rtol=1e-12)  # summed in another order


@pytest.fixture(scope="module")
def trained(tmp_path_factory, request):
    from conftest import cluster_client

    R, M = random_ratings(60, 40, 0.15, seed=21)
    path = tmp_path_factory.mktemp("rec") / "r.zarr"
    store = blockals.ingest(to_frame(R, M), path, n_user_blocks=3, n_item_blocks=2)
    models = {
        "explicit": blockals.ALS(rank=4, max_iter=3, reg=0.1, dtype="float64"),
        "biased": blockals.ALS(rank=4, max_iter=3, reg=0.1, biases=True, dtype="float64"),
        "implicit": blockals.ALS(rank=4, max_iter=3, reg=0.1, implicit=True, alpha=2.0, dtype="float64"),
        "wals": blockals.ALS(rank=4, max_iter=3, reg=0.1, weighting="wals", unobserved_weight=0.2, dtype="float64"),
        "nonnegative": blockals.ALS(rank=4, max_iter=3, reg=0.1, nonnegative=True, dtype="float64"),
    }
    client = cluster_client(2)
    return R, M, store, {name: m.fit(store, client) for name, m in models.items()}


def dense_scores(model):
    S = model.user_factors_.astype(float) @ model.item_factors_.astype(float).T
    if hasattr(model, "item_bias_"):
        S = S + model.item_bias_[None, :]
    return S


@pytest.mark.parametrize("name", ["explicit", "biased"])
def test_recommend_matches_brute_force(trained, name):
    R, M, store, models = trained
    model = models[name]
    users = np.array([1000, 1005, 1059, 999_999])  # the last is unknown: left out
    recs = model.recommend(users, n=5)
    S = dense_scores(model)
    S[M] = -np.inf  # seen items excluded
    for u in users[:3]:
        expected = brute_top(S[[u - 1000]], 5)[0]
        got = recs[recs["user"] == u].sort_values("rank")
        assert list(got["item"]) == [3 * j for j in expected]
        np.testing.assert_allclose(got["score"], S[u - 1000, expected])
    assert 999_999 not in set(recs["user"])
    # Restricted to some items, seen ones included.
    some = model.recommend([1002], n=3, exclude_seen=False, items=[0, 3, 6, 9])
    expected = brute_top(dense_scores(model)[[2]][:, [0, 1, 2, 3]], 3)[0]
    assert list(some["item"]) == [3 * j for j in expected]


def test_recommend_users_and_similar(trained):
    R, M, store, models = trained
    model = models["explicit"]
    got = model.recommend_users([0, 3], n=4)
    S = dense_scores(model).T
    for item in (0, 3):
        assert list(got[got["item"] == item]["user"]) == [1000 + j for j in brute_top(S[[item // 3]], 4)[0]]
    for side, F, ids in (("items", model.item_factors_, model.item_ids_), ("users", model.user_factors_, model.user_ids_)):
        unit = F / np.linalg.norm(F, axis=1, keepdims=True)
        C = unit @ unit.T
        np.fill_diagonal(C, -np.inf)
        frame = model.similar_items(ids[:3], n=5) if side == "items" else model.similar_users(ids[:3], n=5)
        for r in range(3):
            key = "item" if side == "items" else "user"
            got = list(frame[frame[key] == ids[r]]["similar"])
            assert got == list(ids[brute_top(C[[r]], 5)[0]])


def test_recommend_all_equals_brute_force(trained, client2, tmp_path):
    R, M, store, models = trained
    model = models["biased"]
    out = model.recommend_all(6, tmp_path / "recs", client=client2)
    recs = read_recommendations(out)
    S = dense_scores(model)
    S[M] = -np.inf
    for u in range(R.shape[0]):
        got = recs[recs["user"] == 1000 + u]
        assert list(got["item"]) == [3 * j for j in brute_top(S[[u]], 6)[0]]
        np.testing.assert_allclose(got["score"], S[u, got["item"].to_numpy() // 3], rtol=1e-6)


def test_recommend_all_runs_within_a_worker_memory_limit_below_the_score_matrix(tmp_path):
    # 20,000 users x 6,000 items: the float64 score matrix alone is 960 MB.
    rng = np.random.default_rng(3)
    n_users, n_items = 20_000, 6_000
    users = np.repeat(np.arange(n_users), 3)
    items = rng.integers(0, n_items, users.size)
    df = pd.DataFrame({"user": users, "item": items, "rating": rng.integers(1, 6, users.size).astype(float)})
    df = pd.concat([df, pd.DataFrame({"user": 0, "item": np.arange(n_items), "rating": 3.0})])
    store = blockals.ingest(df, tmp_path / "big.zarr", duplicates="last", n_user_blocks=8, n_item_blocks=2)
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="600MiB", host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        model = blockals.ALS(rank=4, max_iter=1, reg=0.1).fit(store, client)
        out = model.recommend_all(3, tmp_path / "recs", client=client)
    recs = read_recommendations(out)
    # User 0 rated every item, so it has no candidates left; everyone else has three.
    assert set(recs["user"]) == set(range(1, n_users)) and len(recs) == 3 * (n_users - 1)
    sample = rng.choice(n_users, 50, replace=False)
    seen = df.groupby("user")["item"].apply(set)
    S = model.user_factors_[sample].astype(float) @ model.item_factors_.astype(float).T
    for r, u in enumerate(sample):
        S[r, list(seen[u])] = -np.inf
        assert list(recs[recs["user"] == u]["item"]) == brute_top(S[[r]], 3)[0]


@pytest.mark.parametrize("name", ["explicit", "biased", "implicit", "wals", "nonnegative"])
def test_fold_in_equals_the_last_half_step(trained, name):
    R, M, store, models = trained
    model = models[name]
    u = np.array([4, 17, 33])
    rows, cols = np.nonzero(M[u])
    ratings = pd.DataFrame({"user": u[rows] + 1000, "item": cols * 3, "rating": R[u[rows], cols]})
    result = model.fold_in(ratings)
    np.testing.assert_array_equal(result.ids, u + 1000)
    np.testing.assert_allclose(result.factors, model.user_factors_[u], atol=1e-8)
    if name == "biased":
        np.testing.assert_allclose(result.biases, model.user_bias_[u], atol=1e-8)


def test_fold_in_implicit_and_update(trained):
    R, M, store, models = trained
    model = models["implicit"]
    rows, items, ratings = store.triples("users", 0)
    frame = pd.DataFrame({"user": store.user_ids[rows], "item": store.item_ids[items], "rating": ratings})
    result = model.fold_in(frame)
    np.testing.assert_allclose(result.factors, model.user_factors_[np.searchsorted(model.user_ids_, result.ids)], atol=1e-8)
    # A new user is appended; predicting for it then works.
    new = pd.DataFrame({"user": [5000, 5000], "item": [0, 3], "rating": [5.0, 1.0]})
    model.fold_in(new, update=True)
    assert model.user_ids_[-1] == 5000 and model.user_factors_.shape[0] == R.shape[0] + 1
    assert np.isfinite(model.predict([5000], [0])).all()


def test_fold_in_refuses_unknown_items(trained):
    model = trained[3]["explicit"]
    with pytest.raises(blockals.InputError, match="item id in row 1 .* is not known"):
        model.fold_in(pd.DataFrame({"user": [1, 1], "item": [0, 1], "rating": [1.0, 2.0]}))


def test_fold_in_items_equals_the_last_item_half_step(trained, tmp_path):
    R, M, store, models = trained
    # One iteration: the item factors were solved from the initial user factors, which
    # the model no longer holds; refit with max_iter=1 and fold items in against X0.
    from blockals.kernels import init_factors

    from conftest import cluster_client

    model = blockals.ALS(rank=4, max_iter=1, reg=0.1, dtype="float64").fit(store, cluster_client(2))
    model.user_factors_ = init_factors(np.arange(R.shape[0]), 4, 0, "users", "float64")
    j = np.array([0, 5, 11])
    rows, cols = np.nonzero(M[:, j])
    ratings = pd.DataFrame({"user": rows + 1000, "item": j[cols] * 3, "rating": R[rows, j[cols]]})
    result = model.fold_in(ratings, side="items")
    np.testing.assert_allclose(result.factors, model.item_factors_[j], atol=1e-8)


def brute_all(model, side, M, exclude_seen=True):
    """Dense scores of every row of ``side`` against the other side, seen pairs at -inf."""
    if side == "users":
        S = dense_scores(model)
    else:
        S = model.item_factors_.astype(float) @ model.user_factors_.astype(float).T
        if hasattr(model, "user_bias_"):
            S = S + model.user_bias_[None, :]
    if exclude_seen:
        S[M if side == "users" else M.T] = -np.inf
    return S


def read_any(out, fmt):
    if fmt == "zarr":
        return read_recommendations(out)
    return pd.read_parquet(out).sort_values(list(pd.read_parquet(out).columns[:2]), ignore_index=True)


@pytest.mark.parametrize("side", ["users", "items"])
@pytest.mark.parametrize("fmt", ["zarr", "parquet", "frame"])
def test_recommend_all_to_each_format_for_either_side_equals_brute_force(trained, client2, tmp_path, fmt, side):
    R, M, store, models = trained
    model = models["biased"]
    output = None if fmt == "frame" else tmp_path / ("recs.parquet" if fmt == "parquet" else "recs")
    out = model.recommend_all(4, output, client=client2, side=side)
    recs = out if fmt == "frame" else read_any(out, fmt)
    S = brute_all(model, side, M)
    row, other = ("user", "item") if side == "users" else ("item", "user")
    row_ids, other_ids = (1000 + np.arange(60), 3 * np.arange(40)) if side == "users" else (3 * np.arange(40), 1000 + np.arange(60))
    assert list(recs.columns) == [row, "rank", other, "score"]
    for r in range(S.shape[0]):
        got = recs[recs[row] == row_ids[r]].sort_values("rank")
        assert list(got[other]) == list(other_ids[brute_top(S[[r]], 4)[0]])
        np.testing.assert_allclose(got["score"], S[r, np.searchsorted(other_ids, got[other])], rtol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ([] if output is None else [output.name])


def test_a_parquet_output_replaces_only_its_own_kind_and_only_when_whole(trained, client2, tmp_path):
    R, M, store, models = trained
    model = models["explicit"]
    foreign = tmp_path / "mine.parquet"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(blockals.InputError, match="is not a blockals Parquet output"):
        model.recommend_all(2, foreign, client=client2)
    assert (foreign / "notes.txt").read_text() == "keep me"
    out = tmp_path / "recs.parquet"
    model.recommend_all(2, out, client=client2)
    model.recommend_all(3, out, client=client2)  # a rerun replaces the earlier result
    assert set(pd.read_parquet(out)["rank"]) == {1, 2, 3}
    with pytest.raises(blockals.InputError, match="format must be one of"):
        model.recommend_all(2, tmp_path / "x", format="csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.parquet", "recs.parquet"]


@pytest.mark.parametrize("source", ["frame", "csr"])
def test_a_model_fitted_without_a_store_keeps_what_each_user_rated(source, client2, tmp_path):
    import scipy.sparse as sp

    R, M = random_ratings(50, 30, 0.2, seed=5)
    users, items = np.nonzero(M)
    if source == "frame":
        data, user_ids, item_ids = to_frame(R, M), 1000 + np.arange(50), 3 * np.arange(30)
    else:  # implicit's layout: a users x items CSR matrix whose indices are the ids
        data, user_ids, item_ids = sp.csr_array((R[users, items], (users, items)), shape=R.shape), np.arange(50), np.arange(30)
    model = blockals.ALS(rank=3, max_iter=2, reg=0.1, dtype="float64").fit(data, client2)
    assert model.store_path_ is None
    np.testing.assert_array_equal(model.user_items_.toarray(), M)
    S = dense_scores(model)
    S[M] = -np.inf
    recs = model.recommend(user_ids[7], n=5)  # one id, not a list
    assert list(recs["item"]) == list(item_ids[brute_top(S[[7]], 5)[0]])
    every = model.recommend_all(5)
    for u in range(50):
        assert list(every[every["user"] == user_ids[u]]["item"]) == list(item_ids[brute_top(S[[u]], 5)[0]])
    model.save(tmp_path / "m.zarr")
    again = blockals.ALS.load(tmp_path / "m.zarr")
    np.testing.assert_array_equal(again.user_items_.toarray(), M)
    pd.testing.assert_frame_equal(again.recommend(user_ids[7], n=5), recs)


def test_folded_in_users_are_not_recommended_their_own_items(trained, client2, tmp_path):
    R, M, store, models = trained
    models["explicit"].save(tmp_path / "m.zarr")
    model = blockals.ALS.load(tmp_path / "m.zarr")  # a copy: the fixture's models are shared
    new = pd.DataFrame({"user": [5000] * 4 + [1003], "item": [0, 3, 6, 9, 12], "rating": [5.0, 4.0, 1.0, 3.0, 2.0]})
    model.fold_in(new, update=True)
    S = dense_scores(model)
    S[:60][M] = -np.inf
    S[60, [0, 1, 2, 3]] = -np.inf  # the new user's items (ids 3j)
    S[3, 4] = -np.inf  # a known user's folded-in rating joins the store's
    for u, row in ((5000, 60), (1003, 3)):
        assert list(model.recommend(u, n=6)["item"]) == [3 * j for j in brute_top(S[[row]], 6)[0]]
    for fmt, output in (("frame", None), ("zarr", tmp_path / "recs")):
        out = model.recommend_all(6, output, client=client2)
        recs = out if fmt == "frame" else read_recommendations(out)
        assert list(recs[recs["user"] == 5000]["item"]) == [3 * j for j in brute_top(S[[60]], 6)[0]]


def test_ids_one_at_a_time_and_item_filters_match_brute_force(trained):
    R, M, store, models = trained
    model = models["explicit"]
    np.testing.assert_allclose(model.predict(1004, 6), model.predict([1004], [6]))
    pd.testing.assert_frame_equal(model.recommend(1004, n=3), model.recommend([1004], n=3))
    S = dense_scores(model)
    S[M] = -np.inf
    S[:, [1, 2]] = -np.inf
    recs = model.recommend([1004, 1010], n=4, filter_items=[3, 6, 999])
    for u in (4, 10):
        assert list(recs[recs["user"] == 1000 + u]["item"]) == [3 * j for j in brute_top(S[[u]], 4)[0]]
    F = model.item_factors_.astype(float)
    C = (F @ F.T) / np.outer(np.linalg.norm(F, axis=1), np.linalg.norm(F, axis=1))
    allowed = np.full(40, -np.inf)
    allowed[[1, 2, 5, 7, 8]] = 0
    allowed[[7, 0]] = -np.inf  # filtered, and the item itself
    got = model.similar_items(0, n=3, among=[3, 6, 15, 21, 24], filter_items=[21])
    assert list(got["similar"]) == [3 * j for j in brute_top(C[[0]] + allowed, 3)[0]]


def test_a_failed_recommend_all_leaves_the_earlier_output_as_it_was(trained, client2, tmp_path):
    R, M, store, models = trained
    model = models["explicit"]
    # Item factors of another rank: every scoring task fails, after the output was started.
    broken = blockals.ALS(rank=4)
    broken.__dict__.update({k: v for k, v in model.__dict__.items() if k.endswith("_")})
    broken.item_factors_ = model.item_factors_[:, :3]
    for name in ("recs", "recs.parquet"):
        out = tmp_path / name
        model.recommend_all(2, out, client=client2)
        before = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file())
        with pytest.raises(ValueError, match="could not broadcast"):
            broken.recommend_all(3, out, client=client2)
        assert sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before
    assert read_recommendations(tmp_path / "recs")["rank"].max() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recs", "recs.parquet"]  # nothing staged is left


def test_recommend_all_reports_its_blocks_only_when_asked(trained, client2, capsys):
    R, M, store, models = trained
    model = models["explicit"]
    recs = model.recommend_all(3, client=client2, verbose=2)
    out, err = capsys.readouterr()
    assert err == "".join(f"recommend users: {d}/3 blocks\n" for d in (1, 2, 3))
    assert re.fullmatch(r"recommend users: 3 blocks in \d+\.\d\d s\n", out)
    S = dense_scores(model)
    S[M] = -np.inf
    for u in range(R.shape[0]):
        got = recs[recs["user"] == 1000 + u].sort_values("rank")
        assert list(got["item"]) == [3 * j for j in brute_top(S[[u]], 3)[0]]
    users = model.recommend_all(2, client=client2, side="items")  # quiet by default
    assert capsys.readouterr() == ("", "") and users["item"].nunique() == R.shape[1]
    with pytest.raises(blockals.InputError, match=r"^verbose must be at least 0, got -1\.$"):
        model.recommend_all(2, client=client2, verbose=-1)


def test_a_second_recommend_to_an_output_being_written_is_refused(trained, client2, tmp_path):
    """Two `blockals recommend --output` runs to one path: the one that comes second while the
    first writes is refused in one sentence (both read the store, which they may share), and
    the first one's output is whole."""
    R, M, store, models = trained
    model = models["explicit"]
    model.save(tmp_path / "m.zarr")
    out = tmp_path / "recs"
    command = [sys.executable, "-m", "blockals.cli", "recommend", str(tmp_path / "m.zarr"), "--output", str(out),
               "--n", "5", "--scheduler", client2.scheduler.address]
    second = run_twice_at_once(command, tmp_path / "recs.lock")
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert lines[0].startswith(f"blockals: error: recommendations {out} is being written by another process "
                               f"(process {second.first_pid} on "), lines[0]
    recs = read_recommendations(out)
    S = dense_scores(model)
    S[M] = -np.inf
    for u in range(R.shape[0]):
        assert list(recs[recs["user"] == 1000 + u]["item"]) == [3 * j for j in brute_top(S[[u]], 5)[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zarr", "recs"]  # no lease, nothing staged, is left
