"""Synthetic rating data shaped like MovieLens, made from a seed, in or out of memory.

Ratings come from a planted model: a global mean, user and item biases and a rank-``rank``
interaction, plus Gaussian noise, rounded to the half-star scale 0.5, 1.0, ..., 5.0. User
activity and item popularity follow power laws, as in real rating data.

Users are generated in fixed chunks of :data:`CHUNK_USERS`, each chunk from its own
generator seeded by ``(seed, chunk)``; a Dask partition is a run of whole chunks. So the
data do not depend on how they are cut into partitions, and 200M ratings can be produced
partition by partition without ever being whole in memory. Only per-user rating counts
(one integer per user) and per-item arrays are computed up front.

Ids start at 1, as in MovieLens: user ``u`` and item ``i`` have parameters at row
``u - 1`` and ``i - 1`` of :func:`planted_model`. Activity and popularity are shuffled
over the ids, so an id says nothing about how active or popular its user or item is.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from blockals.errors import InputError

if TYPE_CHECKING:
    import dask.dataframe as dd

__all__ = ["CHUNK_USERS", "synthetic_ratings", "synthetic_frame", "movielens_like", "planted_model", "make_store"]

CHUNK_USERS = 1024
"""Users per generator chunk: the unit of randomness and of partitioning."""

MU = 3.5
USER_BIAS_SD = 0.35
ITEM_BIAS_SD = 0.45
# Variance of x_u . y_i whatever the rank: about as large as the two biases together,
# so a model without the interaction leaves much of the signal unexplained.
INTERACTION_VAR = 0.5
EPOCH = 946_684_800  # 2000-01-01 00:00:00 UTC
DAY = 86_400

# Tags that keep the random streams apart: every draw comes from default_rng([seed, tag, ...]).
_RATINGS, _USERS, _ITEMS, _ACTIVITY, _POPULARITY, _COVER = range(6)

_DTYPES = {"user": np.int64, "item": np.int64, "rating": np.float32, "timestamp": np.int64}


# --------------------------------------------------------------------------- validation

def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _check(n_users, n_items, n_ratings, rank, noise, user_exponent, item_exponent, seed, partition_size) -> None:
    for name, value in (("n_users", n_users), ("n_items", n_items), ("n_ratings", n_ratings),
                        ("rank", rank), ("partition_size", partition_size)):
        _positive_int(name, value)
    if n_ratings > n_users * n_items:
        raise InputError(f"n_ratings={n_ratings} exceeds n_users * n_items = {n_users * n_items}.")
    if n_ratings < n_users:
        raise InputError(f"n_ratings={n_ratings} is below n_users={n_users}, and every user has at least one rating.")
    for name, value in (("noise", noise), ("user_exponent", user_exponent), ("item_exponent", item_exponent)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
            raise InputError(f"{name} must be a finite nonnegative number, got {value!r}.")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise InputError(f"seed must be a nonnegative integer, got {seed!r}.")


# --------------------------------------------------------------------------- the planted model

def _user_params(seed: int, chunk: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Biases and factors of the CHUNK_USERS users of ``chunk`` (whatever ``n_users`` is)."""
    rng = np.random.default_rng([seed, _USERS, chunk])
    scale = (INTERACTION_VAR / rank) ** 0.25  # var(x . y) = rank * scale**4
    return rng.normal(0.0, USER_BIAS_SD, CHUNK_USERS), rng.normal(0.0, scale, (CHUNK_USERS, rank))


def _item_params(seed: int, n_items: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, _ITEMS])
    scale = (INTERACTION_VAR / rank) ** 0.25
    return rng.normal(0.0, ITEM_BIAS_SD, n_items), rng.normal(0.0, scale, (n_items, rank))


