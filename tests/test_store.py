"""The ratings-store boundary: what StoreWriter writes, RatingStore reads back and checks.

Stores here are written through the writer directly, without Dask, from a dense matrix
the test makes; every check compares against that matrix or against sizes the test counts
itself, never against earlier output of blockals.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import blockals
from blockals.routing import build_inblock, inblock_order
from blockals.store import BLOCK_CACHE, StoreWriter, load_out_blocks, load_times

SIDES = ("users", "items")


@pytest.fixture(autouse=True)
def _empty_cache():
    """Blocks cached by one test (keyed by store id) must not answer for another's edits."""
    BLOCK_CACHE.clear()
    yield
    BLOCK_CACHE.clear()


@dataclasses.dataclass(frozen=True)
class Dense:
    """A small rating matrix and the blocks the test deals its rows and columns to."""

    values: np.ndarray  # (n_users, n_items), NaN where unrated
    block: dict[str, np.ndarray]  # per side, block of each row

    @property
    def mask(self) -> np.ndarray:
        return ~np.isnan(self.values)

    def side(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        """(values, mask) with ``side``'s rows as rows."""
        return (self.values, self.mask) if side == "users" else (self.values.T, self.mask.T)

    def local(self, side: str) -> np.ndarray:
        """Index of each row inside its block, rows of a block taken in increasing order."""
        block = self.block[side]
        return np.array([np.sum(block[:g] == block[g]) for g in range(block.size)], dtype=np.int32)

    def n_blocks(self, side: str) -> int:
        return int(self.block[side].max()) + 1


def make_dense(seed: int = 0) -> Dense:
    rng = np.random.default_rng(seed)
    values = np.where(rng.random((9, 7)) < 0.4, rng.integers(1, 11, (9, 7)) / 2, np.nan)
    values[0] = np.nan  # a user without ratings
    values[3, 2] = 4.5  # item 2 rated once
    return Dense(values, {"users": np.array([0, 1, 2, 0, 1, 2, 0, 1, 2]), "items": np.array([1, 0, 1, 0, 1, 0, 0])})


def recorded_stats(dense: Dense) -> dict:
    """The ``stats`` attribute of the matrix, counted here from the mask."""
    out: dict = {"n_users": dense.values.shape[0], "n_items": dense.values.shape[1], "nnz": int(dense.mask.sum()),
                 "rating_mean": float(np.nanmean(dense.values)), "rating_min": float(np.nanmin(dense.values)),
                 "rating_max": float(np.nanmax(dense.values))}
    for side, other in (("users", "items"), ("items", "users")):
        _, mask = dense.side(side)
        blocks, others = range(dense.n_blocks(side)), range(dense.n_blocks(other))
        out[side] = {
            "block_rows": [int((dense.block[side] == b).sum()) for b in blocks],
            "block_nnz": [int(mask[dense.block[side] == b].sum()) for b in blocks],
            # [j][b]: rows of other-side block j that some row of block b rates.
            "message_rows": [[int(mask[dense.block[side] == b][:, dense.block[other] == j].any(axis=0).sum())
                              for b in blocks] for j in others],
        }
    return out


def block_arrays(dense: Dense, side: str, b: int):
    """Rows, in-block and timestamps of one block, built from the matrix."""
    other = "items" if side == "users" else "users"
    values, mask = dense.side(side)
    rows = np.flatnonzero(dense.block[side] == b)
    local, src = np.nonzero(mask[rows])
    order = inblock_order(local, rows.size, dense.block[other][src], dense.local(other)[src], dense.n_blocks(other))
    local, src = local[order], src[order]  # in in-block order, as the timestamps must be
    inblock = build_inblock(local, dense.block[other][src], dense.local(other)[src], values[rows][local, src],
                            rows.size, dense.n_blocks(other))
    time = 1000 * rows[local] + src if side == "users" else None  # a value the test can predict
    return rows, inblock, time


def write_store(path: Path, dense: Dense, edit=None, commit: bool = True, overwrite: bool = False) -> StoreWriter:
    """Write ``dense`` through the writer; ``edit(side, b, rows, inblock, time)`` may change a block."""
    writer = StoreWriter(str(path))
    writer.check_target(overwrite=overwrite)
    ids = {"users": np.arange(dense.values.shape[0]) * 7 + 3,
           "items": np.array([f"item{k}" for k in range(dense.values.shape[1])], dtype=object)}
    assignment = {side: (dense.block[side].astype(np.int32), dense.local(side)) for side in SIDES}
    params = {"source": "test", "timestamps": True}
    writer.create(params, ids, assignment, {side: dense.n_blocks(side) for side in SIDES})
    for side in SIDES:
        for b in range(dense.n_blocks(side)):
            arrays = block_arrays(dense, side, b)
            writer.write_block(side, b, *(arrays if edit is None else edit(side, b, *arrays)))
    if commit:
        writer.commit(params, recorded_stats(dense), overwrite)
    return writer


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` and its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def edit_marker_complete(path: Path, value: bool) -> None:
    meta_path = path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["blockals"]["complete"] = value
    meta_path.write_text(json.dumps(meta))


def edit_stats(path: Path, change) -> None:
    """Change the recorded ``stats`` straight in the root ``zarr.json``."""
    meta_path = path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    change(meta["attributes"]["blockals"]["stats"])
    meta_path.write_text(json.dumps(meta))


# -- writing and reading back --------------------------------------------------------


def test_blocks_written_through_the_writer_read_back_as_the_matrix(tmp_path):
    dense = make_dense()
    write_store(tmp_path / "s.zarr", dense)
    store = blockals.open_store(tmp_path / "s.zarr")
    assert list(store.user_ids) == [7 * k + 3 for k in range(9)]
    assert list(store.item_ids) == [f"item{k}" for k in range(7)]
    for side in SIDES:
        values, mask = dense.side(side)
        np.testing.assert_array_equal(store.assignment(side)[0], dense.block[side])
        np.testing.assert_array_equal(store.assignment(side)[1], dense.local(side))
        got = np.full(values.shape, np.nan)
        for b in range(store.n_blocks(side)):
            np.testing.assert_array_equal(store.rows(side, b), np.flatnonzero(dense.block[side] == b))
            rows, others, ratings = store.triples(side, b)
            got[rows, others] = ratings
        np.testing.assert_array_equal(got, values)
    # Timestamps line up with the user blocks' ratings.
    for b in range(store.n_user_blocks):
        rows, items, _ = store.triples("users", b)
        np.testing.assert_array_equal(load_times(store.ref, b), 1000 * rows + items)
    assert not (tmp_path / "s.zarr" / "_staging").exists()


def test_staged_slices_read_back_concatenated(tmp_path):
    writer = write_store(tmp_path / "s.zarr", make_dense(), commit=False)
    rng = np.random.default_rng(1)
    parts = []
    for p, n in enumerate((5, 0, 8)):
        block = np.sort(rng.integers(0, 3, n))  # staged sorted by destination block
        part = {"dst": rng.integers(0, 9, n), "src": rng.integers(0, 7, n), "rating": rng.random(n).astype(np.float32),
                "block": block}
        writer.stage("users", p, {name: part[name] for name in ("dst", "src", "rating")})
        parts.append(part)
    ptrs = [np.searchsorted(part["block"], np.arange(4)) for part in parts]
    for b in range(3):
        got = writer.read_staged("users", ptrs, b, ("dst", "src", "rating"))
        for name in ("dst", "src", "rating"):
            expected = np.concatenate([part[name][part["block"] == b] for part in parts])
            np.testing.assert_array_equal(got[name], expected, err_msg=f"{name} of block {b}")
    writer.commit({"source": "test"}, recorded_stats(make_dense()))
    assert not (tmp_path / "s.zarr" / "_staging").exists()


# -- what is refused -----------------------------------------------------------------


def hidden(path: Path) -> list[str]:
    """The hidden siblings of ``path``."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def test_a_store_is_written_beside_its_path_and_swapped_in_complete(tmp_path):
    path = tmp_path / "s.zarr"
    writer = write_store(path, make_dense(), commit=False)
    assert not path.exists()  # nothing at the path until the store is whole
    assert hidden(path) == [f".s.zarr.ingest-{writer.token}"]
    with pytest.raises(blockals.StoreError, match=r"ingest-[0-9a-f]+ is incomplete"):
        blockals.open_store(tmp_path / hidden(path)[0])
    writer.commit({"source": "test"}, recorded_stats(make_dense()))
    assert hidden(path) == []
    assert blockals.open_store(path).nnz == int(make_dense().mask.sum())


def test_what_a_killed_writer_left_is_cleared_and_the_store_kept(tmp_path):
    path = tmp_path / "s.zarr"
    write_store(path, make_dense())
    before = tree(path)
    write_store(path, make_dense(), commit=False, overwrite=True)  # as a writer killed mid-way leaves it
    writer = StoreWriter(str(path))
    assert writer.check_target(overwrite=True)["complete"] is True
    writer.clear_leftovers()
    assert hidden(path) == [] and tree(path) == before


def test_a_swap_cut_short_between_its_renames_is_undone_by_the_next_writer(tmp_path):
    path = tmp_path / "s.zarr"
    write_store(path, make_dense())
    before = tree(path)
    path.rename(tmp_path / ".s.zarr.old-0123456789ab")  # killed after moving the old store aside
    StoreWriter(str(path)).clear_leftovers()
    assert hidden(path) == [] and tree(path) == before


def test_an_incomplete_store_at_the_path_is_replaced_without_overwrite(tmp_path):
    path = tmp_path / "s.zarr"
    write_store(path, make_dense())
    edit_marker_complete(path, False)
    writer = write_store(path, make_dense(), commit=False)
    assert writer.check_target(overwrite=False)["complete"] is False  # ours, replaceable without overwrite
    writer.commit({"source": "test"}, recorded_stats(make_dense()))
    with pytest.raises(blockals.InputError, match=r"already holds a complete ratings store; pass overwrite=True"):
        writer.check_target(overwrite=False)
    assert blockals.open_store(path).nnz == int(make_dense().mask.sum())


def test_a_symlinked_store_path_is_written_through_the_link(tmp_path):
    real, link = tmp_path / "v1.zarr", tmp_path / "current.zarr"
    link.symlink_to(real)
    write_store(link, make_dense())
    assert link.is_symlink() and real.is_dir() and hidden(real) == []
    assert blockals.open_store(link).path == str(real)
    assert blockals.open_store(link).nnz == int(make_dense().mask.sum())


def test_foreign_content_is_never_cleared(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    writer = StoreWriter(str(tmp_path / "mine"))
    with pytest.raises(blockals.InputError, match=r"mine exists and is not a blockals store"):
        writer.check_target(overwrite=True)
    writer.clear_leftovers()
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def _plus_one(*keys):
    def change(stats):
        *outer, last = keys
        target = stats
        for key in outer:
            target = target[key]
        target[last] += 1
    return change


RECORDED = [
    # (stats entry made to disagree, the read, the array named)
    (("n_users",), lambda s: s.user_ids, r"users/ids"),
    (("n_items",), lambda s: s.assignment("items"), r"items/block"),
    (("users", "block_rows", 1), lambda s: s.rows("users", 1), r"users/blocks/1/rows"),
    (("users", "block_rows", 1), lambda s: s.inblock("users", 1), r"users/blocks/1/indptr"),
    (("items", "block_nnz", 0), lambda s: s.inblock("items", 0), r"items/blocks/0/src_block"),
    (("users", "block_nnz", 2), lambda s: load_times(s.ref, 2), r"users/blocks/2/time"),
    (("items", "message_rows", 1, 0), lambda s: load_out_blocks(s.ref, "items", 0), r"items/blocks/0/need_rows"),
]


@pytest.mark.parametrize("keys,read,array", [pytest.param(*r, id="-".join(map(str, r[0]))) for r in RECORDED])
def test_arrays_disagreeing_with_the_recorded_sizes_are_refused(keys, read, array, tmp_path):
    path = tmp_path / "s.zarr"
    write_store(path, make_dense())
    edit_stats(path, _plus_one(*keys))
    with pytest.raises(blockals.StoreError, match=rf"s\.zarr/{array} has shape \(\d+,\), but the store records \d+ entries"):
        read(blockals.open_store(path))


def _truncate(name):
    def edit(side, b, rows, inblock, time):
        if (side, b) != ("users", 1):
            return rows, inblock, time
        if name == "time":
            return rows, inblock, time[:-1]
        return rows, dataclasses.replace(inblock, **{name: getattr(inblock, name)[:-1]}), time
    return edit


@pytest.mark.parametrize("name", ["rating", "src_index", "need_ptr", "time"])
def test_a_block_written_short_is_refused_naming_the_array(name, tmp_path):
    path = tmp_path / "s.zarr"
    write_store(path, make_dense(), edit=_truncate(name))
    store = blockals.open_store(path)
    read = (lambda: load_times(store.ref, 1)) if name == "time" else (lambda: store.inblock("users", 1))
    with pytest.raises(blockals.StoreError, match=rf"users/blocks/1/{name} has shape \(\d+,\), but the store records"):
        read()
    assert store.inblock("users", 0).nnz == store.block_nnz("users")[0]  # other blocks are intact


def test_indptr_must_end_at_the_block_nnz(tmp_path):
    def edit(side, b, rows, inblock, time):
        if (side, b) == ("items", 1):
            inblock = dataclasses.replace(inblock, indptr=np.minimum(inblock.indptr, inblock.indptr[-1] - 1))
        return rows, inblock, time

    write_store(tmp_path / "s.zarr", make_dense(), edit=edit)
    with pytest.raises(blockals.StoreError, match=r"items/blocks/1/indptr ends at \d+, but the block holds \d+ ratings"):
        blockals.open_store(tmp_path / "s.zarr").inblock("items", 1)


# -- reading only what is needed -------------------------------------------------------


def test_route_tasks_read_only_the_routing_arrays(tmp_path):
    rng = np.random.default_rng(2)
    pairs = rng.choice(30 * 20, 200, replace=False)
    ratings = pd.DataFrame({"user": pairs // 20 * 7 + 3, "item": pairs % 20 * 11 + 100,
                            "rating": rng.integers(1, 11, 200) / 2.0})
    path = tmp_path / "r.zarr"
    store = blockals.ingest(ratings, path, n_user_blocks=2, n_item_blocks=3)
    # Damage block 1's ratings: reading them fails, so a route that reads them would too.
    chunk = next(p for p in (path / "users" / "blocks" / "1" / "rating").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[::-1])
    routing = load_out_blocks(store.ref, "users", 1)
    # out(j -> 1): the j-local rows of the items that block 1's users rate, sorted.
    user = store.ids("users").get_indexer(ratings["user"])
    item = store.ids("items").get_indexer(ratings["item"])
    rated = set(item[np.isin(user, store.rows("users", 1))])
    for j in range(store.n_item_blocks):
        expected = [local for local, g in enumerate(store.rows("items", j)) if g in rated]
        np.testing.assert_array_equal(routing.out_block(j), expected)
    with pytest.raises(blockals.StoreError, match=r"users/blocks/1/rating is corrupted"):
        store.inblock("users", 1)
    # An in-block this process already holds answers without a read.
    inblock = store.inblock("users", 0)
    assert load_out_blocks(store.ref, "users", 0) is inblock


def _tiny_inblock(n: int):
    return build_inblock(np.arange(n), np.zeros(n, int), np.arange(n), np.ones(n), n, 1)


def test_block_cache_keeps_its_blocks_through_a_cyclic_scan():
    """Training reads blocks in the same order every half-step; a cache holding two of four
    blocks must hit on two per cycle (an LRU would hit on none)."""
    from blockals.store import _BlockCache

    cache, blocks = _BlockCache(), [_tiny_inblock(10) for _ in range(4)]
    limit = int(2.5 * blocks[0].nbytes)
    hits = 0
    for cycle in range(3):
        for b, block in enumerate(blocks):
            if cache.get(("s", "users", b)) is not None:
                hits += 1
            else:
                cache.put(("s", "users", b), block, limit)
    assert hits == 2 * 2
    # Another store's block takes the room of the first store's blocks, least recent first.
    cache.put(("t", "users", 0), blocks[0], limit)
    assert cache.get(("t", "users", 0)) is blocks[0]
    assert [cache.get(("s", "users", b)) is not None for b in range(4)].count(True) == 1
    # Full of its own store's blocks, it keeps them and turns the next one away...
    cache.put(("t", "users", 1), blocks[1], blocks[0].nbytes)
    assert cache.get(("t", "users", 1)) is None and cache.get(("t", "users", 0)) is blocks[0]
    # ...but a limit lowered below what it holds evicts rather than staying over it.
    cache.put(("t", "users", 1), blocks[1], blocks[0].nbytes // 2)
    assert cache.get(("t", "users", 0)) is None and cache.get(("t", "users", 1)) is None


def test_chunks_are_what_format_md_says(tmp_path):
    """A reader written from storage/FORMAT.md alone (a Blosc frame, then the CRC32C of the
    frame; vlen-utf8 inside for strings) gets the arrays back from the raw chunk files."""
    import google_crc32c
    import zarr
    from numcodecs.blosc import decompress

    from blockals.formats import write_array

    numbers, names = np.arange(1000, dtype=np.uint32) * 7, np.array(["a", "bé", ""], dtype=object)
    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    write_array(group, "numbers", numbers)
    write_array(group, "names", names)

    def frame(name: str) -> bytes:
        meta = json.loads((tmp_path / "g.zarr" / name / "zarr.json").read_text())
        blosc = meta["codecs"][-2]
        assert blosc["name"] == "blosc" and meta["codecs"][-1] == {"name": "crc32c"}
        assert {k: blosc["configuration"][k] for k in ("cname", "clevel", "shuffle")} == {
            "cname": "lz4", "clevel": 5, "shuffle": "shuffle"}
        raw = (tmp_path / "g.zarr" / name / "c" / "0").read_bytes()
        assert int.from_bytes(raw[-4:], "little") == google_crc32c.value(raw[:-4])
        return decompress(raw[:-4])

    assert np.array_equal(np.frombuffer(frame("numbers"), dtype="<u4"), numbers)
    data, strings = frame("names"), []
    count, pos = int.from_bytes(data[:4], "little"), 4
    for _ in range(count):
        n = int.from_bytes(data[pos : pos + 4], "little")
        strings.append(data[pos + 4 : pos + 4 + n].decode("utf-8"))
        pos += 4 + n
    assert strings == list(names)
