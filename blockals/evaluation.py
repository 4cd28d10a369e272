"""Evaluation: rating and ranking metrics computed block-wise on Dask.

Definitions (per user ``u`` with at least one relevant test item; means over such users):

* ``rmse``, ``mae``: over every test rating, of ``prediction - rating`` (predictions as
  :meth:`blockals.ALS.predict` makes them; pairs with ids unknown to the model skipped).
* Ranking metrics rank every item the user did not rate in the training store (its
  *candidates*) by score, ties broken by the lower item index, as
  :meth:`blockals.ALS.recommend` does. A test item is *relevant* when its rating is
  greater than ``relevance`` (default 0: every positive rating). ``hits@k`` is the number
  of relevant items among the first ``k``.
* ``precision@k`` = hits@k / k (Spark's ``RankingMetrics.precisionAt``; it divides by k
  even when the user has fewer relevant items or candidates).
* ``recall@k`` = hits@k / |relevant|.
* ``ndcg@k`` = DCG@k / IDCG@k with binary gains and ``1 / log2(position + 1)``
  discounts; IDCG@k puts min(k, |relevant|) relevant items first.
* ``map@k`` = sum over the first k positions p holding a relevant item of precision@p,
  divided by min(k, |relevant|) (Spark's ``meanAveragePrecisionAt``).
* ``auc``: the probability that a relevant item scores above a candidate that is not
  relevant (ties count one half).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import numpy as np
import pandas as pd

from blockals.cluster import cache_bytes, connect
from blockals.errors import InputError
from blockals.factors import Factors
from blockals.formats import refuse_overlap, remove_path, replace_path, sibling
from blockals.lock import Lease, holding
from blockals.progress import Progress, wait
from blockals.store import RatingStore, StoreRef, StoreWriter, block_triples, load_rows, load_times, open_store

__all__ = ["split", "parse_split_params", "evaluate", "ranking_metrics", "METRICS", "SPLITS"]

METRICS = ("rmse", "mae", "precision", "recall", "ndcg", "map", "auc")
SPLITS = ("random", "leave_k_out", "ratio", "temporal")


# Bytes of scores one chunk of rows may hold.
SCORE_BYTES = 32 * 2**20


def score_rows(U: np.ndarray, V: np.ndarray, item_bias: np.ndarray | None) -> np.ndarray:
    scores = U.astype(np.float64) @ V.astype(np.float64).T
    return scores if item_bias is None else scores + item_bias[None, :]


def group_by_row(rows: np.ndarray, values: np.ndarray, n: int) -> list[np.ndarray]:
    """``values`` split by local row ``0 .. n-1`` (rows without values get empty arrays)."""
    order = np.argsort(rows, kind="stable")
    bounds = np.searchsorted(rows[order], np.arange(n + 1))
    return [values[order[bounds[r] : bounds[r + 1]]] for r in range(n)]


def _uniform_keys(seed: int, users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """A uniform number per (user, item), from the seed and the pair alone."""
    from blockals.kernels import _splitmix64

    key = _splitmix64(np.array([seed], dtype=np.uint64))
    pair = users.astype(np.uint64) * np.uint64(n_items) + items.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = _splitmix64(_splitmix64(pair) ^ key)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def test_mask(
    users: np.ndarray, items: np.ndarray, n_items: int, method: str, fraction: float, k: int, seed: int,
    time: np.ndarray | None = None,
) -> np.ndarray:
    """Which of a block's ratings (all ratings of its users) go to the test set.

    * ``random``: each rating independently, with probability ``fraction``;
    * ``leave_k_out``: ``k`` ratings of every user who has more than ``k``;
    * ``ratio``: ``floor(fraction * n_u)`` ratings of every user;
    * ``temporal``: every user's latest ``floor(fraction * n_u)`` ratings (by timestamp).

    Ratings are drawn (and timestamp ties broken) by a hash of (seed, user, item), so a
    split does not depend on the block counts or the order of the data.
    """
    u = _uniform_keys(seed, users, items, n_items)
    if method == "random":
        return u < fraction
    # Each user's ratings in the order they are taken: random, or latest first.
    order = np.lexsort((u, -time, users)) if method == "temporal" else np.lexsort((u, users))
    sorted_users = users[order]
    starts = np.searchsorted(sorted_users, sorted_users, side="left")
    position = np.arange(users.size) - starts
    n_u = np.searchsorted(sorted_users, sorted_users, side="right") - starts
    take = np.where(n_u > k, k, 0) if method == "leave_k_out" else np.floor(fraction * n_u).astype(np.int64)
    mask = np.zeros(users.size, dtype=bool)
    mask[order] = position < take
    return mask


def _split_part(block: int, *, ref: StoreRef, n_item_blocks: int, n_items: int, user_ids: Any, item_ids: Any,
                method: str, fraction: float, k: int, seed: int, test: bool, timed: bool) -> pd.DataFrame:
    rows, items, rating = block_triples(ref, "users", block, n_item_blocks, cache_bytes())
    time = load_times(ref, block) if timed else None
    mask = test_mask(rows, items, n_items, method, fraction, k, seed, time)
    keep = mask if test else ~mask
    frame = pd.DataFrame({"user": user_ids[rows[keep]], "item": item_ids[items[keep]], "rating": rating[keep]})
    if timed:
        frame["timestamp"] = time[keep]
    return frame


def parse_split_params(method: Any = "random", fraction: Any = 0.2, k: Any = 1, seed: Any = 0, *,
                       prefix: str = "") -> dict[str, Any]:
    """:func:`split`'s parameters, validated; a refusal names ``prefix`` + the parameter."""
    from blockals.params import parse_choice, parse_float, parse_int

    method = parse_choice(method, prefix + "method", SPLITS)
    fraction = parse_float(fraction, prefix + "fraction")
    if not 0 < fraction < 1:  # 0 leaves the test store empty, 1 the train store
        raise InputError(f"{prefix}fraction must be above 0 and below 1, got {fraction:g}.")
    return {"method": method, "fraction": fraction, "k": parse_int(k, prefix + "k", 1),
            "seed": parse_int(seed, prefix + "seed", 0)}


