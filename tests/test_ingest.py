"""Ingest: every source form, ids, block balance, bad input, half-written stores, checksums.

Every check compares the store against a reference the test computes itself from the
source (pandas groupby, a dense matrix, sorted triples), never against earlier output of
blockals.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import zarr

import blockals
from blockals.ingest import combine_duplicates
from blockals.partition import BYTES_PER_RATING
from blockals.store import BLOCK_CACHE

SIDES = ("users", "items")


# -- helpers -----------------------------------------------------------------------------


def store_triples(store: blockals.RatingStore, side: str) -> pd.DataFrame:
    """(user, item, rating) of every stored rating, reassembled from one side's in-blocks."""
    other = "items" if side == "users" else "users"
    other_rows = [store.rows(other, j) for j in range(store.n_blocks(other))]
    starts = np.concatenate([[0], np.cumsum([len(r) for r in other_rows])])
    other_all = np.concatenate(other_rows)
    dst, src, rating = [], [], []
    for b in range(store.n_blocks(side)):
        rows = store.rows(side, b)
        ib = store.inblock(side, b)
        sb = ib.src_block.astype(np.int64)
        src_local = ib.need_rows[ib.need_ptr[sb] + ib.src_index.astype(np.int64)].astype(np.int64)
        row_src = other_all[starts[sb] + src_local]
        # Inside a row, ratings are sorted by source block, then source row: strictly
        # increasing positions in the source blocks laid end to end.
        same_row = ib.row[1:] == ib.row[:-1]
        position = starts[sb] + src_local
        assert np.all(position[1:][same_row] > position[:-1][same_row]), (side, b)
        dst.append(rows[ib.row])
        src.append(row_src)
        rating.append(ib.rating)
    dst, src = np.concatenate(dst), np.concatenate(src)
    users, items = (dst, src) if side == "users" else (src, dst)
    frame = pd.DataFrame(
        {
            "user": np.asarray(store.user_ids)[users],
            "item": np.asarray(store.item_ids)[items],
            "rating": np.concatenate(rating),
        }
    )
    return frame.sort_values(["user", "item"], kind="stable").reset_index(drop=True)


def assert_store_holds(store: blockals.RatingStore, expected: pd.DataFrame) -> None:
    """The store holds exactly the (user, item, rating) triples of ``expected``, on both sides."""
    exp = expected[["user", "item", "rating"]].sort_values(["user", "item"]).reset_index(drop=True)
    assert list(store.user_ids) == sorted(set(exp["user"].tolist()))
    assert list(store.item_ids) == sorted(set(exp["item"].tolist()))
    assert store.nnz == len(exp)
    for side in SIDES:
        got = store_triples(store, side)
        assert got["user"].tolist() == exp["user"].tolist(), side
        assert got["item"].tolist() == exp["item"].tolist(), side
        np.testing.assert_array_equal(got["rating"].to_numpy(), exp["rating"].to_numpy(np.float32))


def dense_from_store(store: blockals.RatingStore) -> np.ndarray:
    """Dense matrix indexed by global (user, item) index, from the user-side in-blocks."""
    dense = np.full((store.n_users, store.n_items), np.nan, dtype=np.float32)
    item_rows = [store.rows("items", j) for j in range(store.n_item_blocks)]
    for b in range(store.n_user_blocks):
        rows, ib = store.rows("users", b), store.inblock("users", b)
        sb = ib.src_block.astype(np.int64)
        local = ib.need_rows[ib.need_ptr[sb] + ib.src_index.astype(np.int64)]
        items = np.array([item_rows[j][l] for j, l in zip(sb, local)], dtype=np.int64)
        dense[rows[ib.row], items] = ib.rating
    return dense


def dense_reference(df: pd.DataFrame) -> np.ndarray:
    """Dense matrix indexed by position in the sorted unique ids, built without blockals."""
    users, items = sorted(set(df["user"].tolist())), sorted(set(df["item"].tolist()))
    upos = {u: k for k, u in enumerate(users)}
    ipos = {i: k for k, i in enumerate(items)}
    dense = np.full((len(users), len(items)), np.nan, dtype=np.float32)
    for u, i, r in zip(df["user"].tolist(), df["item"].tolist(), df["rating"].tolist()):
        dense[upos[u], ipos[i]] = r
    return dense