def planted_model(n_users: int, n_items: int, *, rank: int = 8, seed: int = 0) -> dict[str, Any]:
    """The model the ratings of :func:`synthetic_ratings` are drawn from.

    Parameters
    ----------
    n_users, n_items : int
        Sizes, as given to :func:`synthetic_ratings`.
    rank : int, default=8
        Length of the factor vectors.
    seed : int, default=0
        The seed given to :func:`synthetic_ratings`.

    Returns
    -------
    dict
        ``mu`` (float), ``user_bias`` (n_users,), ``item_bias`` (n_items,), ``user_factors``
        (n_users, rank), ``item_factors`` (n_items, rank), ``user_ids`` and ``item_ids``
        (1 .. n). Row ``k`` of every array belongs to id ``k + 1``. The noiseless score of
        a rating is ``mu + user_bias[u] + item_bias[i] + user_factors[u] @ item_factors[i]``
        with ``u = user - 1`` and ``i = item - 1``.
    """
    _check(n_users, n_items, n_users, rank, 0.0, 0.0, 0.0, seed, 1)
    chunks = [_user_params(seed, c, rank) for c in range(math.ceil(n_users / CHUNK_USERS))]
    item_bias, item_factors = _item_params(seed, n_items, rank)
    return {
        "mu": MU,
        "user_bias": np.concatenate([b for b, _ in chunks])[:n_users],
        "item_bias": item_bias,
        "user_factors": np.concatenate([f for _, f in chunks])[:n_users],
        "item_factors": item_factors,
        "user_ids": np.arange(1, n_users + 1, dtype=np.int64),
        "item_ids": np.arange(1, n_items + 1, dtype=np.int64),
    }


# --------------------------------------------------------------------------- who rates how much

def _activity(n_users: int, n_items: int, n_ratings: int, exponent: float, seed: int) -> np.ndarray:
    """Ratings per user: Zipf-like, each in [1, n_items], summing to exactly ``n_ratings``.

    Everyone gets 1; the ``n_ratings - n_users`` others are shared in proportion to the
    weights, with the heaviest users capped at ``n_items`` and their excess shared among
    the rest (water-filling), then rounded by largest remainders.
    """
    weights = (np.arange(n_users) + 1.0) ** -exponent
    weights = weights[np.random.default_rng([seed, _ACTIVITY]).permutation(n_users)]
    order = np.argsort(-weights, kind="stable")
    w = weights[order]
    cap = n_items - 1  # beyond the rating everyone has
    tail = np.cumsum(w[::-1])[::-1]  # tail[k]: weight of users ranked k and below
    left = (n_ratings - n_users) - cap * np.arange(n_users)  # still to share if the top k are capped
    # The top k users are capped for the first k at which user k's share fits under the cap.
    fits = left * w <= cap * tail
    k = int(np.argmax(fits)) if fits.any() else n_users
    share = np.full(n_users, float(cap))
    if k < n_users:
        share[k:] = left[k] * w[k:] / tail[k]
    target = np.empty(n_users)
    target[order] = 1.0 + share
    counts = np.minimum(np.floor(target).astype(np.int64), n_items)
    rest = n_ratings - int(counts.sum())
    if rest > 0:
        room = np.flatnonzero(counts < n_items)
        counts[room[np.argsort(counts[room] - target[room], kind="stable")[:rest]]] += 1
    return counts


def _popularity(n_items: int, exponent: float, seed: int) -> np.ndarray:
    p = (np.arange(n_items) + 1.0) ** -exponent
    p = p[np.random.default_rng([seed, _POPULARITY]).permutation(n_items)]
    return p / p.sum()