def split(
    store: RatingStore, train_path: str, test_path: str, method: str = "random", fraction: float = 0.2,
    k: int = 1, seed: int = 0, overwrite: bool = False, verbose: int = 0,
) -> tuple[RatingStore, RatingStore]:
    """Split a ratings store into train and test stores that share its ids and blocks.

    ``store`` is a :class:`RatingStore` or its path. Each user block is read and divided by
    :func:`test_mask`, and each part is ingested with ``like=store``, out-of-core, so large
    splits never sit in memory. Both stores are written beside their paths and swapped in
    only once both are complete, so a split that fails leaves earlier train and test
    stores as they were. Paths that are, contain or lie inside ``store`` or each other are
    refused before anything is written. The store is leased for reading and both outputs
    for writing (:mod:`blockals.lock`) throughout. ``verbose`` reports the passes of both
    ingests as :func:`blockals.ingest` does, their lines starting ``split train`` and
    ``split test``.
    """
    method, fraction, k, seed = parse_split_params(method, fraction, k, seed).values()
    store = _as_store(store, "store")
    progress = Progress.of(verbose, "split")
    targets = [StoreWriter(path, store.storage_options) for path in (train_path, test_path)]
    # A search splits into its work area inside the store (store.holds_derived).
    refuse_overlap({"the train store": targets[0].path, "the test store": targets[1].path},
                   {"the input store": None if all(store.holds_derived(t.path) for t in targets) else store.path})
    timed = store.has_timestamps
    if method == "temporal" and not timed:
        raise InputError(f"a temporal split needs timestamps; {store.path} was ingested without a timestamp column.")
    with holding(store.reading(), *(Lease(t.path, "ratings store", breakable=False) for t in targets)):
        store.check_unchanged("the split")  # the store opened is the one now leased
        return _split(store, targets, method, fraction, k, seed, overwrite, timed, progress)


def _split(store: RatingStore, targets: list[StoreWriter], method: str, fraction: float, k: int, seed: int,
           overwrite: bool, timed: bool, progress: Progress) -> tuple[RatingStore, RatingStore]:
    import dask.dataframe as dd

    from blockals.ingest import ingest

    for target in targets:
        target.clear_leftovers()
        target.check_target(overwrite)
    user_ids, item_ids = store.user_ids.to_numpy(), store.item_ids.to_numpy()
    staged = [sibling(target.path, f"split-{target.token}") for target in targets]
    try:
        for path, test, name in zip(staged, (False, True), ("train", "test")):
            meta = pd.DataFrame({"user": user_ids[:0], "item": item_ids[:0], "rating": np.zeros(0, np.float32)})
            if timed:
                meta["timestamp"] = np.zeros(0, np.int64)
            frame = dd.from_map(
                _split_part, range(store.n_user_blocks), ref=store.ref, n_item_blocks=store.n_item_blocks,
                n_items=store.n_items, user_ids=user_ids, item_ids=item_ids, method=method, fraction=fraction,
                k=k, seed=seed, test=test, timed=timed, meta=meta, enforce_metadata=False,
            )
            ingest(frame, path, like=store, timestamp_col="timestamp" if timed else None,
                   storage_options=store.storage_options, verbose=progress.within(name))
        for target in targets:  # again, time has passed; then, both complete, replace what was there
            target.check_target(overwrite)
        for target, path in zip(targets, staged):
            replace_path(path, target.path, store.storage_options)
    finally:
        for path in staged:
            remove_path(path, store.storage_options)
    return tuple(RatingStore(target.path, store.storage_options) for target in targets)


