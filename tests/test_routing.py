"""In-blocks and out-blocks against brute force: every rating's factor arrives, nothing else."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import blockals
from blockals.partition import assign_blocks
from blockals.routing import build_inblock


def sparse(n_users, n_items, density, seed, empty_users=0):
    rng = np.random.default_rng(seed)
    M = rng.random((n_users, n_items)) < density
    M[:empty_users] = False
    u, i = np.nonzero(M)
    return u, i, rng.integers(1, 11, u.size) / 2.0


def deliver(store_or_blocks, side, Y_global, rows_of_src):
    """Simulate a half-step's routing toward ``side``: the factor row each rating receives."""
    received = {}
    for b, inblock in store_or_blocks:
        messages = [Y_global[rows_of_src[j]][inblock.out_block(j)] for j in range(len(rows_of_src))]
        received[b] = np.concatenate(messages)[inblock.col]
    return received


@pytest.mark.parametrize("blocks", [(1, 1), (3, 2), (7, 5)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("density", [0.02, 0.3])
def test_built_inblocks_route_exactly_what_is_needed(blocks, density):
    n_users, n_items = 60, 45
    u, i, r = sparse(n_users, n_items, density, seed=int(density * 100), empty_users=3)
    ub, ul = assign_blocks(np.bincount(u, minlength=n_users), blocks[0])
    ib, il = assign_blocks(np.bincount(i, minlength=n_items), blocks[1])
    item_rows = [np.flatnonzero(ib == j) for j in range(blocks[1])]
    Y = np.random.default_rng(1).standard_normal((n_items, 4))
    total_shipped = 0
    for b in range(blocks[0]):
        m = ub[u] == b
        inblock = build_inblock(ul[u[m]], ib[i[m]], il[i[m]], i[m], r[m], int((ub == b).sum()), blocks[1])
        rows = np.flatnonzero(ub == b)
        # CSR matches the dense matrix, in source-global order inside each row.
        for local, user in enumerate(rows):
            lo, hi = inblock.indptr[local], inblock.indptr[local + 1]
            expected = np.sort(i[u == user])
            src = inblock.src_block[lo:hi].astype(int)
            items = np.array([item_rows[s][inblock.out_block(s)[k]] for s, k in zip(src, inblock.src_index[lo:hi])], dtype=int)
            np.testing.assert_array_equal(items, expected)
            np.testing.assert_array_equal(inblock.rating[lo:hi], [r[(u == user) & (i == it)][0] for it in items])
        # Every rating receives its item's factor row.
        received = deliver([(b, inblock)], "users", Y, item_rows)[b]
        np.testing.assert_array_equal(received, Y[np.concatenate([np.sort(i[u == user]) for user in rows])])
        # Nothing else: each out-block is exactly the set of rated rows of that source block, sorted.
        for j in range(blocks[1]):
            wanted = np.unique(il[i[m & (ib[i] == j)]])
            np.testing.assert_array_equal(inblock.out_block(j), wanted)
            total_shipped += wanted.size
    assert total_shipped == sum(np.unique(i[ub[u] == b]).size for b in range(blocks[0]))


@pytest.mark.parametrize("blocks", [(1, 1), (3, 2), (7, 5)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_store_routing_both_sides(blocks, tmp_path):
    u, i, r = sparse(50, 40, 0.15, seed=7)
    users, items = u * 7 + 3, i * 11 + 5  # ids that are not indices
    store = blockals.ingest(pd.DataFrame({"user": users, "item": items, "rating": r}), tmp_path / "r.zarr",
                            n_user_blocks=blocks[0], n_item_blocks=blocks[1])
    rng = np.random.default_rng(3)
    for side, other, dst_ids, src_ids in (("users", "items", users, items), ("items", "users", items, users)):
        F = rng.standard_normal((store.n_rows(other), 3))
        src_rows = [store.rows(other, j) for j in range(store.n_blocks(other))]
        shipped = 0
        for b in range(store.n_blocks(side)):
            inblock = store.inblock(side, b)
            received = deliver([(b, inblock)], side, F, src_rows)[b]
            rows = store.rows(side, b)
            # Brute force: the other side's global index of every rating, row by row.
            idx = store.ids(other).get_indexer
            expected = np.concatenate([np.sort(idx(src_ids[dst_ids == d])) for d in store.ids(side)[rows]])
            np.testing.assert_array_equal(received, F[expected])
            shipped += sum(len(inblock.out_block(j)) for j in range(store.n_blocks(other)))
            np.testing.assert_array_equal(store.message_rows(side)[:, b], np.diff(inblock.need_ptr))
        assert shipped == int(store.message_rows(side).sum())


def test_worked_example_of_the_docstring_and_format_spec(tmp_path):
    R = np.array([[5, 0, 1], [0, 3, 0], [4, 0, 0], [0, 2, 5]], dtype=float)
    u, i = np.nonzero(R)
    store = blockals.ingest(pd.DataFrame({"user": u, "item": i, "rating": R[u, i]}), tmp_path / "ex.zarr",
                            n_user_blocks=2, n_item_blocks=2)
    expected = {
        ("users", 0): dict(rows=[0, 2], need_ptr=[0, 1, 2], need_rows=[0, 1], indptr=[0, 2, 3], src_block=[0, 1, 0], src_index=[0, 0, 0], rating=[5, 1, 4]),
        ("users", 1): dict(rows=[1, 3], need_ptr=[0, 0, 2], need_rows=[0, 1], indptr=[0, 1, 3], src_block=[1, 1, 1], src_index=[0, 0, 1], rating=[3, 2, 5]),
        ("items", 0): dict(rows=[0], need_ptr=[0, 2, 2], need_rows=[0, 1], indptr=[0, 2], src_block=[0, 0], src_index=[0, 1], rating=[5, 4]),
        ("items", 1): dict(rows=[1, 2], need_ptr=[0, 1, 3], need_rows=[0, 0, 1], indptr=[0, 2, 4], src_block=[1, 1, 0, 1], src_index=[0, 1, 0, 1], rating=[3, 2, 1, 5]),
    }
    for (side, b), arrays in expected.items():
        inblock = store.inblock(side, b)
        np.testing.assert_array_equal(store.rows(side, b), arrays.pop("rows"))
        for name, values in arrays.items():
            np.testing.assert_array_equal(getattr(inblock, name), values, err_msg=f"{side} {b} {name}")
