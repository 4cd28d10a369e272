"""Dealing rows to blocks, against a plain-Python snake deal written here.

The rule (``blockals/partition.py``, ``storage/FORMAT.md``): rows sorted by decreasing
rating count, ties by global index, dealt ``0, 1, .., B-1, B-1, .., 1, 0, 0, 1, ..``;
inside a block, local indices follow increasing global index.
"""

from __future__ import annotations

import doctest
import math

import numpy as np
import pandas as pd
import pytest

import blockals
import blockals.partition
from blockals.partition import BYTES_PER_RATING, assign_blocks, default_n_blocks, parse_n_blocks


def snake_reference(counts, n_blocks):
    """The deal, one row at a time, in plain Python."""
    counts = [int(c) for c in counts]
    order = sorted(range(len(counts)), key=lambda g: (-counts[g], g))
    block = [0] * len(counts)
    for position, g in enumerate(order):
        turn, offset = divmod(position, n_blocks)
        block[g] = offset if turn % 2 == 0 else n_blocks - 1 - offset
    local = [0] * len(counts)
    for b in range(n_blocks):
        for k, g in enumerate(g for g in range(len(counts)) if block[g] == b):
            local[g] = k
    return block, local


def zipf_counts(n, seed, cap=5_000):
    return np.random.default_rng(seed).zipf(1.6, n).clip(max=cap)


COUNT_CASES = {
    "zipf": lambda: zipf_counts(997, 0),
    "ties": lambda: np.array([3, 3, 3, 1, 1, 3, 0, 0, 2, 2, 2]),
    "all-equal": lambda: np.full(20, 4),
    "with-zeros": lambda: np.array([0, 7, 0, 0, 1, 9, 0, 2]),
    "one-row": lambda: np.array([5]),
}


@pytest.mark.parametrize(
    "case,n_blocks",
    [(case, b) for case, make in COUNT_CASES.items() for b in (1, 2, 3, 7, 31) if b <= make().size],
)
def test_deal_equals_the_reference_snake(case, n_blocks):
    counts = COUNT_CASES[case]()
    block, local = assign_blocks(counts, n_blocks)
    assert block.dtype == np.int32 and local.dtype == np.int32
    ref_block, ref_local = snake_reference(counts, n_blocks)
    np.testing.assert_array_equal(block, ref_block)
    np.testing.assert_array_equal(local, ref_local)


@pytest.mark.parametrize("n_blocks", [1, 2, 5, 7, 31, 64])
@pytest.mark.parametrize("n_rows", [640, 1000])  # 640 = a multiple of every block count
def test_assignment_is_a_balanced_partition(n_blocks, n_rows):
    counts = zipf_counts(n_rows, seed=n_blocks)
    block, local = assign_blocks(counts, n_blocks)
    # Every row in exactly one block (one entry per row, and that entry a valid block).
    assert block.shape == local.shape == (n_rows,)
    assert block.min() >= 0 and block.max() < n_blocks
    for b in range(n_blocks):
        members = np.flatnonzero(block == b)  # increasing global index
        # Local indices are 0 .. n_b - 1, in increasing global order.
        np.testing.assert_array_equal(local[members], np.arange(members.size))
    rows = np.bincount(block, minlength=n_blocks)
    assert rows.sum() == n_rows
    assert rows.max() - rows.min() <= 1

    # Bound on the rating imbalance. Pad the sorted counts c_0 >= c_1 >= ... with zeros to
    # a multiple of B (a padded zero lands exactly where the snake leaves a block without
    # a row in the last round). For blocks a < b, in every forward round a gets a count
    # >= b's and in every backward round <=. So n_a - n_b <= sum over forward rounds of
    # (first - last count of the round) <= c_0 - c_last, the rounds being disjoint
    # stretches of a non-increasing sequence; the same holds for n_b - n_a. Hence
    #     max - min <= c_max - (c_min if B divides n else 0) <= c_max.
    ratings = np.bincount(block, weights=counts, minlength=n_blocks)
    floor = counts.min() if n_rows % n_blocks == 0 else 0
    assert ratings.max() - ratings.min() <= counts.max() - floor
    if n_blocks > 1:
        # The bound bites: cutting the id range into contiguous pieces does worse here.
        contiguous = np.array([c.sum() for c in np.array_split(counts, n_blocks)])
        assert ratings.max() - ratings.min() < contiguous.max() - contiguous.min()