def make_ratings(n_users: int, n_items: int, nnz: int, seed: int) -> pd.DataFrame:
    """Unique (user, item) pairs with sparse integer ids, ratings in halves, in random order."""
    rng = np.random.default_rng(seed)
    pairs = rng.choice(n_users * n_items, nnz, replace=False)
    return pd.DataFrame(
        {
            "user": (pairs // n_items) * 7 + 3,
            "item": (pairs % n_items) * 11 + 100,
            "rating": rng.integers(1, 11, nnz) / 2.0,
            "timestamp": rng.integers(9 * 10**8, 10**9, nnz),
        }
    )


def root_attrs(path: Path) -> tuple[Path, dict]:
    meta_path = path / "zarr.json"
    return meta_path, json.loads(meta_path.read_text())


def edit_marker(path: Path, **changes) -> None:
    """Change the store's ``blockals`` attributes directly in the root ``zarr.json``."""
    meta_path, meta = root_attrs(path)
    meta["attributes"]["blockals"].update(changes)
    meta_path.write_text(json.dumps(meta))


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ratings() -> pd.DataFrame:
    return make_ratings(30, 20, 200, seed=0)


# -- 1. sources --------------------------------------------------------------------------


def _split(df: pd.DataFrame, n: int) -> list[pd.DataFrame]:
    return [df.iloc[k::n] for k in range(n)]


def src_pandas(df, tmp):
    renamed = df.rename(columns={"user": "uid", "item": "iid", "rating": "stars"})
    return renamed, dict(user_col="uid", item_col="iid", rating_col="stars"), df


def src_dask(df, tmp):
    return dd.from_pandas(df, npartitions=4, sort=False), {}, df


def src_csv(df, tmp):
    df.to_csv(tmp / "r.csv", index=False)
    return str(tmp / "r.csv"), {}, df


def src_csv_glob(df, tmp):
    for k, part in enumerate(_split(df, 3)):
        part.to_csv(tmp / f"part-{k}.csv", index=False)
    return str(tmp / "part-*.csv"), {}, df


def src_parquet_file(df, tmp):
    df.to_parquet(tmp / "r.parquet")
    return str(tmp / "r.parquet"), {}, df


def src_parquet_dir(df, tmp):
    (tmp / "pq").mkdir()
    for k, part in enumerate(_split(df, 3)):
        part.to_parquet(tmp / "pq" / f"part.{k}.parquet")
    return tmp / "pq", {}, df


def src_arrays(df, tmp):
    return (df["user"].to_numpy(), df["item"].to_numpy(), df["rating"].to_numpy()), {}, df


def src_lists(df, tmp):
    return (df["user"].tolist(), df["item"].tolist(), df["rating"].tolist()), {}, df


def _rows(df):
    return df[["user", "item", "rating", "timestamp"]].itertuples(index=False)


def _integer_ratings(df):
    out = df.copy()
    out["rating"] = np.ceil(out["rating"]).astype(int)
    return out


def src_ml100k(df, tmp):
    # ml-100k/u.data: user id | item id | rating | timestamp, tab-separated, no header.
    df = _integer_ratings(df)
    (tmp / "ml-100k").mkdir()
    lines = [f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in _rows(df)]
    (tmp / "ml-100k" / "u.data").write_text("".join(lines))
    return str(tmp / "ml-100k" / "u.data"), {}, df


def src_ml1m(df, tmp):
    # ml-1m/ratings.dat: UserID::MovieID::Rating::Timestamp, no header.
    df = _integer_ratings(df)
    lines = [f"{u}::{i}::{r}::{t}\n" for u, i, r, t in _rows(df)]
    (tmp / "ratings.dat").write_text("".join(lines))
    return str(tmp / "ratings.dat"), {}, df


def src_ml_latest(df, tmp):
    # ml-latest(-small)/ratings.csv: header userId,movieId,rating,timestamp; ratings like 4.0, 3.5.
    lines = ["userId,movieId,rating,timestamp\n"]
    lines += [f"{u},{i},{r:.1f},{t}\n" for u, i, r, t in _rows(df)]
    (tmp / "ratings.csv").write_text("".join(lines))
    return tmp / "ratings.csv", {}, df


SOURCES = [
    src_pandas,
    src_dask,
    src_csv,
    src_csv_glob,
    src_parquet_file,
    src_parquet_dir,
    src_arrays,
    src_lists,
    src_ml100k,
    src_ml1m,
    src_ml_latest,
]


@pytest.mark.parametrize("make_source", SOURCES, ids=lambda f: f.__name__[4:])
def test_sources_give_the_source_triples(make_source, ratings, tmp_path):
    source, kwargs, expected = make_source(ratings, tmp_path)
    store = blockals.ingest(source, tmp_path / "r.zarr", n_user_blocks=3, n_item_blocks=2, **kwargs)
    assert (store.n_user_blocks, store.n_item_blocks) == (3, 2)
    assert_store_holds(store, expected)
    reopened = blockals.open_store(tmp_path / "r.zarr")
    np.testing.assert_array_equal(dense_from_store(reopened), dense_reference(expected))


# -- 2. ids ------------------------------------------------------------------------------

INT64 = np.iinfo(np.int64)
ID_SETS = {
    "int64_extremes": (
        [int(INT64.min), -(10**15), -7, 0, 5, 2**40 + 1, 10**18, int(INT64.max)],
        [int(INT64.max), -1, 3, 10**17, int(INT64.min) + 1],
    ),
    "strings": (
        ["alice", "Bob", "émile", "10", "9", "zoë", "a b", "Alice"],
        ["movie:1", "movie:10", "movie:2", "ß", "日本"],
    ),
}


def _id_frame(user_ids, item_ids, seed=1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    pairs = [(u, i) for u in user_ids for i in item_ids if rng.random() < 0.6]
    # Every id appears at least once.
    pairs += [(u, item_ids[k % len(item_ids)]) for k, u in enumerate(user_ids)]
    pairs += [(user_ids[k % len(user_ids)], i) for k, i in enumerate(item_ids)]
    pairs = list(dict.fromkeys(pairs))
    order = rng.permutation(len(pairs))
    return pd.DataFrame(
        {
            "user": pd.Series([pairs[k][0] for k in order], dtype=object),
            "item": pd.Series([pairs[k][1] for k in order], dtype=object),
            "rating": rng.integers(1, 6, len(pairs)).astype(float),
        }
    )


@pytest.mark.parametrize("ids", list(ID_SETS), ids=str)
@pytest.mark.parametrize("via", ["pandas", "csv"])
def test_ids_are_sorted_unique_and_index_by_position(ids, via, tmp_path):
    user_ids, item_ids = ID_SETS[ids]
    df = _id_frame(user_ids, item_ids)
    if via == "csv":
        df.to_csv(tmp_path / "r.csv", index=False)
        source = tmp_path / "r.csv"
    elif ids == "int64_extremes":
        source = df.astype({"user": np.int64, "item": np.int64})
    else:
        source = df
    store = blockals.ingest(source, tmp_path / "r.zarr", n_user_blocks=3, n_item_blocks=2)

    assert list(store.user_ids) == sorted(user_ids)
    assert list(store.item_ids) == sorted(item_ids)
    if ids == "int64_extremes":
        assert np.asarray(store.user_ids).dtype == np.int64
    else:
        assert all(isinstance(v, str) for v in store.user_ids)
    # Global index = position in the sorted ids: the dense matrix by position matches.
    np.testing.assert_array_equal(dense_from_store(store), dense_reference(df))
    assert_store_holds(store, df)

    for side, n in (("users", len(user_ids)), ("items", len(item_ids))):
        block, local = store.assignment(side)
        assert block.shape == local.shape == (n,)
        seen = []
        for b in range(store.n_blocks(side)):
            rows = store.rows(side, b)
            np.testing.assert_array_equal(rows, np.flatnonzero(block == b))  # increasing global order
            np.testing.assert_array_equal(local[rows], np.arange(len(rows)))
            assert store.inblock(side, b).n_rows == len(rows)
            seen.extend(rows.tolist())
        assert sorted(seen) == list(range(n))


def test_text_ids_mixing_digits_and_words_stay_text(tmp_path):
    """A CSV column holding "10", "9" and "x" is a string column: "10" sorts before "9"."""
    (tmp_path / "r.csv").write_text("user,item,rating\n10,1,1\n9,1,2\nx,2,3\n")
    store = blockals.ingest(tmp_path / "r.csv", tmp_path / "r.zarr", n_user_blocks=1, n_item_blocks=1)
    assert list(store.user_ids) == ["10", "9", "x"]
    assert list(store.item_ids) == [1, 2]


# -- 3. balance --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zipf_ratings() -> pd.DataFrame:
    """Power-law user activity and item popularity; ids shuffled so id order says nothing."""
    rng = np.random.default_rng(3)
    n_users, n_items = 3000, 600
    activity = np.minimum(rng.zipf(1.7, n_users), 60)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.7
    popularity /= popularity.sum()
    users, items = [], []
    for u, k in enumerate(activity):
        users.append(np.full(k, u))
        items.append(rng.choice(n_items, k, replace=False, p=popularity))
    user_perm, item_perm = rng.permutation(n_users), rng.permutation(n_items)
    users, items = user_perm[np.concatenate(users)], item_perm[np.concatenate(items)]
    rating = rng.integers(1, 6, len(users)).astype(float)
    return pd.DataFrame({"user": users, "item": items, "rating": rating})


def snake_bound(counts: np.ndarray, n_blocks: int) -> int:
    """Largest difference of block totals a snake deal of ``counts`` can leave.

    Rows sorted by decreasing count are dealt in rounds of ``n_blocks``, forward then
    backward; in a forward round block p gains over block q > p at most the round's
    spread (first minus last count), in a backward round it loses at most that.
    """
    c = np.sort(counts)[::-1]
    rounds = np.concatenate([c, np.zeros(-len(c) % n_blocks, c.dtype)]).reshape(-1, n_blocks)
    spread = rounds[:, 0] - rounds[:, -1]
    return int(max(spread[0::2].sum(), spread[1::2].sum()))


def test_snake_deal_balances_rows_and_ratings(zipf_ratings, tmp_path):
    df = zipf_ratings
    blocks = {"users": 8, "items": 5}
    store = blockals.ingest(
        df, tmp_path / "z.zarr", n_user_blocks=blocks["users"], n_item_blocks=blocks["items"]
    )
    summary = store.summary()
    for side, col in (("users", "user"), ("items", "item")):
        counts = df.groupby(col).size()  # ratings per id, sorted by id
        assert list(store.ids(side)) == counts.index.tolist()
        block, _ = store.assignment(side)
        rows = np.bincount(block, minlength=blocks[side])
        nnz = np.bincount(block, weights=counts.to_numpy(), minlength=blocks[side]).astype(np.int64)
        # The stored in-blocks hold exactly these counts, and the stats report them.
        assert [store.inblock(side, b).nnz for b in range(blocks[side])] == nnz.tolist()
        assert store.block_rows(side).tolist() == rows.tolist()
        assert store.block_nnz(side).tolist() == nnz.tolist()

        assert rows.max() - rows.min() <= 1
        # Snake deal of the rows sorted by count: going forward, a lower block gains at
        # most the round's spread over a higher one; going back it loses at most that.
        bound = snake_bound(counts.to_numpy(), blocks[side])
        assert nnz.max() - nnz.min() <= bound, (side, nnz, bound)
        # On this data that bound is under 10% of a block's mean share, so every block's
        # ratings are within 10% of the mean, although the heaviest row holds
        # ~2% (users) and ~13% (items) of a block's share.
        assert bound <= 0.1 * nnz.mean()
        assert np.all(np.abs(nnz - nnz.mean()) <= 0.1 * nnz.mean()), nnz
        # Far better than a contiguous cut of the rows sorted by count.
        sorted_counts = np.sort(counts.to_numpy())[::-1]
        contiguous = np.array([c.sum() for c in np.array_split(sorted_counts, blocks[side])])
        assert nnz.max() - nnz.min() < (contiguous.max() - contiguous.min()) / 10

        # The summary shows the balance.
        line = next(l for l in summary.splitlines() if f"{blocks[side]} {side[:-1]} blocks" in l)
        assert f"rows min {rows.min():,} / mean {rows.mean():,.0f} / max {rows.max():,}" in line
        assert f"ratings min {nnz.min():,} / mean {nnz.mean():,.0f} / max {nnz.max():,}" in line
        assert f"(max/mean {nnz.max() / nnz.mean():.2f})" in line
    assert f"{df['user'].nunique():,} users x {df['item'].nunique():,} items, {len(df):,} ratings" in summary


# -- 4. block counts ---------------------------------------------------------------------


@pytest.mark.parametrize("n_user_blocks,n_item_blocks", [(1, 1), (3, 2), (7, 5)])
def test_explicit_block_counts_are_honoured(n_user_blocks, n_item_blocks, ratings, tmp_path):
    store = blockals.ingest(
        ratings, tmp_path / "r.zarr", n_user_blocks=n_user_blocks, n_item_blocks=n_item_blocks
    )
    assert (store.n_user_blocks, store.n_item_blocks) == (n_user_blocks, n_item_blocks)
    for side, n in (("users", n_user_blocks), ("items", n_item_blocks)):
        block, _ = store.assignment(side)
        assert sorted(set(block.tolist())) == list(range(n))  # every block has a row
    assert store.params["n_user_blocks"] == n_user_blocks
    assert store.params["n_item_blocks"] == n_item_blocks
    assert_store_holds(store, ratings)
    # Routing: user block b receives from item block j exactly the distinct items of j
    # that b's users rated (and the other way round).
    blocks = {}
    for side, col in (("users", "user"), ("items", "item")):
        ids = np.asarray(store.ids(side))
        blocks[col] = pd.Series(store.assignment(side)[0], index=ids)[ratings[col].to_numpy()].to_numpy()
    for side, col, other in (("users", "user", "item"), ("items", "item", "user")):
        pairs = pd.DataFrame({"dst": blocks[col], "src": blocks[other], "row": ratings[other].to_numpy()})
        need = pairs.drop_duplicates().groupby(["src", "dst"]).size()
        n_src = store.n_blocks("items" if side == "users" else "users")
        expected = np.zeros((n_src, store.n_blocks(side)), int)
        expected[need.index.get_level_values(0), need.index.get_level_values(1)] = need.to_numpy()
        np.testing.assert_array_equal(store.message_rows(side), expected)


def test_default_block_counts(tmp_path):
    one_user = pd.DataFrame({"user": [5, 5, 5], "item": [1, 2, 3], "rating": [1.0, 2.0, 3.0]})
    store = blockals.ingest(one_user, tmp_path / "one.zarr")
    assert store.n_user_blocks == 1
    assert 1 <= store.n_item_blocks <= 3

    small = make_ratings(30, 20, 200, seed=5)
    store = blockals.ingest(small, tmp_path / "small.zarr")
    for side, n in (("users", small["user"].nunique()), ("items", small["item"].nunique())):
        assert 1 <= store.n_blocks(side) <= n

    # With a small budget, more ratings need more blocks; each side gets at least as many
    # as the per-rating cost alone needs, capped by its number of rows.
    budget = 2000 * BYTES_PER_RATING
    big = make_ratings(200, 150, 6000, seed=6)
    stores = {
        "small": blockals.ingest(small, tmp_path / "s2.zarr", block_budget=budget),
        "big": blockals.ingest(big, tmp_path / "big.zarr", block_budget=budget),
    }
    for side in SIDES:
        assert stores["big"].n_blocks(side) > stores["small"].n_blocks(side)
    for name, df in (("small", small), ("big", big)):
        for side, col in (("users", "user"), ("items", "item")):
            n_rows = df[col].nunique()
            needed = math.ceil(len(df) * BYTES_PER_RATING / budget)
            assert min(needed, n_rows) <= stores[name].n_blocks(side) <= n_rows
    assert_store_holds(stores["big"], big)


# -- 5. bad input ------------------------------------------------------------------------


@pytest.fixture
def small() -> pd.DataFrame:
    return make_ratings(12, 9, 40, seed=7)[["user", "item", "rating"]].reset_index(drop=True)


def _with(df: pd.DataFrame, col: str, row: int, value, dtype=None) -> pd.DataFrame:
    out = df.copy()
    values = out[col].astype(dtype if dtype is not None else object).tolist()
    values[row] = value
    out[col] = pd.Series(values, dtype=dtype if dtype is not None else object)
    return out


BAD_VALUES = [
    # (id, column, row, value, column dtype (None: string ids), message)
    ("nan-rating", "rating", 17, np.nan, float, r"rating in row 17 is missing \(NaN\)"),
    ("inf-rating", "rating", 3, np.inf, float, r"rating in row 3 is inf; ratings must be finite"),
    ("minus-inf-rating", "rating", 4, -np.inf, float, r"rating in row 4 is -inf"),
    ("huge-rating", "rating", 5, 1e300, float, r"rating in row 5 is 1e\+300; ratings must be finite float32"),
    ("text-rating", "rating", 6, "four", object, r"rating in row 6 is 'four', which is not a number"),
    ("none-user", "user", 8, None, object, r"user id in row 8 is missing"),
    ("nan-user", "user", 9, np.nan, float, r"user id in row 9 is missing"),
    ("nan-item", "item", 10, np.nan, float, r"item id in row 10 is missing"),
    ("none-string-item", "item", 2, None, None, r"item id in row 2 is missing"),
    ("fraction-user", "user", 11, 2.5, float, r"user id in row 11 is 2\.5, which is not a whole number"),
    ("empty-item", "item", 12, "", None, r"item id in row 12 is an empty string; string ids need a character other than whitespace\."),
    ("blank-user", "user", 13, "   ", None, r"user id in row 13 is '   ', a blank string; string ids need a character"),
    ("str-among-ints", "user", 14, "abc", object,
     r"user id in row 14 is 'abc' of type str, but the column mixes types"),
    ("int-among-strs", "item", 6, 7, None, r"item id in row 6 is 7 of type int, but the column mixes types"),
    ("int-beyond-int64", "item", 15, 2**64, object, r"item id in row 15 is larger than int64 allows"),
    ("int-below-int64", "user", 16, -(2**63) - 1, object, r"user id in row 16 is larger than int64 allows"),
    ("float-beyond-int64", "user", 18, 1e19, float, r"user id in row 18 is larger than int64 allows"),
]


@pytest.mark.parametrize("col,row,value,dtype,match", [pytest.param(*c[1:], id=c[0]) for c in BAD_VALUES])
def test_bad_values_name_their_row(col, row, value, dtype, match, small, tmp_path):
    df = small
    if dtype is None:  # string ids
        df = df.assign(user=df["user"].map("u{}".format), item=df["item"].map("i{}".format))
        dtype = object
    bad = _with(df, col, row, value, dtype)
    with pytest.raises(blockals.InputError, match=match):
        blockals.ingest(bad, tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists()
    # The same error, with the same global row, when the frame arrives in several partitions
    # (object columns kept as objects: Dask would otherwise turn them into text).
    with dask.config.set({"dataframe.convert-string": False}):
        frame = dd.from_pandas(bad, npartitions=4, sort=False)
    with pytest.raises(blockals.InputError, match=match):
        blockals.ingest(frame, tmp_path / "r.zarr")


def test_partitions_are_numbered_globally(small, tmp_path):
    """Rows are counted across partitions, empty partitions included."""
    parts = [small.iloc[:10], small.iloc[:0], small.iloc[10:20], small.iloc[20:30], small.iloc[30:]]
    frame = dd.from_delayed([dask.delayed(p) for p in parts], meta=small.iloc[:0])
    store = blockals.ingest(frame, tmp_path / "ok.zarr", n_user_blocks=3, n_item_blocks=3)
    assert_store_holds(store, small)

    bad = parts[3].copy()
    bad.iloc[7, bad.columns.get_loc("rating")] = np.nan
    frame = dd.from_delayed([dask.delayed(p) for p in (*parts[:3], bad, parts[4])], meta=small.iloc[:0])
    with pytest.raises(blockals.InputError, match=r"rating in row 27 is missing"):
        blockals.ingest(frame, tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists()


def _counted_read(args: tuple[str, pd.DataFrame, int]) -> pd.DataFrame:
    """A partition that leaves a file behind each time it is read."""
    folder, part, index = args
    Path(folder, f"{index}-{len(list(Path(folder).glob(f'{index}-*')))}").touch()
    return part


@pytest.mark.parametrize("kind", ["int", "text"])
def test_the_source_is_read_once_and_the_scratch_removed(client, small, kind, tmp_path):
    reads = tmp_path / "reads"
    reads.mkdir()
    df = small if kind == "int" else small.assign(user="u" + small["user"].astype(str), item=small["item"] * 10)
    parts = [(str(reads), df.iloc[i : i + 10], p) for p, i in enumerate(range(0, len(df), 10))]
    frame = dd.from_map(_counted_read, parts, meta=df.iloc[:0])
    store = blockals.ingest(frame, tmp_path / "r.zarr", n_user_blocks=3, n_item_blocks=2)
    assert_store_holds(store, df)
    assert sorted(f.name for f in reads.iterdir()) == [f"{p}-0" for p in range(len(parts))]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["r.zarr", "reads"]  # no scratch left beside it

    # A source refused in its last partition, over a complete store: the store stays, no scratch is left.
    bad = df.assign(rating=np.where(np.arange(len(df)) == len(df) - 1, np.nan, df["rating"]))
    with pytest.raises(blockals.InputError, match=rf"rating in row {len(df) - 1} is missing"):
        blockals.ingest(dd.from_pandas(bad, npartitions=3, sort=False), tmp_path / "r.zarr", overwrite=True)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["r.zarr", "reads"]
    assert_store_holds(blockals.open_store(tmp_path / "r.zarr"), df)


def _slow_or_failing_read(args: tuple[pd.DataFrame, int]) -> pd.DataFrame:
    part, index = args
    if index == 0:
        raise OSError("partition 0 is unreadable")
    time.sleep(0.3)  # still scanning, and writing its scratch, when partition 0 has failed
    return part


@pytest.mark.parametrize("scheduler", [None, "threads"], ids=["distributed", "threads"])
def test_a_failing_partition_leaves_nothing_once_ingest_returns(scheduler, client2, small, tmp_path):
    parts = [(small.iloc[i : i + 10], p) for p, i in enumerate(range(0, 60, 10))]
    frame = dd.from_map(_slow_or_failing_read, parts, meta=small.iloc[:0])
    with dask.config.set(scheduler=scheduler), pytest.raises(OSError, match="partition 0 is unreadable"):
        blockals.ingest(frame, tmp_path / "r.zarr", block_budget=2**20)
    time.sleep(0.5)  # what a scan task still running would write lands by now
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["threads", "distributed"])
def test_each_pass_reports_its_tasks_and_its_duration(where, client2, small, capsys, tmp_path):
    frame = dd.from_pandas(small, npartitions=4, sort=False)
    with client2.as_current() if where == "distributed" else contextlib.nullcontext():
        store = blockals.ingest(frame, tmp_path / "r.zarr", n_user_blocks=3, n_item_blocks=2, verbose=2)
    assert_store_holds(store, small)
    out, err = capsys.readouterr()
    assert "\r" not in err  # standard error is not a terminal here: plain lines, as in a log
    passes = (("scan", frame.npartitions, "partitions"), ("stage", frame.npartitions, "partitions"),
              ("users", 3, "blocks"), ("items", 2, "blocks"))
    for name, total, unit in passes:
        counts = [int(line.split(": ")[1].split("/")[0]) for line in err.splitlines()
                  if line.startswith(f"ingest {name}: ")]
        assert counts == sorted(counts) and counts[-1] == total and set(counts) >= {total // 2}, (name, err)
        assert f"ingest {name}: {total}/{total} {unit}\n" in err
    assert [line.split(" in ")[0] for line in out.splitlines()] == [f"ingest {n}: {t} {u}" for n, t, u in passes]
    assert all(re.fullmatch(r".* in \d+\.\d\d s", line) for line in out.splitlines())


def test_ingest_is_quiet_by_default(small, capsys, tmp_path):
    assert_store_holds(blockals.ingest(small, tmp_path / "r.zarr", n_user_blocks=3, n_item_blocks=2), small)
    assert capsys.readouterr() == ("", "")


def test_csv_errors_deep_in_the_file_name_the_row(tmp_path):
    rng = np.random.default_rng(8)
    n = 5000
    df = pd.DataFrame(
        {"user": rng.integers(0, 500, n), "item": rng.integers(0, 400, n), "rating": rng.integers(1, 6, n)}
    ).astype(str)
    bad = df.copy()
    bad.loc[4321, "rating"] = "n/a?"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(blockals.InputError, match=r"rating in row 4321 is 'n/a\?', which is not a number"):
        blockals.ingest(tmp_path / "bad.csv", tmp_path / "r.zarr")
    # In a glob, rows are counted across the files in sorted order (headers not counted).
    df.iloc[:3000].to_csv(tmp_path / "g-0.csv", index=False)
    bad.iloc[3000:].to_csv(tmp_path / "g-1.csv", index=False)
    with pytest.raises(blockals.InputError, match=r"rating in row 4321 is 'n/a\?'"):
        blockals.ingest(str(tmp_path / "g-*.csv"), tmp_path / "r.zarr")
    # An empty field is a missing rating.
    (tmp_path / "empty.csv").write_text("user,item,rating\n1,1,3\n1,2,\n2,1,4\n")
    with pytest.raises(blockals.InputError, match=r"rating in row 1 is missing"):
        blockals.ingest(tmp_path / "empty.csv", tmp_path / "r.zarr")
    # Ids beyond int64, written as text.
    big = df.copy()
    big.loc[3999, "user"] = "99999999999999999999"
    big.to_csv(tmp_path / "big.csv", index=False)
    with pytest.raises(blockals.InputError, match=r"user id in row 3999 is larger than int64 allows"):
        blockals.ingest(tmp_path / "big.csv", tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists()


def test_missing_column_names_it_and_lists_the_columns(small, tmp_path):
    df = small.rename(columns={"rating": "stars"})
    message = r"rating column 'rating' is not in the source; its columns are 'user', 'item', 'stars'"
    with pytest.raises(blockals.InputError, match=message):
        blockals.ingest(df, tmp_path / "r.zarr")
    message = r"user column 'userid' is not in the source.*'user', 'item', 'stars'"
    with pytest.raises(blockals.InputError, match=message):
        blockals.ingest(df, tmp_path / "r.zarr", user_col="userid", rating_col="stars")
    df.to_csv(tmp_path / "r.csv", index=False)
    with pytest.raises(blockals.InputError, match=r"rating column 'score' is not in the source.*'stars'"):
        blockals.ingest(tmp_path / "r.csv", tmp_path / "r.zarr", rating_col="score")
    assert not (tmp_path / "r.zarr").exists()


def test_empty_sources_are_refused(tmp_path):
    empty = pd.DataFrame({"user": np.array([], np.int64), "item": np.array([], np.int64), "rating": []})
    with pytest.raises(blockals.InputError, match=r"pandas DataFrame has no ratings"):
        blockals.ingest(empty, tmp_path / "r.zarr")
    with pytest.raises(blockals.InputError, match=r"user column 'user' is not in the source"):
        blockals.ingest(pd.DataFrame(), tmp_path / "r.zarr")
    (tmp_path / "h.csv").write_text("user,item,rating\n")
    with pytest.raises(blockals.InputError, match=r"h\.csv has no ratings"):
        blockals.ingest(tmp_path / "h.csv", tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists()


def _first_duplicate(df: pd.DataFrame) -> tuple:
    """(count, user, item, first row, second row) of the first row repeating an earlier pair."""
    dup = df.duplicated(["user", "item"], keep="first").to_numpy()
    second = int(np.flatnonzero(dup)[0])
    u, i = df["user"].iloc[second], df["item"].iloc[second]
    first = int(np.flatnonzero((df["user"] == u).to_numpy() & (df["item"] == i).to_numpy())[0])
    return int(dup.sum()), u, i, first, second


@pytest.fixture
def with_duplicates(small) -> pd.DataFrame:
    """``small`` with 4 repeated rows: the pair of row 22 again at row 25 (the first repeat),
    the pair of row 5 twice near the end (three rows in all), the pair of row 30 once."""
    again = [
        small.iloc[[22]].assign(rating=0.5),
        small.iloc[[5]].assign(rating=1.5),
        small.iloc[[30]],
        small.iloc[[5]].assign(rating=4.0),
    ]
    return pd.concat([small.iloc[:25], again[0], small.iloc[25:], *again[1:]], ignore_index=True)


@pytest.mark.parametrize("blocks", [(1, 1), (3, 2), (4, 4)])
def test_duplicates_refused_by_default(with_duplicates, blocks, tmp_path):
    df = with_duplicates
    n_dup, u, i, first, second = _first_duplicate(df)
    assert (n_dup, first, second) == (4, 22, 25)  # the fixture is what it claims
    with pytest.raises(blockals.InputError) as info:
        blockals.ingest(dd.from_pandas(df, npartitions=3, sort=False), tmp_path / "r.zarr",
                        n_user_blocks=blocks[0], n_item_blocks=blocks[1])
    assert f"the source has {n_dup} duplicate (user, item) pairs" in str(info.value)
    assert f"the first being user {u} and item {i} in rows {first} and {second}" in str(info.value)
    # It failed after writing had begun: nothing is left that looks like a store.
    assert not (tmp_path / "r.zarr").exists()


def test_duplicate_message_with_string_ids(tmp_path):
    df = pd.DataFrame({"user": ["a", "b", "b", "a"], "item": ["x", "y", "y", "x"], "rating": [1.0, 2, 3, 4]})
    message = r"2 duplicate \(user, item\) pairs, the first being user 'b' and item 'y' in rows 1 and 2"
    with pytest.raises(blockals.InputError, match=message):
        blockals.ingest(df, tmp_path / "r.zarr", n_user_blocks=1, n_item_blocks=1)


@pytest.mark.parametrize("policy", ["sum", "last", "mean"])
def test_duplicates_combined(with_duplicates, policy, tmp_path):
    df = with_duplicates
    expected = getattr(df.groupby(["user", "item"], sort=True)["rating"], policy)().reset_index()
    store = blockals.ingest(dd.from_pandas(df, npartitions=3, sort=False), tmp_path / "r.zarr",
                            n_user_blocks=3, n_item_blocks=2, duplicates=policy)
    assert store.nnz == len(expected) == df[["user", "item"]].drop_duplicates().shape[0]
    assert store.params["duplicates_resolved"] == _first_duplicate(df)[0]
    assert_store_holds(store, expected)
    assert store.stats["rating_mean"] == pytest.approx(expected["rating"].mean())


@pytest.mark.parametrize("policy", ["sum", "last", "mean", "error"])
@pytest.mark.parametrize("row_order", ["ascending", "shuffled"])
def test_combine_duplicates_against_pandas(policy, row_order):
    rng = np.random.default_rng(3)
    n = 4000
    dst, src = rng.integers(0, 40, n), rng.integers(0, 30, n)  # about 3 ratings per pair
    rating = rng.integers(1, 11, n).astype(np.float32) / 2
    row = np.arange(n) if row_order == "ascending" else rng.permutation(n)
    combined = combine_duplicates(dst, src, rating, row, policy, time=row * 10)
    df = pd.DataFrame({"dst": dst, "src": src, "rating": rating.astype(np.float64), "row": row}).sort_values("row")
    groups = df.groupby(["dst", "src"], sort=True)
    repeats = df[df.duplicated(["dst", "src"])]
    assert combined.n_duplicates == len(repeats)
    first_repeat = repeats.iloc[0]
    earliest = groups["row"].min()[(first_repeat["dst"], first_repeat["src"])]
    assert combined.example == (first_repeat["dst"], first_repeat["src"], earliest, first_repeat["row"])
    if policy == "error":  # unresolved, sorted by (dst, src, row)
        expected = df.sort_values(["dst", "src", "row"])
        np.testing.assert_array_equal(combined.time, expected["row"].to_numpy() * 10)
    else:
        expected = getattr(groups["rating"], policy)().reset_index()
        np.testing.assert_array_equal(combined.time, groups["row"].max().to_numpy() * 10)
    np.testing.assert_array_equal(combined.dst, expected["dst"])
    np.testing.assert_array_equal(combined.src, expected["src"])
    np.testing.assert_allclose(combined.rating, expected["rating"], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(duplicates="bogus"), r"duplicates must be one of error, sum, last, mean; got 'bogus'"),
        (dict(n_user_blocks=0), r"n_user_blocks must be a positive integer, got 0"),
        (dict(n_user_blocks=-1), r"n_user_blocks must be a positive integer, got -1"),
        (dict(n_user_blocks=1.5), r"n_user_blocks must be a positive integer, got 1\.5"),
        (dict(n_item_blocks="2"), r"n_item_blocks must be a positive integer, got '2'"),
        (dict(n_user_blocks=True), r"n_user_blocks must be a positive integer, got True"),
        (dict(n_user_blocks=13), r"n_user_blocks=13 is larger than the number of users \(12\)"),
        (dict(n_item_blocks=10), r"n_item_blocks=10 is larger than the number of items \(9\)"),
        (dict(verbose=-1), r"verbose must be at least 0, got -1"),
        (dict(verbose="yes"), r"verbose must be an integer, got 'yes'"),
    ],
)
def test_bad_parameters(kwargs, match, tmp_path):
    df = pd.DataFrame({"user": np.repeat(np.arange(12), 9), "item": np.tile(np.arange(9), 12), "rating": 1.0})
    assert (df["user"].nunique(), df["item"].nunique()) == (12, 9)
    with pytest.raises(blockals.InputError, match=match):
        blockals.ingest(df, tmp_path / "r.zarr", **kwargs)
    assert not (tmp_path / "r.zarr").exists()


def test_bad_sources(small, tmp_path):
    with pytest.raises(blockals.InputError, match=r"source '.*nope\.csv' does not exist"):
        blockals.ingest(tmp_path / "nope.csv", tmp_path / "r.zarr")
    with pytest.raises(blockals.InputError, match=r"source '.*part-\*\.csv' does not exist"):
        blockals.ingest(str(tmp_path / "part-*.csv"), tmp_path / "r.zarr")
    message = r"source must be a DataFrame, a path, \(users, items, ratings\) arrays or a sparse matrix, got int"
    with pytest.raises(blockals.InputError, match=message):
        blockals.ingest(42, tmp_path / "r.zarr")
    with pytest.raises(blockals.InputError, match=r"got dict"):
        blockals.ingest(small.to_dict("list"), tmp_path / "r.zarr")
    with pytest.raises(blockals.InputError, match=r"three 1-D arrays of one length"):
        blockals.ingest((small["user"], small["item"], small["rating"][:-1]), tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists()


def test_array_sources_keep_id_types(tmp_path):
    users, items, ratings = ["b", "a", "c", "a"], [3, 1, 2, 2], [1.0, 2.0, 3.0, 4.0]
    store = blockals.ingest((users, items, ratings), tmp_path / "r.zarr", n_user_blocks=1, n_item_blocks=1)
    assert_store_holds(store, pd.DataFrame({"user": users, "item": items, "rating": ratings}))
    # A list mixing numbers and text is refused, not read as text.
    message = r"user id in row 2 is 'x' of type str, but the column mixes types"
    with pytest.raises(blockals.InputError, match=message):
        blockals.ingest(([1, 2, "x", 3], items, ratings), tmp_path / "bad.zarr")
    assert not (tmp_path / "bad.zarr").exists()


def test_array_ids_beyond_int64(tmp_path):
    users = np.array([1, 2, 2**63 + 5, 3], dtype=np.uint64)
    with pytest.raises(blockals.InputError, match=r"user id in row 2 is larger than int64 allows"):
        blockals.ingest((users, np.arange(4), np.ones(4)), tmp_path / "r.zarr")


# -- 6. nothing half-written looks complete ---------------------------------------------


def test_completion_marker_and_version_are_checked(ratings, tmp_path):
    path = tmp_path / "r.zarr"
    blockals.ingest(ratings, path, n_user_blocks=2, n_item_blocks=2)
    meta = root_attrs(path)[1]["attributes"]["blockals"]
    assert meta["complete"] is True and meta["format_version"] == 1
    blockals.open_store(path)

    edit_marker(path, complete=False)
    with pytest.raises(blockals.StoreError, match=r"incomplete"):
        blockals.open_store(path)
    edit_marker(path, complete=True, format_version=99)
    with pytest.raises(blockals.StoreError, match=r"format version 99.*reads version 1"):
        blockals.open_store(path)
    meta_path, meta = root_attrs(path)
    del meta["attributes"]["blockals"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(blockals.StoreError, match=r"not a blockals"):
        blockals.open_store(path)
    with pytest.raises(blockals.StoreError, match=r"not a blockals store"):
        blockals.open_store(tmp_path / "nothing-here")


def test_open_store_refuses_unreadable_metadata(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "zarr.json").write_text("{not json")
    with pytest.raises(blockals.StoreError, match=r"broken"):
        blockals.open_store(tmp_path / "broken")


def test_existing_store_needs_overwrite(ratings, tmp_path):
    path = tmp_path / "r.zarr"
    first = blockals.ingest(ratings, path, n_user_blocks=2, n_item_blocks=2)
    other = make_ratings(10, 8, 30, seed=11)
    message = r"already holds a complete ratings store; pass overwrite=True"
    with pytest.raises(blockals.InputError, match=message):
        blockals.ingest(other, path)
    assert_store_holds(blockals.open_store(path), ratings)

    # A bad source with overwrite=True fails validation and leaves the old store alone.
    bad = other.assign(rating=np.where(np.arange(len(other)) == 4, np.nan, other["rating"]))
    with pytest.raises(blockals.InputError, match=r"rating in row 4"):
        blockals.ingest(bad, path, overwrite=True)
    assert_store_holds(blockals.open_store(path), ratings)

    second = blockals.ingest(other, path, overwrite=True, n_user_blocks=3, n_item_blocks=1)
    assert second.store_id != first.store_id
    reopened = blockals.open_store(path)
    assert (reopened.n_user_blocks, reopened.n_item_blocks) == (3, 1)
    assert_store_holds(reopened, other)


def test_non_store_directories_are_left_alone(ratings, tmp_path):
    target = tmp_path / "mine"
    (target / "sub").mkdir(parents=True)
    (target / "notes.txt").write_text("precious")
    (target / "sub" / "data.bin").write_bytes(b"\x00\x01\x02")
    before = tree(target)
    for overwrite in (False, True):
        with pytest.raises(blockals.InputError, match=r"exists and is not a blockals store"):
            blockals.ingest(ratings, target, overwrite=overwrite)
        assert tree(target) == before

    # Another Zarr group (not ours) is not ours to replace either.
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").create_array("x", shape=(3,), dtype="i4")[...] = [1, 2, 3]
    before = tree(other)
    with pytest.raises(blockals.InputError, match=r"not a blockals store"):
        blockals.ingest(ratings, other, overwrite=True)
    assert tree(other) == before

    # Nor is a directory whose zarr.json is unreadable.
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "zarr.json").write_text("{not json")
    with pytest.raises(blockals.InputError, match=r"not a blockals store"):
        blockals.ingest(ratings, tmp_path / "broken", overwrite=True)
    assert (tmp_path / "broken" / "zarr.json").read_text() == "{not json"

    # A plain file is not replaced.
    (tmp_path / "file").write_text("keep")
    with pytest.raises(blockals.InputError, match=r"not a blockals store"):
        blockals.ingest(ratings, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "keep"

    # An empty directory is fine to write into.
    (tmp_path / "empty").mkdir()
    assert_store_holds(blockals.ingest(ratings, tmp_path / "empty"), ratings)


def test_interrupted_ingest_is_replaced_cleanly(ratings, tmp_path):
    path = tmp_path / "r.zarr"
    old = make_ratings(25, 15, 100, seed=12)
    blockals.ingest(old, path, n_user_blocks=5, n_item_blocks=5)
    # What an interrupted run leaves: no completion marker, staging data, stray blocks.
    edit_marker(path, complete=False)
    (path / "_staging" / "parts" / "0").mkdir(parents=True)
    (path / "_staging" / "parts" / "0" / "junk").write_bytes(b"junk")
    with pytest.raises(blockals.StoreError, match=r"incomplete"):
        blockals.open_store(path)

    store = blockals.ingest(ratings, path, n_user_blocks=2, n_item_blocks=3)  # no overwrite needed
    assert not (path / "_staging").exists()
    assert not (path / "users" / "blocks" / "4").exists()  # nothing of the old run survives
    assert_store_holds(blockals.open_store(path), ratings)
    assert (store.n_user_blocks, store.n_item_blocks) == (2, 3)


def hidden(path: Path) -> list[str]:
    """The hidden siblings of ``path`` (what a run writing it stages beside it)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def test_an_overwrite_failing_in_its_last_pass_keeps_the_previous_store(ratings, small, tmp_path):
    path = tmp_path / "r.zarr"
    blockals.ingest(ratings, path, n_user_blocks=2, n_item_blocks=2)
    # The last partition repeats a pair of the first: found only once the user blocks are
    # built, after the source was staged and the store begun.
    source = dd.from_pandas(pd.concat([small, small.iloc[[3]]], ignore_index=True), npartitions=3, sort=False)
    with pytest.raises(blockals.InputError, match=r"1 duplicate \(user, item\) pair"):
        blockals.ingest(source, path, overwrite=True, n_user_blocks=3, n_item_blocks=2)
    assert_store_holds(blockals.open_store(path), ratings)
    assert hidden(path) == []


def test_kill_9_mid_ingest_keeps_the_old_store_and_a_rerun_cleans_up(tmp_path):
    path = tmp_path / "r.zarr"
    old = make_ratings(25, 15, 100, seed=12)
    blockals.ingest(old, path)
    big = make_ratings(4000, 1000, 600_000, seed=3)
    big.to_csv(tmp_path / "big.csv", index=False)
    command = [sys.executable, "-m", "blockals.cli", "ingest", str(tmp_path / "big.csv"), str(path), "--overwrite"]
    victim = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(".ingest-" in name for name in hidden(path)):
        assert victim.poll() is None and time.monotonic() < deadline, "the ingest ended before it staged the store"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert hidden(path)  # it was killed mid-write, leaving its staged store
    assert_store_holds(blockals.open_store(path), old)

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert hidden(path) == []
    store = blockals.open_store(path)
    assert (store.nnz, store.n_users, store.n_items) == (len(big), big["user"].nunique(), big["item"].nunique())


def test_a_store_path_overlapping_its_source_is_refused_before_anything_is_written(ratings, tmp_path):
    source = tmp_path / "parts"
    source.mkdir()
    ratings.iloc[:100].to_parquet(source / "a.parquet")
    ratings.iloc[100:].to_parquet(source / "b.parquet")
    before = tree(source)
    cases = [
        (source, str(source), r"the store path .*parts is the source .*parts;"),
        (source, str(source / "r.zarr"), r"the store path .*parts/r\.zarr lies inside the source .*parts;"),
        (str(source / "*.parquet"), str(source / "a.parquet"), r"the store path .*a\.parquet is the source .*a\.parquet;"),
        (str(source / "*.parquet"), str(tmp_path), r"the store path .* contains the source .*a\.parquet;"),
    ]
    for src, target, match in cases:
        with pytest.raises(blockals.InputError, match=match):
            blockals.ingest(src, target, overwrite=True)
        assert tree(source) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts"]


def test_a_symlinked_store_path_is_replaced_at_its_target(ratings, tmp_path):
    real, link = tmp_path / "v1.zarr", tmp_path / "current.zarr"
    blockals.ingest(ratings.iloc[:50], real)
    link.symlink_to(real)
    store = blockals.ingest(ratings, link, overwrite=True)
    assert store.path == str(real) and link.is_symlink() and link.resolve() == real
    assert_store_holds(blockals.open_store(link), ratings)
    assert hidden(real) == [] and hidden(link) == []


# -- 7. checksums ------------------------------------------------------------------------


def test_corrupted_chunk_is_detected(ratings, tmp_path):
    path = tmp_path / "r.zarr"
    blockals.ingest(ratings, path, n_user_blocks=2, n_item_blocks=2)
    array_dir = path / "users" / "blocks" / "0" / "rating"
    chunks = [p for p in array_dir.rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(chunks) == 1
    data = bytearray(chunks[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunks[0].write_bytes(bytes(data))

    BLOCK_CACHE.clear()
    store = blockals.open_store(path)
    with pytest.raises(blockals.StoreError, match=r"users/blocks/0/rating is corrupted"):
        store.inblock("users", 0)
    # Other blocks are intact.
    assert store.inblock("users", 1).nnz == store.block_nnz("users")[1]
    BLOCK_CACHE.clear()


def test_a_deleted_chunk_file_is_an_error_not_zeros(tmp_path):
    from blockals.store import BLOCK_CACHE

    frame = pd.DataFrame({"user": [0, 0, 1], "item": [0, 1, 1], "rating": [0.0, 0.0, 0.0]})
    blockals.ingest(frame, tmp_path / "z.zarr", n_user_blocks=1, n_item_blocks=1)
    chunks = list((tmp_path / "z.zarr" / "users" / "blocks" / "0" / "rating" / "c").rglob("*"))
    files = [c for c in chunks if c.is_file()]
    assert files  # all-zero ratings still have their chunk written
    files[0].unlink()
    BLOCK_CACHE.clear()
    with pytest.raises(blockals.StoreError, match=r"users/blocks/0/rating is damaged: 1 of its 1 chunk files"):
        blockals.open_store(tmp_path / "z.zarr").inblock("users", 0)


@pytest.mark.parametrize("memory_limit,expected", [("400MiB", 100 * 2**20), ("8GiB", 2**30), (0, 2**30)],
                         ids=["quarter-of-limit", "capped-at-1GiB", "no-limit"])
def test_block_cache_leaves_a_worker_room_for_its_solves(memory_limit, expected):
    import dask
    from distributed import Client, LocalCluster

    from blockals.cluster import cache_bytes

    with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit=memory_limit, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        assert client.submit(cache_bytes, pure=False).result() == expected  # inside a task, as the solves call it
    assert cache_bytes() == 2**30  # not on a worker
    with dask.config.set({"blockals.block-cache-bytes": 12345}):
        assert cache_bytes() == 12345


@pytest.mark.parametrize("memory_limit,threads,expected", [("600MiB", 1, 200 * 2**20), ("600MiB", 2, 100 * 2**20),
                                                           (0, 1, 256 * 2**20)],
                         ids=["one-thread", "two-threads", "no-limit"])
def test_block_budget_defaults_to_a_third_of_a_worker_threads_memory(memory_limit, threads, expected, tmp_path):
    from distributed import Client, LocalCluster

    frame = make_ratings(40, 30, 300, seed=3)
    with LocalCluster(n_workers=1, threads_per_worker=threads, memory_limit=memory_limit, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster):
        store = blockals.ingest(frame, tmp_path / "r.zarr")
        given = blockals.ingest(frame, tmp_path / "s.zarr", block_budget=12345)
    assert store.params["block_budget"] == expected
    assert given.params["block_budget"] == 12345  # a given budget is used and recorded as given


def test_two_ingests_of_one_path_at_once_one_is_refused_the_other_writes_the_store(tmp_path):
    """Two `blockals ingest` runs to one path: the second, started while the first holds
    the path's lease, is refused in one sentence (exit 2, no traceback); the first writes
    the store whole."""
    import os

    from conftest import run_twice_at_once

    frame = make_ratings(400, 300, 30_000, seed=8)[["user", "item", "rating"]]
    source, path = tmp_path / "r.csv", tmp_path / "r.zarr"
    frame.to_csv(source, index=False)
    command = [sys.executable, "-m", "blockals.cli", "ingest", str(source), str(path)]
    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": ""}
    second = run_twice_at_once(command, tmp_path / "r.zarr.lock", env)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert lines[0].startswith(f"blockals: error: ratings store {path} is being written by another process "
                               f"(process {second.first_pid} on "), lines[0]
    assert lines[0].endswith("; wait for it to finish or write to another path.")
    assert_store_holds(blockals.open_store(path), frame)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.zarr"]