def top_k_order(scores: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``min(k, columns)`` best columns, by decreasing score, then increasing index.

    Exactly the first columns of a stable descending argsort, found by a partition (linear
    in the columns) rather than a sort of every score: a sort was two thirds of the time
    of an evaluation. Ties at the k-th score keep their lowest-index columns.
    """
    n, m = scores.shape
    k = min(k, m)
    if k == 0:
        return np.zeros((n, 0), dtype=np.int64)
    scores = np.where(np.isnan(scores), -np.inf, scores)  # compared with nothing, NaN would lose its place
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]  # each row's k-th best score
    above = scores > kth
    tied = scores == kth
    # Of the columns tied at the k-th score, the lowest-index ones that fill the k places.
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= k - above.sum(axis=1, keepdims=True)))
    best = np.nonzero(chosen)[1].reshape(n, k)  # in increasing index within each row
    return np.take_along_axis(best, np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1, kind="stable"), axis=1)


def ranking_metrics(scores: np.ndarray, relevant: list[np.ndarray], excluded: list[np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Per-row ranking metrics of one chunk of users (rows of ``scores``).

    ``relevant[r]`` and ``excluded[r]`` are item indices; excluded items are not
    candidates. Returns arrays of per-row values.
    """
    n, m = scores.shape
    scores = scores.astype(np.float64, copy=True)
    for r in range(n):
        scores[r, excluded[r]] = -np.inf
    order = top_k_order(scores, k)
    is_rel = np.zeros((n, m), dtype=bool)
    for r in range(n):
        is_rel[r, relevant[r]] = True
    n_rel = is_rel.sum(axis=1)
    top = np.take_along_axis(is_rel, order, axis=1) & np.isfinite(np.take_along_axis(scores, order, axis=1))
    hits = top.sum(axis=1)
    positions = np.arange(1, min(k, m) + 1)
    discount = 1.0 / np.log2(positions + 1)
    dcg = (top * discount).sum(axis=1)
    ideal = np.cumsum(discount)[np.minimum(n_rel, min(k, m)) - 1] * (n_rel > 0)
    precision_at = np.cumsum(top, axis=1) / positions
    denom = np.minimum(n_rel, k)
    out = {
        "precision": hits / k,
        "recall": np.divide(hits, n_rel, out=np.zeros(n), where=n_rel > 0),
        "ndcg": np.divide(dcg, ideal, out=np.zeros(n), where=ideal > 0),
        "map": np.divide((precision_at * top).sum(axis=1), denom, out=np.zeros(n), where=denom > 0),
    }
    # AUC: relevant candidates against the other candidates.
    auc = np.full(n, np.nan)
    for r in range(n):
        cand = np.isfinite(scores[r])
        pos = scores[r, cand & is_rel[r]]
        neg = np.sort(scores[r, cand & ~is_rel[r]])
        if pos.size and neg.size:
            below = np.searchsorted(neg, pos, side="left")
            ties = np.searchsorted(neg, pos, side="right") - below
            auc[r] = (below + 0.5 * ties).sum() / (pos.size * neg.size)
    out["auc"] = auc
    return out


def _evaluate_block(
    test: StoreRef, train: StoreRef | None, block: int, n_item_blocks: int, U: np.ndarray, V: np.ndarray,
    user_bias: np.ndarray | None, item_bias: np.ndarray | None, mu: float, k: int, relevance: float,
) -> dict[str, Any]:
    """Sums of every metric over one user block of the test store (a Dask task)."""
    users = load_rows(test, "users", block)
    rows, items, rating = block_triples(test, "users", block, n_item_blocks, cache_bytes())
    local = np.searchsorted(users, rows)
    pred = np.einsum("ij,ij->i", U[local].astype(np.float64), V[items].astype(np.float64))
    if item_bias is not None:
        pred += mu + user_bias[local] + item_bias[items]
    err = pred - rating
    sums: dict[str, Any] = {"n_ratings": err.size, "sse": float(err @ err), "sae": float(np.abs(err).sum())}
    rel = group_by_row(local[rating > relevance], items[rating > relevance], users.size)
    if train is not None:
        t_rows, t_items, _ = block_triples(train, "users", block, n_item_blocks, cache_bytes())
        seen = group_by_row(np.searchsorted(users, t_rows), t_items, users.size)
    else:
        seen = [np.zeros(0, dtype=np.int64)] * users.size
    active = np.flatnonzero([r.size > 0 for r in rel])
    totals = {name: 0.0 for name in ("precision", "recall", "ndcg", "map", "auc")}
    n_auc = 0
    chunk = max(1, SCORE_BYTES // (8 * max(1, V.shape[0])))
    for start in range(0, active.size, chunk):
        part = active[start : start + chunk]
        scores = score_rows(U[part], V, item_bias)
        values = ranking_metrics(scores, [rel[r] for r in part], [seen[r] for r in part], k)
        for name in ("precision", "recall", "ndcg", "map"):
            totals[name] += float(values[name].sum())
        finite = ~np.isnan(values["auc"])
        totals["auc"] += float(values["auc"][finite].sum())
        n_auc += int(finite.sum())
    sums.update(totals, n_users=int(active.size), n_auc=n_auc)
    return sums


def _as_store(value: Any, name: str) -> RatingStore:
    """A store given as itself or as its path (local or URL)."""
    if isinstance(value, RatingStore):
        return value
    if isinstance(value, (str, os.PathLike)):
        return open_store(value)
    raise InputError(f"{name} must be a RatingStore or the path of one, got {type(value).__name__}.")


def _as_model(value: Any) -> Any:
    """A fitted model given as itself or as the path of a saved one."""
    from blockals.model import ALS

    if isinstance(value, (str, os.PathLike)):
        return ALS.load(value)
    if not isinstance(value, ALS):
        raise InputError(f"model must be a fitted blockals.ALS or the path of a saved model, got {type(value).__name__}.")
    Factors.of(value)  # refuses a model that is not fitted
    return value


def evaluate(
    model: Any, test: RatingStore, train: RatingStore | None = None, k: int = 10, relevance: float = 0.0,
    client: Any = None, verbose: int = 0,
) -> dict[str, float]:
    """Rating and ranking metrics of ``model`` on a test store, one Dask task per user block.

    ``model`` is a fitted :class:`~blockals.ALS` or a saved model's path; ``test`` and
    ``train`` are stores or their paths, and must share the model's ids and blocks (stores
    made by :func:`split`, or the training store itself); training items are not candidates.
    ``verbose``: 0 says nothing; 1 prints the pass's duration on standard output; 2 also
    reports its blocks as they finish on standard error (:mod:`blockals.progress`).
    """
    from blockals.params import parse_float, parse_int

    k = parse_int(k, "k", 1)
    relevance = parse_float(relevance, "relevance", -np.inf)
    model, test = _as_model(model), _as_store(test, "test")
    train = None if train is None else _as_store(train, "train")
    progress = Progress.of(verbose, "evaluate")
    for name, store in (("test", test), ("train", train)):
        if store is not None and (not np.array_equal(store.user_ids.to_numpy(), model.user_ids_)
                                  or not np.array_equal(store.item_ids.to_numpy(), model.item_ids_)):
            raise InputError(f"the {name} store's ids differ from the model's; evaluate on stores split from the training store.")
    if train is not None and train.n_user_blocks != test.n_user_blocks:
        raise InputError("the train and test stores have different user blocks; make them with blockals.evaluation.split.")
    user_bias = getattr(model, "user_bias_", None)
    item_bias = getattr(model, "item_bias_", None)
    mu = getattr(model, "global_mean_", 0.0)
    tag = uuid.uuid4().hex[:8]
    with holding(test.reading(), None if train is None else train.reading()), \
            connect(client, ratings=test.nnz + (train.nnz if train is not None else 0)) as c:
        V = c.scatter(model.item_factors_, broadcast=True)
        tasks = [
            c.submit(_evaluate_block, test.ref, None if train is None else train.ref, b, test.n_item_blocks,
                     model.user_factors_[test.rows("users", b)], V,
                     None if user_bias is None else user_bias[test.rows("users", b)], item_bias, mu, k, relevance,
                     key=f"blockals-evaluate-{b}-{tag}")
            for b in range(test.n_user_blocks)
        ]
        with progress.step("", len(tasks), "blocks") as report:
            wait(tasks, report)
        parts = c.gather(tasks)
    n = sum(p["n_ratings"] for p in parts)
    users = sum(p["n_users"] for p in parts)
    n_auc = sum(p["n_auc"] for p in parts)
    out = {
        "rmse": float(np.sqrt(sum(p["sse"] for p in parts) / n)) if n else float("nan"),
        "mae": sum(p["sae"] for p in parts) / n if n else float("nan"),
    }
    for name in ("precision", "recall", "ndcg", "map"):
        out[f"{name}@{k}"] = sum(p[name] for p in parts) / users if users else float("nan")
    out["auc"] = sum(p["auc"] for p in parts) / n_auc if n_auc else float("nan")
    out["n_test_ratings"], out["n_ranked_users"] = n, users
    return out
