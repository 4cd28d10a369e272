"""Synthetic rating data shaped like MovieLens, made from a seed, in or out of memory.

Ratings come from a planted model: a global mean, user and item biases and a low-rank
interaction, plus Gaussian noise, rounded to the half-star scale 0.5 .. 5. User activity
and item popularity follow power laws, as in real rating data. Users are generated in
fixed chunks, each from its own generator seeded by ``(seed, chunk)``, so the data do not
depend on how they are cut into partitions, and a 200M-rating set can be produced
partition by partition without ever being whole in memory.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from blockals.errors import InputError

__all__ = ["synthetic_ratings", "synthetic_frame", "movielens_like", "planted_model", "make_store"]

CHUNK_USERS = 1024
MEAN = 3.5
EPOCH = 946_684_800  # 2000-01-01


def _check(n_users: int, n_items: int, n_ratings: int, rank: int, noise: float) -> None:
    for name, value in (("n_users", n_users), ("n_items", n_items), ("n_ratings", n_ratings), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}.")
    if n_ratings > n_users * n_items:
        raise InputError(f"n_ratings={n_ratings} exceeds n_users * n_items = {n_users * n_items}.")
    if not np.isfinite(noise) or noise < 0:
        raise InputError(f"noise must be a nonnegative number, got {noise!r}.")


def _activity(n_users: int, n_items: int, n_ratings: int, exponent: float) -> np.ndarray:
    """Ratings per user: a Zipf-like profile scaled to ``n_ratings``, each in [1, n_items]."""
    weights = (np.arange(n_users) + 1.0) ** -exponent
    # Users are not ranked by activity in id order: a fixed shuffle of the profile.
    weights = weights[np.random.default_rng(0x5EED).permutation(n_users)]
    counts = np.ones(n_users, dtype=np.int64)
    extra = n_ratings - n_users
    if extra > 0:
        for _ in range(50):  # water-filling under the cap n_items
            room = n_items - counts
            share = np.where(room > 0, weights, 0.0)
            add = np.minimum(np.floor(extra * share / share.sum()).astype(np.int64), room)
            counts += add
            extra -= int(add.sum())
            if extra <= 0 or not (room - add).any():
                break
        # The rounding remainder, one each to the users with room, most active first.
        room = np.flatnonzero(counts < n_items)
        top = room[np.argsort(-weights[room], kind="stable")][:extra]
        counts[top] += 1
    return counts


def planted_model(n_users: int, n_items: int, *, rank: int = 8, seed: int = 0) -> dict[str, np.ndarray | float]:
    """The model the ratings are drawn from: ``mu``, biases and factors, indexed by id."""
    rng = np.random.default_rng([seed, 0xB1A5])
    scale = 0.9 / math.sqrt(rank)
    return {
        "mu": MEAN,
        "user_bias": rng.normal(0.0, 0.35, n_users),
        "item_bias": rng.normal(0.0, 0.45, n_items),
        "user_factors": rng.normal(0.0, scale, (n_users, rank)),
        "item_factors": rng.normal(0.0, scale, (n_items, rank)),
        "user_ids": np.arange(1, n_users + 1),
        "item_ids": np.arange(1, n_items + 1),
    }


def _popularity(n_items: int, exponent: float) -> np.ndarray:
    p = (np.arange(n_items) + 1.0) ** -exponent
    p = p[np.random.default_rng(0xC0FFEE).permutation(n_items)]
    return p / p.sum()


def _distinct_items(rng: np.random.Generator, counts: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """``counts[u]`` distinct items for each user, drawn by popularity without replacement.

    Light users draw with replacement and redraw what repeats (a few vectorized rounds);
    users wanting a quarter of the catalogue or more take Gumbel-top-k keys instead.
    """
    n_items = popularity.size
    cdf = np.cumsum(popularity)
    cdf[-1] = 1.0
    heavy = np.flatnonzero(counts * 4 > n_items)
    need = np.where(counts * 4 > n_items, 0, counts)
    keys = np.zeros(0, dtype=np.int64)
    while need.any():
        users = np.repeat(np.arange(counts.size), need)
        drawn = np.searchsorted(cdf, rng.random(users.size), side="right")
        keys = np.union1d(keys, users * n_items + np.minimum(drawn, n_items - 1))
        have = np.bincount(keys // n_items, minlength=counts.size)
        need = np.where(counts * 4 > n_items, 0, counts - have)
    logp = np.log(popularity)
    parts = [keys]
    for u in heavy:
        gumbel = logp - np.log(-np.log(rng.random(n_items)))
        parts.append(u * n_items + np.argpartition(-gumbel, counts[u] - 1)[: counts[u]])
    return np.sort(np.concatenate(parts))  # users' keys are disjoint: no repeats to drop


def _chunk(chunk: int, seed: int, counts: np.ndarray, popularity: np.ndarray, model: dict, noise: float) -> pd.DataFrame:
    """The ratings of users ``chunk * CHUNK_USERS`` onwards, from their own generator."""
    rng = np.random.default_rng([seed, chunk])
    lo = chunk * CHUNK_USERS
    counts = counts[lo : lo + CHUNK_USERS]
    keys = _distinct_items(rng, counts, popularity)
    local, items = np.divmod(keys, popularity.size)
    users = lo + local
    score = (
        model["mu"] + model["user_bias"][users] + model["item_bias"][items]
        + np.einsum("ij,ij->i", model["user_factors"][users], model["item_factors"][items])
        + noise * rng.standard_normal(users.size)
    )
    rating = np.clip(np.round(score * 2) / 2, 0.5, 5.0).astype(np.float32)
    first = EPOCH + rng.integers(0, 5 * 365 * 86400, counts.size)
    timestamp = first[local] + rng.integers(0, 90 * 86400, users.size)
    return pd.DataFrame({"user": users + 1, "item": items + 1, "rating": rating, "timestamp": timestamp})


def _parse_partition_size(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"partition_size must be a positive integer, got {value!r}.")
    return int(value)


def synthetic_ratings(
    n_users: int = 6000,
    n_items: int = 4000,
    n_ratings: int = 1_000_000,
    *,
    rank: int = 8,
    noise: float = 0.5,
    user_exponent: float = 0.9,
    item_exponent: float = 1.0,
    seed: int = 0,
    partition_size: int = 2_000_000,
):
    """A lazy Dask DataFrame of synthetic ratings: columns user, item, rating, timestamp.

    Parameters
    ----------
    n_users, n_items : int
        Ids run from 1 to ``n_users`` / ``n_items``.
    n_ratings : int
        Exactly this many distinct (user, item) pairs; every user has at least one.
    rank, noise : int, float
        Rank of the planted interaction and the standard deviation of the noise.
    user_exponent, item_exponent : float
        Power-law exponents of user activity and item popularity (larger: more skewed).
        Tail items may receive no rating when ``n_ratings`` is not much larger than
        ``n_items``.
    seed : int
        Everything is a function of the seed (and the sizes), not of ``partition_size``.
    partition_size : int
        Approximate ratings per Dask partition (partitions hold whole user chunks).
    """
    import dask.dataframe as dd

    _check(n_users, n_items, n_ratings, rank, noise)
    counts = _activity(n_users, n_items, n_ratings, user_exponent)
    popularity = _popularity(n_items, item_exponent)
    model = planted_model(n_users, n_items, rank=rank, seed=seed)
    n_chunks = math.ceil(n_users / CHUNK_USERS)
    per_chunk = np.add.reduceat(counts, np.arange(0, n_users, CHUNK_USERS))
    bounds = [0]
    total = 0
    for c in range(n_chunks):
        total += int(per_chunk[c])
        if total >= _parse_partition_size(partition_size) and c + 1 < n_chunks:
            bounds.append(c + 1)
            total = 0
    bounds.append(n_chunks)
    groups = [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]

    def part(chunks: list[int]) -> pd.DataFrame:
        return pd.concat([_chunk(c, seed, counts, popularity, model, noise) for c in chunks], ignore_index=True)

    meta = pd.DataFrame({"user": np.zeros(0, np.int64), "item": np.zeros(0, np.int64),
                         "rating": np.zeros(0, np.float32), "timestamp": np.zeros(0, np.int64)})
    return dd.from_map(part, groups, meta=meta, enforce_metadata=False)


def synthetic_frame(*args, **kwargs) -> pd.DataFrame:
    """:func:`synthetic_ratings`, computed into one pandas DataFrame (for small data)."""
    import dask

    with dask.config.set(scheduler="sync"):
        return synthetic_ratings(*args, **kwargs).compute().reset_index(drop=True)


def movielens_like(seed: int = 0) -> pd.DataFrame:
    """About 100k ratings by 943 users of 1682 items: the shape of MovieLens 100k."""
    return synthetic_frame(943, 1682, 100_000, seed=seed)


def make_store(path, *, n_user_blocks: int | None = None, n_item_blocks: int | None = None, overwrite: bool = False, **kwargs):
    """Generate :func:`synthetic_ratings` straight into a ratings store, partition by partition."""
    from blockals.ingest import ingest

    return ingest(synthetic_ratings(**kwargs), path, n_user_blocks=n_user_blocks, n_item_blocks=n_item_blocks, overwrite=overwrite)
