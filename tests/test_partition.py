"""Dealing rows to blocks: every row once, rows and ratings balanced."""

from __future__ import annotations

import numpy as np
import pytest

import blockals
from blockals.partition import BYTES_PER_RATING, assign_blocks, default_n_blocks, parse_n_blocks


@pytest.mark.parametrize("n_blocks", [1, 2, 7, 31])
def test_assignment_is_a_balanced_partition(n_blocks):
    counts = np.random.default_rng(n_blocks).zipf(1.6, 5000).clip(max=20_000)
    block, local = assign_blocks(counts, n_blocks)
    for b in range(n_blocks):
        members = np.flatnonzero(block == b)
        # Local indices number the members 0.. in increasing global order.
        np.testing.assert_array_equal(np.sort(local[members]), np.arange(members.size))
        np.testing.assert_array_equal(members[np.argsort(local[members])], members)
    rows = np.bincount(block, minlength=n_blocks)
    assert rows.max() - rows.min() <= 1
    # The snake deals a round of n_blocks rows at a time, in decreasing count order, so two
    # blocks differ by at most the largest count (the first round) plus alternating gaps.
    ratings = np.bincount(block, weights=counts, minlength=n_blocks)
    assert ratings.max() - ratings.min() <= counts.max()
    # Far better than cutting the id range into contiguous pieces.
    contiguous = np.array([c.sum() for c in np.array_split(counts, n_blocks)])
    assert ratings.max() - ratings.min() <= max(contiguous.max() - contiguous.min(), counts.max())


def test_assignment_is_deterministic_and_depends_on_counts_only():
    counts = np.array([5, 1, 4, 2, 2, 9, 0, 3])
    first = assign_blocks(counts, 3)
    second = assign_blocks(counts.copy(), 3)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_default_block_counts():
    assert default_n_blocks(1, 10) == 1
    assert default_n_blocks(100, 1000) == 2
    budget = 2**20
    n = default_n_blocks(10**6, 10**7, budget)
    assert n >= np.ceil(10**7 * BYTES_PER_RATING / budget) and n <= 10**6


@pytest.mark.parametrize(
    "value,match",
    [(0, "must be a positive integer, got 0"), (-2, "positive integer"), (1.5, "positive integer, got 1.5"),
     (True, "positive integer"), (11, "larger than the number of users \\(10\\)")],
)
def test_parse_n_blocks(value, match):
    with pytest.raises(blockals.InputError, match=f"n_user_blocks.*{match}|{match}"):
        parse_n_blocks(value, "n_user_blocks", 10)
