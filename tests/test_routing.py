"""In-blocks and out-blocks against a dense brute force: every rating gets its factor row,
and nothing else is shipped.

The simulation is the one a half-step performs: a random factor matrix ``Y`` over the
source side's global rows; source block ``j`` holds ``Y_j = Y[rows of j, in local
order]`` and sends ``M_j = Y_j[out(j -> b)]`` to destination block ``b``; ``b``
concatenates the messages in source-block order and takes row ``inblock.col`` for each
rating. The expected answer comes from the dense rating matrix alone.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import blockals
from blockals.routing import InBlock, build_inblock, counting_order, index_dtype, pair_order

FORMAT_MD = Path(__file__).resolve().parents[1] / "storage" / "FORMAT.md"
BLOCKS = [(1, 1), (3, 2), (7, 5)]
block_ids = [f"{u}x{i}" for u, i in BLOCKS]


# -- brute force -------------------------------------------------------------------


def members_in_local_order(block: np.ndarray, n_blocks: int) -> list[np.ndarray]:
    """Global rows of each block, local order = increasing global index (the spec's rule)."""
    return [np.flatnonzero(block == b) for b in range(n_blocks)]


def check_inblocks(inblocks, dst_rows, src_rows, mask, values, seed=0) -> np.ndarray:
    """Check every destination block's in-block against the dense matrix.

    ``mask``/``values`` are dense, destination rows x source rows (global indices);
    ``dst_rows[b]`` / ``src_rows[j]`` the global rows of each block in local order.
    Returns ``shipped[j, b]``, the factor rows source block ``j`` sends to ``b``.
    """
    n_src = len(src_rows)
    Y = np.random.default_rng(seed).standard_normal((mask.shape[1], 3))  # distinct rows
    shipped = np.zeros((n_src, len(inblocks)), dtype=np.int64)
    routed_position = np.empty(mask.shape[1], dtype=np.int64)
    routed_position[np.concatenate(src_rows)] = np.arange(mask.shape[1])
    for b, (inblock, rows) in enumerate(zip(inblocks, dst_rows)):
        assert isinstance(inblock, InBlock)
        sub = mask[rows]
        # Nonzeros by local row, then by source block and source-local row (the order of
        # the concatenated messages) -- the order the in-block must have.
        r, s = np.nonzero(sub)
        by_message = np.lexsort((routed_position[s], r))
        r, s = r[by_message], s[by_message]
        # CSR structure and values match the dense matrix.
        assert inblock.indptr.dtype == np.int64
        np.testing.assert_array_equal(inblock.indptr, np.concatenate([[0], np.cumsum(sub.sum(axis=1))]))
        np.testing.assert_array_equal(inblock.row, r)
        assert inblock.rating.dtype == np.float32
        np.testing.assert_array_equal(inblock.rating, values[rows][r, s].astype(np.float32))
        # Routing metadata types and ranges.
        assert inblock.src_block.dtype == index_dtype(n_src)
        assert inblock.src_index.dtype == np.uint32 and inblock.need_rows.dtype == np.uint32
        assert inblock.need_ptr.dtype == np.int64 and inblock.need_ptr.shape == (n_src + 1,)
        assert inblock.need_ptr[0] == 0 and inblock.need_ptr[-1] == inblock.need_rows.size
        # Out-blocks: exactly the j-local rows that block b rates -- sorted, no repeats,
        # nothing extra.
        for j in range(n_src):
            wanted = np.flatnonzero(sub[:, src_rows[j]].any(axis=0))
            np.testing.assert_array_equal(inblock.out_block(j), wanted, err_msg=f"out({j} -> {b})")
            shipped[j, b] = wanted.size
        # Each rating points inside its message.
        message_len = np.diff(inblock.need_ptr)[inblock.src_block.astype(np.int64)]
        assert np.all(inblock.src_index < message_len)
        np.testing.assert_array_equal(
            inblock.col, inblock.need_ptr[inblock.src_block.astype(np.int64)] + inblock.src_index.astype(np.int64)
        )
        # The simulated half-step delivers Y[i] to every rating (u, i).
        messages = [Y[src_rows[j]][inblock.out_block(j)] for j in range(n_src)]
        received = np.concatenate(messages)[inblock.col]
        np.testing.assert_array_equal(received, Y[s])
        assert sum(m.shape[0] for m in messages) == len(np.unique(s))  # nothing else shipped
    return shipped


def random_ratings(n_users, n_items, density, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((n_users, n_items)) < density
    values = rng.integers(1, 11, (n_users, n_items)) / 2.0  # 0.5 .. 5.0, never 0
    return mask, values


# -- build_inblock on synthetic assignments ---------------------------------------------


@pytest.mark.parametrize("blocks", BLOCKS, ids=block_ids)
@pytest.mark.parametrize("density", [0.0, 0.04, 0.3, 1.0])
def test_build_inblock_routes_exactly_what_is_needed(blocks, density):
    n_ub, n_ib = blocks
    n_users, n_items = 53, 41
    seed = int(density * 100) + 10 * n_ub
    rng = np.random.default_rng(seed + 1)
    mask, values = random_ratings(n_users, n_items, density, seed)
    # Any assignment must route correctly, not only the snake: deal a random permutation.
    block = {"users": rng.permutation(n_users) % n_ub, "items": rng.permutation(n_items) % n_ib}
    rows = {side: members_in_local_order(block[side], n) for side, n in (("users", n_ub), ("items", n_ib))}
    # Empty rows and columns; an empty destination block; a source block that sends
    # nothing to some destination; a source block that sends nothing at all.
    mask[:3] = False
    mask[:, -2:] = False
    if n_ub >= 3:
        mask[rows["users"][2]] = False
    if n_ib >= 3:
        mask[:, rows["items"][2]] = False
    if n_ub >= 2 and n_ib >= 2:
        mask[np.ix_(rows["users"][0], rows["items"][1])] = False
    local = {}
    for side in ("users", "items"):
        local[side] = np.empty(block[side].size, dtype=np.int64)
        for members in rows[side]:
            local[side][members] = np.arange(members.size)

    u, i = np.nonzero(mask)
    shuffle = rng.permutation(u.size)  # build_inblock must not rely on input order
    u, i = u[shuffle], i[shuffle]
    r = values[u, i]
    for side, dst, src, dense in (("users", u, i, mask), ("items", i, u, mask.T)):
        other = "items" if side == "users" else "users"
        inblocks = []
        for b, members in enumerate(rows[side]):
            m = block[side][dst] == b
            inblocks.append(
                build_inblock(
                    local[side][dst[m]], block[other][src[m]], local[other][src[m]], r[m],
                    members.size, len(rows[other]),
                )
            )
        vals = values if side == "users" else values.T
        shipped = check_inblocks(inblocks, rows[side], rows[other], dense, vals, seed)
        # The fixture exercises what it claims to: empty rows, and (with enough blocks) a
        # destination that receives nothing, a source that sends nothing, and a
        # (source, destination) pair with no message while the others have one.
        assert any((ib.counts == 0).any() for ib in inblocks)
        if len(rows[side]) >= 3:
            assert (shipped[:, 2] == 0).all() and inblocks[2].nnz == 0
        if len(rows[other]) >= 3:
            assert (shipped[2] == 0).all()
        if len(rows[other]) >= 2 and len(rows[side]) >= 2:
            assert (shipped == 0).any()
            assert (shipped > 0).any() or density == 0.0


@pytest.mark.parametrize("n_major, n_minor", [(1, 1), (5, 3), (40, 100_000), (3000, 7)])
@pytest.mark.parametrize("layout", ["random", "sorted", "reversed", "repeats"])
def test_pair_and_counting_orders_are_numpys_stable_sorts(n_major, n_minor, layout):
    rng = np.random.default_rng(n_major + n_minor)
    major = rng.integers(0, n_major, 5000)
    minor = rng.integers(0, n_minor, 5000)
    if layout == "sorted":
        order = np.lexsort((minor, major))
        major, minor = major[order], minor[order]
    elif layout == "reversed":
        order = np.lexsort((minor, major))[::-1]
        major, minor = major[order], minor[order]
    elif layout == "repeats":  # equal pairs: only a stable sort keeps their order
        major, minor = np.repeat(major[:50], 100), np.repeat(minor[:50], 100)
    for dtype in (np.int64, np.int32, np.uint32):
        np.testing.assert_array_equal(pair_order(major.astype(dtype), n_major, minor.astype(dtype), n_minor),
                                      np.lexsort((minor, major)))
        np.testing.assert_array_equal(counting_order(major.astype(dtype), n_major), np.argsort(major, kind="stable"))
    assert pair_order(major[:0], 0, minor[:0], 0).shape == (0,)


def test_build_inblock_of_an_empty_block():
    empty = np.zeros(0, dtype=np.int64)
    inblock = build_inblock(empty, empty, empty, np.zeros(0), 4, 3)
    np.testing.assert_array_equal(inblock.indptr, [0, 0, 0, 0, 0])
    np.testing.assert_array_equal(inblock.need_ptr, [0, 0, 0, 0])
    assert inblock.nnz == 0 and inblock.need_rows.size == 0 and inblock.col.size == 0


# -- the same, read back from stores written by ingest --------------------------------------


def check_store(store, users, items, ratings) -> None:
    """A store against the ratings it was written from (global index = rank of sorted id)."""
    gu = store.user_ids.get_indexer(users)
    gi = store.item_ids.get_indexer(items)
    assert (gu >= 0).all() and (gi >= 0).all()
    mask = np.zeros((store.n_users, store.n_items), dtype=bool)
    values = np.zeros(mask.shape)
    mask[gu, gi] = True
    values[gu, gi] = ratings
    assert mask.sum() == len(ratings) == store.nnz

    rows = {}
    for side in ("users", "items"):
        block, local = store.assignment(side)
        n_blocks = store.n_blocks(side)
        rows[side] = members_in_local_order(block, n_blocks)
        for b in range(n_blocks):
            np.testing.assert_array_equal(store.rows(side, b), rows[side][b])
            np.testing.assert_array_equal(local[rows[side][b]], np.arange(rows[side][b].size))
        np.testing.assert_array_equal(store.block_rows(side), [m.size for m in rows[side]])
    reopened = blockals.open_store(store.path)
    for side, other, dense, vals in (("users", "items", mask, values), ("items", "users", mask.T, values.T)):
        inblocks = [reopened.inblock(side, b) for b in range(store.n_blocks(side))]
        shipped = check_inblocks(inblocks, rows[side], rows[other], dense, vals)
        # Stats: message_rows[j][b] is what source j ships to block b of this side.
        np.testing.assert_array_equal(store.message_rows(side), shipped)
        np.testing.assert_array_equal(store.stats[side]["message_rows"], shipped.tolist())
        np.testing.assert_array_equal(store.block_nnz(side), [dense[m].sum() for m in rows[side]])
        assert int(store.message_rows(side).sum()) == sum(
            np.unique(np.nonzero(dense[m])[1]).size for m in rows[side]
        )
    stats = store.stats
    assert (stats["n_users"], stats["n_items"], stats["nnz"]) == (store.n_users, store.n_items, len(ratings))
    assert stats["rating_min"] == ratings.min() and stats["rating_max"] == ratings.max()
    assert np.isclose(stats["rating_mean"], ratings.mean())


@pytest.mark.parametrize("blocks", BLOCKS, ids=block_ids)
@pytest.mark.parametrize("density", [0.06, 0.35])
def test_store_routes_exactly_what_is_needed(blocks, density, tmp_path):
    n_ub, n_ib = blocks
    mask, values = random_ratings(40, 30, density, seed=int(density * 100) + n_ub)
    u, i = np.nonzero(mask)
    order = np.random.default_rng(5).permutation(u.size)  # rows of the source in any order
    u, i = u[order], i[order]
    users = u * 7 + 3  # integer ids that are not indices
    items = np.array([f"item{k}" for k in i], dtype=object)  # string ids: "item10" < "item2"
    ratings = values[u, i]
    df = pd.DataFrame({"user": users, "item": items, "rating": ratings})
    store = blockals.ingest(df, tmp_path / "full.zarr", n_user_blocks=n_ub, n_item_blocks=n_ib)
    np.testing.assert_array_equal(store.user_ids, np.unique(users))
    assert list(store.item_ids) == sorted(set(items))
    check_store(store, users, items, ratings)

    # A store sharing the first one's ids and blocks but holding only some of the ratings:
    # empty rows, an empty user block (and so a user block that sends nothing), and an
    # item block that sends nothing to some user block.
    ub = store.assignment("users")[0][store.user_ids.get_indexer(users)]
    ib = store.assignment("items")[0][store.item_ids.get_indexer(items)]
    keep = ub != 0 if n_ub > 1 else u < 20
    if n_ub > 1 and n_ib > 1:
        keep &= ~((ub == 1) & (ib == 0))
    sub = blockals.ingest(df[keep], tmp_path / "sub.zarr", like=store)
    assert (sub.n_user_blocks, sub.n_item_blocks) == blocks
    check_store(sub, users[keep], items[keep], ratings[keep])
    assert (sub.inblock("users", 0).counts == 0).any()  # empty rows
    if n_ub > 1:
        assert sub.block_nnz("users")[0] == 0 and (sub.message_rows("items")[0] == 0).all()
        if n_ib > 1:
            assert sub.message_rows("users")[0, 1] == 0
    if blocks == (7, 5) and density < 0.1:
        assert (store.message_rows("users") == 0).any()  # even the full store has gaps


# -- the worked example of routing.py and storage/FORMAT.md ------------------------------

EXAMPLE = np.array([[5, 0, 1], [0, 3, 0], [4, 0, 0], [0, 2, 5]], dtype=float)

# Every array the docstring of blockals/routing.py lists (and the rows of each block).
DOCSTRING = {
    "users/blocks/0": dict(rows=[0, 2], need_ptr=[0, 1, 2], need_rows=[0, 1], indptr=[0, 2, 3],
                           src_block=[0, 1, 0], src_index=[0, 0, 0], rating=[5, 1, 4]),
    "users/blocks/1": dict(rows=[1, 3], need_ptr=[0, 0, 2], need_rows=[0, 1], indptr=[0, 1, 3],
                           src_block=[1, 1, 1], src_index=[0, 0, 1], rating=[3, 2, 5]),
    "items/blocks/1": dict(rows=[1, 2], need_ptr=[0, 1, 3], need_rows=[0, 0, 1], indptr=[0, 2, 4],
                           src_block=[1, 1, 0, 1], src_index=[0, 1, 0, 1], rating=[3, 2, 1, 5]),
}


@pytest.fixture
def example_store(tmp_path):
    u, i = np.nonzero(EXAMPLE)
    df = pd.DataFrame({"user": u, "item": i, "rating": EXAMPLE[u, i]})
    return blockals.ingest(df, tmp_path / "example.zarr", n_user_blocks=2, n_item_blocks=2)


def read(store, path):
    """An array of the store by its path in the Zarr tree (straight from Zarr)."""
    return store._group[path][...]


def test_worked_example_of_the_routing_docstring(example_store):
    store = example_store
    for group, arrays in DOCSTRING.items():
        for name, expected in arrays.items():
            np.testing.assert_array_equal(read(store, f"{group}/{name}"), expected, err_msg=f"{group}/{name}")
    # Blocks: U0 = {u0, u2}, U1 = {u1, u3}, I0 = {i0}, I1 = {i1, i2}.
    assert [read(store, f"users/{n}").tolist() for n in ("ids", "block", "local")] == [[0, 1, 2, 3], [0, 1, 0, 1], [0, 0, 1, 1]]
    assert [read(store, f"items/{n}").tolist() for n in ("ids", "block", "local")] == [[0, 1, 2], [0, 1, 1], [0, 0, 1]]
    # And the example against the brute force, like any other store.
    u, i = np.nonzero(EXAMPLE)
    check_store(store, u, i, EXAMPLE[u, i])


def format_example_tables() -> tuple[dict[str, list], dict[str, list]]:
    """The worked example's arrays and message_rows, as written in storage/FORMAT.md."""
    text = FORMAT_MD.read_text()
    section = text.split("### Worked example", 1)[1].split("\n## ", 1)[0]
    arrays: dict[str, list] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        values = re.findall(r"`(\[[^`]*\])`", cells[1])
        assert len(names) == len(values), line
        prefix = names[0].rsplit("/", 1)[0] + "/" if "/" in names[0] else ""
        for k, (name, value) in enumerate(zip(names, values)):
            arrays[name if k == 0 or "/" in name else prefix + name] = ast.literal_eval(value)
    message_rows = {
        side: ast.literal_eval(value)
        for side, value in re.findall(r"`stats\.(users|items)\.message_rows = (\[\[[^`]*\]\])`", section.replace("\n", " "))
    }
    return arrays, message_rows


def test_worked_example_of_format_md(example_store):
    store = example_store
    arrays, message_rows = format_example_tables()
    # FORMAT.md lists every array of every block, and the docstring's numbers among them.
    for side in ("users", "items"):
        for name in ("ids", "block", "local"):
            assert f"{side}/{name}" in arrays
        for b in range(2):
            for name in ("rows", "indptr", "src_block", "src_index", "rating", "need_ptr", "need_rows"):
                assert f"{side}/blocks/{b}/{name}" in arrays, f"{side}/blocks/{b}/{name}"
    for group, expected in DOCSTRING.items():
        for name, values in expected.items():
            assert arrays[f"{group}/{name}"] == values, f"{group}/{name}"
    assert len(arrays) == 2 * 3 + 4 * 7
    for path, values in arrays.items():
        np.testing.assert_array_equal(read(store, path), values, err_msg=path)
    assert set(message_rows) == {"users", "items"}
    for side, values in message_rows.items():
        assert store.stats[side]["message_rows"] == values
    # The totals quoted there.
    routed = sum(int(store.message_rows(side).sum()) for side in ("users", "items"))
    whole = store.n_items * store.n_user_blocks + store.n_users * store.n_item_blocks
    section = FORMAT_MD.read_text().split("### Worked example", 1)[1].split("\n## ", 1)[0]
    assert f"{routed} factor rows travel per iteration" in " ".join(section.split())
    assert f"= {whole}`" in section