def _cover(counts: np.ndarray, n_items: int, n_ratings: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One (user, item) pair per item that the sampling must include: no item is left unrated.

    Item ``j`` (in a shuffled order) goes to the user owning rating slot
    ``j * n_ratings // n_items`` when the users' counts are laid end to end. The slots are
    at least one apart, so no user is given more items than ratings. Needs
    ``n_ratings >= n_items``; with fewer ratings some items are necessarily unrated.
    """
    if n_ratings < n_items:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    slots = np.arange(n_items, dtype=np.int64) * n_ratings // n_items
    users = np.searchsorted(np.cumsum(counts), slots, side="right")
    return users, np.random.default_rng([seed, _COVER]).permutation(n_items).astype(np.int64)


# --------------------------------------------------------------------------- sampling

def _draw_curve(popularity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expected number of distinct items after m draws with replacement, for m on a grid."""
    n = popularity.size
    draws = np.unique(np.geomspace(1, 2 * n, 64).round())
    with np.errstate(divide="ignore"):
        log_miss = np.log1p(-popularity)
    return draws, (-np.expm1(np.outer(draws, log_miss))).sum(axis=1)


def _in_sorted(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    if sorted_keys.size == 0:
        return np.zeros(keys.size, dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return sorted_keys[at] == keys


def _sample_items(rng: np.random.Generator, counts: np.ndarray, forced_users: np.ndarray, forced_items: np.ndarray,
                  items: dict[str, Any]) -> np.ndarray:
    """Sorted keys ``user * n_items + item``: ``counts[u]`` distinct items for each local user.

    Each user's items are a weighted sample without replacement (successive sampling by
    popularity) that includes the user's forced items. Light users draw with replacement
    and keep the first new items in draw order, which is exactly successive sampling;
    the few left short draw again. Users wanting more distinct items than a catalogue's
    worth of draws would give take the smallest exponential keys ``E / p`` instead
    (Efraimidis-Spirakis), the same distribution at a cost of one key per item.
    """
    popularity, cdf, draws, distinct = items["popularity"], items["cdf"], items["draws"], items["distinct"]
    n, n_local = popularity.size, counts.size
    forced = forced_users * n + forced_items
    dense = counts > np.interp(n, draws, distinct)
    parts = []

    # Heavy users, a batch of rows at a time.
    heavy = np.flatnonzero(dense)
    step = max(1, (1 << 22) // n)
    for lo in range(0, heavy.size, step):
        users = heavy[lo : lo + step]
        keys = rng.standard_exponential((users.size, n)) / popularity
        mine = np.isin(forced_users, users)
        keys[np.searchsorted(users, forced_users[mine]), forced_items[mine]] = -1.0  # always chosen
        order = np.argsort(keys, axis=1)
        take = np.arange(n) < counts[users, None]
        parts.append((users[:, None] * n + order)[take])

    # Light users: rounds of draws with replacement, each continuing every short user's sequence.
    collected = np.sort(forced[~dense[forced_users]])
    have = np.bincount(forced_users[~dense[forced_users]], minlength=n_local)
    need = np.where(dense, 0, counts - have)
    while need.any():
        # Expected draws from `have` to `have + need` distinct items, with a margin.
        expected = np.interp(have + need, distinct, draws) - np.interp(have, distinct, draws)
        m = np.where(need > 0, np.ceil(1.1 * expected).astype(np.int64) + 1, 0)
        users = np.repeat(np.arange(n_local), m)
        drawn = np.minimum(np.searchsorted(cdf, rng.random(users.size), side="right"), n - 1)
        keys = users * n + drawn
        keys = keys[~_in_sorted(keys, collected)]
        _, first = np.unique(keys, return_index=True)
        keys = keys[np.sort(first)]  # new distinct items, by user, in draw order
        owner = keys // n
        rank = np.arange(keys.size) - np.searchsorted(owner, owner)
        keys = keys[rank < need[owner]]
        got = np.bincount(keys // n, minlength=n_local)
        have += got
        need -= got
        collected = np.sort(np.concatenate([collected, keys]))
    parts.append(collected)
    return np.sort(np.concatenate(parts))


# --------------------------------------------------------------------------- one chunk, one partition

def _item_side(seed: int, n_items: int, rank: int, exponent: float) -> dict[str, Any]:
    """Everything about items a partition needs, recomputed in each task to keep the graph small."""
    popularity = _popularity(n_items, exponent, seed)
    cdf = np.cumsum(popularity)
    cdf[-1] = 1.0
    draws, distinct = _draw_curve(popularity)
    bias, factors = _item_params(seed, n_items, rank)
    return {"popularity": popularity, "cdf": cdf, "draws": draws, "distinct": distinct, "bias": bias, "factors": factors}


def _chunk(seed: int, chunk: int, counts: np.ndarray, forced_users: np.ndarray, forced_items: np.ndarray,
           items: dict[str, Any], rank: int, noise: float) -> pd.DataFrame:
    """The ratings of the users of ``chunk``, sorted by (user, item), from their own generator."""
    rng = np.random.default_rng([seed, _RATINGS, chunk])
    keys = _sample_items(rng, counts, forced_users, forced_items, items)
    local, item = np.divmod(keys, items["popularity"].size)
    bias, factors = _user_params(seed, chunk, rank)
    score = (MU + bias[local] + items["bias"][item]
             + np.einsum("ij,ij->i", factors[local], items["factors"][item])
             + noise * rng.standard_normal(keys.size))
    rating = np.clip(np.round(2.0 * score) / 2.0, 0.5, 5.0).astype(np.float32)
    # Each user is active over a window that opens some day in 2000-2004 and lasts days
    # to years; their ratings fall uniformly inside it.
    start = EPOCH + rng.integers(0, 5 * 365 * DAY, counts.size)
    span = DAY + rng.exponential(120 * DAY, counts.size).astype(np.int64)
    timestamp = start[local] + (rng.random(keys.size) * span[local]).astype(np.int64)
    return pd.DataFrame({"user": chunk * CHUNK_USERS + local + 1, "item": item + 1, "rating": rating,
                         "timestamp": timestamp})


def _partition(spec: dict[str, Any]) -> pd.DataFrame:
    """One Dask partition: the chunks ``spec['chunks']``, generated one after the other."""
    items = _item_side(spec["seed"], spec["n_items"], spec["rank"], spec["item_exponent"])
    counts, forced_users, forced_items = spec["counts"], spec["forced_users"], spec["forced_items"]
    frames = []
    for k, chunk in enumerate(spec["chunks"]):
        lo, hi = k * CHUNK_USERS, (k + 1) * CHUNK_USERS  # local to the partition
        a, b = np.searchsorted(forced_users, [lo, hi])
        frames.append(_chunk(spec["seed"], chunk, counts[lo:hi], forced_users[a:b] - lo, forced_items[a:b],
                             items, spec["rank"], spec["noise"]))
    return pd.concat(frames, ignore_index=True).astype(_DTYPES)


# --------------------------------------------------------------------------- public API

def synthetic_ratings(
    n_users: int = 6000,
    n_items: int = 4000,
    n_ratings: int = 1_000_000,
    *,
    rank: int = 8,
    noise: float = 0.5,
    user_exponent: float = 0.7,
    item_exponent: float = 1.0,
    seed: int = 0,
    partition_size: int = 1_000_000,
) -> dd.DataFrame:
    """A lazy Dask DataFrame of synthetic MovieLens-like ratings.

    Parameters
    ----------
    n_users, n_items : int, default=6000, 4000
        User ids run from 1 to ``n_users``, item ids from 1 to ``n_items``.
    n_ratings : int, default=1_000_000
        Exactly this many rows, all distinct (user, item) pairs. Must lie between
        ``n_users`` (everyone rates something) and ``n_users * n_items``.
    rank : int, default=8
        Length of the planted factor vectors.
    noise : float, default=0.5
        Standard deviation of the Gaussian noise added before rounding.
    user_exponent, item_exponent : float, default=0.7, 1.0
        Zipf exponents of user activity and item popularity: the ``k``-th most active
        user wants about ``k ** -user_exponent`` of the ratings (at least 1, at most
        ``n_items``), and users pick items with probability about ``k ** -item_exponent``
        for the ``k``-th most popular. 0 means uniform.
    seed : int, default=0
        The data are a function of the seed and the sizes, never of ``partition_size``.
    partition_size : int, default=1_000_000
        Most ratings per partition. Partitions are runs of whole chunks of
        :data:`CHUNK_USERS` users, so a partition holds more only when one chunk does.

    Returns
    -------
    dask.dataframe.DataFrame
        Columns ``user`` (int64), ``item`` (int64), ``rating`` (float32, one of 0.5, 1.0,
        ..., 5.0) and ``timestamp`` (int64, Unix seconds), sorted by (user, item); unknown
        divisions. Nothing is generated until it is computed.

    Notes
    -----
    ``rating = clip(round_to_half(mu + b_u + b_i + x_u . y_i + noise * eps), 0.5, 5)``
    with the parameters of :func:`planted_model` and ``eps ~ N(0, 1)``.

    Every item gets at least one rating whenever ``n_ratings >= n_items``: each item is
    first placed with one user (chosen in proportion to activity), and the rest of that
    user's items are drawn by popularity. With ``n_ratings < n_items`` nothing is placed,
    and the least popular items are the ones left unrated.

    Each user's items are a sample without replacement weighted by popularity, so heavy
    users reach deep into the tail and the realized item counts are flatter at the top
    than the Zipf weights.
    """
    import dask.dataframe as dd

    _check(n_users, n_items, n_ratings, rank, noise, user_exponent, item_exponent, seed, partition_size)
    counts = _activity(n_users, n_items, n_ratings, user_exponent, seed)
    forced_users, forced_items = _cover(counts, n_items, n_ratings, seed)

    # Runs of whole chunks, closed before they would pass partition_size.
    per_chunk = np.add.reduceat(counts, np.arange(0, n_users, CHUNK_USERS))
    runs, total = [[]], 0
    for chunk, size in enumerate(per_chunk.tolist()):
        if runs[-1] and total + size > partition_size:
            runs.append([])
            total = 0
        runs[-1].append(chunk)
        total += size

    specs = []
    for chunks in runs:
        lo, hi = chunks[0] * CHUNK_USERS, min((chunks[-1] + 1) * CHUNK_USERS, n_users)
        a, b = np.searchsorted(forced_users, [lo, hi])
        specs.append({"seed": int(seed), "n_items": int(n_items), "rank": int(rank), "noise": float(noise),
                      "item_exponent": float(item_exponent), "chunks": chunks, "counts": counts[lo:hi],
                      "forced_users": forced_users[a:b] - lo, "forced_items": forced_items[a:b]})
    meta = pd.DataFrame({name: np.zeros(0, dtype) for name, dtype in _DTYPES.items()})
    return dd.from_map(_partition, specs, meta=meta, enforce_metadata=False, label="synthetic-ratings")


def synthetic_frame(
    n_users: int = 6000,
    n_items: int = 4000,
    n_ratings: int = 1_000_000,
    *,
    rank: int = 8,
    noise: float = 0.5,
    user_exponent: float = 0.7,
    item_exponent: float = 1.0,
    seed: int = 0,
    partition_size: int = 1_000_000,
) -> pd.DataFrame:
    """:func:`synthetic_ratings` computed into one pandas DataFrame, for data that fit in memory.

    Takes the same parameters and returns the same rows, with a fresh RangeIndex.
    """
    import dask

    lazy = synthetic_ratings(n_users, n_items, n_ratings, rank=rank, noise=noise, user_exponent=user_exponent,
                             item_exponent=item_exponent, seed=seed, partition_size=partition_size)
    # In this process: a small frame is not worth shipping to (or from) a cluster.
    with dask.config.set(scheduler="sync"):
        return lazy.compute().reset_index(drop=True)


def movielens_like(seed: int = 0) -> pd.DataFrame:
    """100,000 ratings by 943 users of 1,682 items: the shape of MovieLens 100k.

    Parameters
    ----------
    seed : int, default=0
        As in :func:`synthetic_ratings`.

    Returns
    -------
    pandas.DataFrame
        :func:`synthetic_frame` ``(943, 1682, 100_000, seed=seed)``: every user and every
        item has at least one rating.
    """
    return synthetic_frame(943, 1682, 100_000, seed=seed)


def make_store(path, *, n_user_blocks: int | None = None, n_item_blocks: int | None = None, overwrite: bool = False,
               block_budget: int | None = None, **kwargs: Any):
    """Generate :func:`synthetic_ratings` straight into a ratings store, partition by partition.

    Parameters
    ----------
    path : str or path-like
        Where the store is written.
    n_user_blocks, n_item_blocks, overwrite, block_budget
        Passed to :func:`blockals.ingest` (``block_budget``: its default when None).
    **kwargs
        Passed to :func:`synthetic_ratings`.

    Returns
    -------
    blockals.RatingStore
    """
    from blockals.ingest import ingest

    budget = {} if block_budget is None else {"block_budget": block_budget}
    return ingest(synthetic_ratings(**kwargs), path, n_user_blocks=n_user_blocks, n_item_blocks=n_item_blocks,
                  overwrite=overwrite, **budget)