def test_assignment_is_deterministic_whatever_the_count_dtype():
    counts = zipf_counts(500, seed=3)
    first = assign_blocks(counts, 7)
    for dtype in (np.int64, np.int32, np.uint32, np.uint64, np.float64):
        again = assign_blocks(counts.astype(dtype), 7)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b, err_msg=str(dtype))
    # Empty rows (count 0) are dealt last, even from unsigned counts.
    block, _ = assign_blocks(np.array([0, 5, 0, 4], dtype=np.uint32), 2)
    assert block.tolist() == snake_reference([0, 5, 0, 4], 2)[0] == [1, 0, 0, 1]


def test_docstring_example():
    result = doctest.testmod(blockals.partition, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 1 and result.failed == 0


@pytest.mark.parametrize("n_rows", [0, 1, 2, 3, 100, 10**6])
@pytest.mark.parametrize("nnz", [0, 1, 10**3, 10**6, 10**8])
@pytest.mark.parametrize("budget", [2**20, 256 * 2**20])
@pytest.mark.parametrize("n_other", [None, 1000, 10**6])
def test_default_block_count(n_rows, nnz, budget, n_other):
    n = default_n_blocks(n_rows, nnz, budget, n_other)
    assert isinstance(n, int)
    assert 1 <= n <= max(1, n_rows)  # never more blocks than rows
    if n_rows >= 2:
        assert n >= 2  # two workers have something to do

    def working_set(blocks):  # ratings, plus routed rows: one per rating at most, and no more than the other side has
        per_block = math.ceil(nnz / blocks)
        rows_in = per_block if n_other is None else min(per_block, n_other)
        return per_block * BYTES_PER_RATING + rows_in * 2 * 64 * 4

    crowded = n_other is not None and n_other * 2 * 64 * 4 > budget / 2
    if crowded:
        # Every row of the other side fills over half the budget: blocks take half a
        # budget of ratings each, and fewer blocks than fitting the budget would need.
        if 2 < n < n_rows:
            assert math.ceil(nnz / n) * BYTES_PER_RATING <= budget / 2 < math.ceil(nnz / (n - 1)) * BYTES_PER_RATING
        fit = next((b for b in range(1, max(1, n_rows) + 1) if working_set(b) <= budget), max(1, n_rows))
        assert n <= max(2, min(fit, max(1, n_rows)))
    else:
        if n < n_rows:
            assert working_set(n) <= budget  # a block's solve fits the budget...
        if n > 2:
            assert working_set(n - 1) > budget  # ...and one block fewer would not
    # The module default is the one ingest uses.
    assert default_n_blocks(n_rows, nnz, n_other=n_other) == default_n_blocks(n_rows, nnz, 256 * 2**20, n_other)


@pytest.mark.parametrize("name,side", [("n_user_blocks", "users"), ("n_item_blocks", "items")])
@pytest.mark.parametrize(
    "value,message",
    [
        (0, "{name} must be a positive integer, got 0."),
        (-2, "{name} must be a positive integer, got -2."),
        (1.5, "{name} must be a positive integer, got 1.5."),
        (2.0, "{name} must be a positive integer, got 2.0."),
        ("3", "{name} must be a positive integer, got '3'."),
        (None, "{name} must be a positive integer, got None."),
        (True, "{name} must be a positive integer, got True."),
        (11, "{name}=11 is larger than the number of {side} (10); a block needs at least one row."),
    ],
)
def test_parse_n_blocks_names_the_parameter(name, side, value, message):
    with pytest.raises(blockals.InputError) as info:
        parse_n_blocks(value, name, 10)
    assert str(info.value) == message.format(name=name, side=side)


def test_parse_n_blocks_accepts_integers_up_to_the_row_count():
    for value in (1, 7, 10, np.int64(10), np.int32(3), np.uint8(2)):
        parsed = parse_n_blocks(value, "n_user_blocks", 10)
        assert parsed == int(value) and type(parsed) is int


def test_ingest_reports_bad_block_counts_by_name(tmp_path):
    df = pd.DataFrame({"user": [1, 2, 3], "item": [1, 1, 2], "rating": [1.0, 2.0, 3.0]})
    with pytest.raises(blockals.InputError, match=r"^n_user_blocks must be a positive integer, got 0\.$"):
        blockals.ingest(df, tmp_path / "a.zarr", n_user_blocks=0)
    with pytest.raises(blockals.InputError, match=r"^n_item_blocks=3 is larger than the number of items \(2\)"):
        blockals.ingest(df, tmp_path / "b.zarr", n_item_blocks=3)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()
    # A valid count is kept; a missing one is chosen (at least 2 when there are 2 rows).
    store = blockals.ingest(df, tmp_path / "c.zarr", n_user_blocks=3)
    assert (store.n_user_blocks, store.n_item_blocks) == (3, 2)
    assert math.isclose(store.stats["rating_mean"], 2.0)
