"""Using fitted factors: predictions, recommendations, similar rows and fold-in.

:class:`Factors` is a read-only view of a fitted estimator's learned attributes; every
method of :class:`blockals.ALS` that uses a fitted model delegates to it. Scores follow
:mod:`blockals.recommend`; fold-in solves rows with :func:`blockals.halfstep.solve_block`,
exactly as a training half-step solves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from blockals.errors import InputError
from blockals.formats import parse_path
from blockals.halfstep import gram, solve_block
from blockals.ingest import combine_duplicates
from blockals.params import ALSConfig, parse_choice, parse_int
from blockals.progress import Progress
from blockals.recommend import Seen, parse_format, recommend_all, recommend_rows, seen_items, similar, to_frame
from blockals.routing import build_inblock
from blockals.sources import convert_ids, id_kind, normalize_ratings
from blockals.store import RatingStore, Side, open_store

__all__ = ["Factors", "FoldIn"]


def _refuse_repeated_pairs(ratings: pd.DataFrame, dst: np.ndarray, src: np.ndarray, rating: np.ndarray) -> None:
    """A pair rated twice would count twice in its row's system: refused, as ingest's
    default refuses it (found by ingest's own :func:`~blockals.ingest.combine_duplicates`)."""
    repeats = combine_duplicates(dst, src, rating, np.arange(dst.shape[0]), "error")
    if repeats.n_duplicates:
        _, _, first, second = repeats.example
        raise InputError(
            f"fold_in ratings rate user {ratings['user'].iloc[first]} and item {ratings['item'].iloc[first]} twice, "
            f"in rows {first} and {second}; combine repeated ratings before folding them in."
        )


@dataclass(frozen=True)
class FoldIn:
    """Rows solved by :meth:`ALS.fold_in`: ids, factors, and biases or WALS weights when the model has them."""

    ids: np.ndarray
    factors: np.ndarray
    biases: np.ndarray | None = None
    weights: np.ndarray | None = None


@dataclass(frozen=True, kw_only=True)
class Factors:
    """A fitted model's learned arrays (rows in the order of the ids)."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    config: dict[str, Any] | None = None
    store_path: str | None = None
    user_bias: np.ndarray | None = None
    item_bias: np.ndarray | None = None
    global_mean: float | None = None
    user_weights: np.ndarray | None = None
    item_weights: np.ndarray | None = None
    user_items: sp.csr_array | None = None

    @classmethod
    def of(cls, model: Any) -> Factors:
        """The learned attributes of ``model``; refused when it is not fitted."""
        if not hasattr(model, "user_factors_"):
            raise InputError("this ALS model is not fitted yet; call fit() or ALS.load() first.")
        return cls(**{name: getattr(model, f"{name}_") for name in cls.__dataclass_fields__ if hasattr(model, f"{name}_")})

    def attributes(self) -> dict[str, Any]:
        """``{attribute_: value}`` for the estimator: every array the mode has, and the records."""
        return {f"{name}_": getattr(self, name) for name in self.__dataclass_fields__
                if getattr(self, name) is not None or name in ("store_path", "user_items")}

    def ids(self, side: Side) -> np.ndarray:
        return self.user_ids if side == "users" else self.item_ids

    def factors(self, side: Side) -> np.ndarray:
        return self.user_factors if side == "users" else self.item_factors

    def index(self, ids: Any, side: Side) -> np.ndarray:
        """Row of each id (one id or many), -1 for unknown ones; text ids are read as the model's id type."""
        known = pd.Index(self.ids(side))
        if ids is None:
            raise InputError(f"{side} must be one id or a sequence of ids, got None.")
        ids = np.atleast_1d(np.asarray(ids))
        if ids.ndim != 1:
            raise InputError(f"{side} must be one id or a 1-D sequence of ids, got an array of shape {ids.shape}.")
        if known.dtype.kind in "iu" and ids.dtype.kind not in "iu":
            ids = pd.to_numeric(pd.Series(ids), errors="coerce").to_numpy()
        return known.get_indexer(ids)

    def _known(self, ids: Any, side: Side) -> np.ndarray:
        rows = self.index(ids, side)
        return rows[rows >= 0]

    # -- scores ------------------------------------------------------------------------
    def predict(self, users: Any, items: Any, cold_start: str = "nan") -> np.ndarray:
        cold_start = parse_choice(cold_start, "cold_start", ("nan", "drop"))
        u, i = self.index(users, "users"), self.index(items, "items")
        if u.shape != i.shape:
            raise InputError(f"users and items must have one length, got {u.shape[0]} and {i.shape[0]}.")
        known = (u >= 0) & (i >= 0)
        out = np.full(u.shape[0], np.nan)
        u, i = u[known], i[known]
        scores = np.einsum("ij,ij->i", self.user_factors[u].astype(np.float64), self.item_factors[i].astype(np.float64))
        if self.user_bias is not None:
            scores += self.global_mean + self.user_bias[u] + self.item_bias[i]
        out[known] = scores
        return out[known] if cold_start == "drop" else out

    def seen_store(self, seen: Any) -> RatingStore:
        """The training ratings, refused unless its id maps are the model's.

        Rows are matched by global index, so a store with other ids (or one re-ingested
        at the training path) would silently pair users with other users' ratings. The
        model may hold more ids than the store: fold-in appends new ones after them.
        """
        if seen is not None:
            store = seen if isinstance(seen, RatingStore) else open_store(seen)
        else:
            store = open_store(self.store_path)
        for side in ("users", "items"):
            stored, ids = store.ids(side).to_numpy(), self.ids(side)
            if len(stored) > len(ids) or not np.array_equal(stored, ids[: len(stored)]):
                raise InputError(
                    f"the {side[:-1]} ids of {store.path} are not the model's; use the store the model was "
                    f"trained on, or a split of it."
                )
        return store

    def excluded(self, users: np.ndarray, seen: Any) -> Seen:
        """The items each of ``users`` (rows) rated: in the training store (or ``seen``), and in
        :attr:`user_items`, the ratings the model keeps itself (all of them when it was trained
        on an in-memory source, and the rows folded in with ``update=True``)."""
        self._check_rated_known(seen)
        parts = []
        if seen is not None or self.store_path is not None:
            parts.append(seen_items(self.seen_store(seen), users))
        if self.user_items is not None:
            parts.append(_as_seen(self.user_items[users]))
        if len(parts) == 1:
            return parts[0]
        shape = (users.shape[0], self.item_ids.shape[0])
        union = sum(sp.csr_array((np.ones(p.items.shape[0], dtype=bool), p.items, p.indptr), shape=shape) for p in parts)
        return Seen(union.indptr.astype(np.int64), union.indices.astype(np.int64))

    def _check_rated_known(self, seen: Any) -> None:
        if seen is None and self.store_path is None and self.user_items is None:
            raise InputError(
                "exclude_seen=True needs the training ratings: this model was not fitted on a "
                "saved store, so pass seen=<store> or exclude_seen=False."
            )

    def candidates(self, items: Any, filter_items: Any, side: Side = "items") -> np.ndarray | None:
        """Rows of ``side`` a query may return: ``items`` (all when None) less ``filter_items``."""
        if items is None and filter_items is None:
            return None
        allowed = np.arange(self.ids(side).shape[0]) if items is None else self._known(items, side)
        return allowed if filter_items is None else np.setdiff1d(allowed, self._known(filter_items, side))

    def recommend(self, users: Any, n: int, exclude_seen: bool, items: Any, seen: Any, filter_items: Any = None) -> pd.DataFrame:
        n = parse_int(n, "n", 1)
        u = self._known(users, "users")
        excluded = self.excluded(u, seen) if exclude_seen else None
        idx, val = recommend_rows(self.user_factors[u], self.item_factors, n, self.item_bias, excluded,
                                  self.candidates(items, filter_items))
        return to_frame("user", self.user_ids[u], "item", self.item_ids, idx, val)

    def recommend_all(self, n: int, output: Any, exclude_seen: bool, client: Any, storage_options: dict | None,
                      side: Any, fmt: Any, verbose: Any = 0) -> str | pd.DataFrame:
        side = parse_choice(side, "side", ("users", "items"))
        progress = Progress.of(verbose, "recommend")
        fmt = parse_format(output, fmt)
        n = parse_int(n, "n", 1)
        if exclude_seen:
            self._check_rated_known(None)
        store = None if self.store_path is None else self.seen_store(None)
        other: Side = "items" if side == "users" else "users"
        kept = self.user_items if side == "users" or self.user_items is None else self.user_items.T.tocsr()
        return recommend_all(
            store, side, self.factors(side), self.factors(other), self.item_bias if side == "users" else self.user_bias,
            self.ids(side), self.ids(other), n, None if output is None else parse_path(output, "output"), fmt, exclude_seen,
            None if kept is None else _as_seen(kept), client, storage_options, progress,
        )

    def recommend_users(self, items: Any, n: int) -> pd.DataFrame:
        i = self._known(items, "items")
        idx, val = recommend_rows(self.item_factors[i], self.user_factors, parse_int(n, "n", 1), self.user_bias)
        return to_frame("item", self.item_ids[i], "user", self.user_ids, idx, val)

    def similar(self, ids: Any, n: int, side: Side, among: Any = None, filter_out: Any = None) -> pd.DataFrame:
        rows = self._known(ids, side)
        idx, val = similar(self.factors(side), rows, parse_int(n, "n", 1), self.candidates(among, filter_out, side))
        return to_frame(side[:-1], self.ids(side)[rows], "similar", self.ids(side), idx, val)

    # -- fold-in -----------------------------------------------------------------------
    def fold_in(self, ratings: pd.DataFrame, side: Side) -> FoldIn:
        """Solve the rows of ``side`` in ``ratings`` against the fixed other side."""
        side = parse_choice(side, "side", ("users", "items"))
        for col in ("user", "item", "rating"):
            if col not in ratings.columns:
                raise InputError(f"fold_in ratings need a {col!r} column; they have {', '.join(map(str, ratings.columns))}.")
        config = ALSConfig(**self.config)
        obj = config.objective(self.global_mean or 0.0)
        own, other = ("user", "item") if side == "users" else ("item", "user")
        other_side: Side = "items" if side == "users" else "users"
        src = self.index(ratings[other].to_numpy(), other_side)
        if (src < 0).any():
            row = int(np.flatnonzero(src < 0)[0])
            raise InputError(f"{other} id in row {row} ({ratings[other].iloc[row]}) is not known to the model.")
        rating, problem = normalize_ratings(ratings["rating"])
        if problem is not None:
            raise InputError(problem[1].format(row=problem[0]))
        ids, dst = np.unique(self._new_ids(ratings[own], side), return_inverse=True)
        _refuse_repeated_pairs(ratings, dst, src, rating)
        inblock = build_inblock(dst, np.zeros_like(src), src, rating, ids.shape[0], 1)
        F = self._carried(self.factors(other_side), other_side[:-1], config)
        known = self.index(ids, side)
        previous = np.zeros((ids.shape[0], obj.width))
        previous[known >= 0, : config.rank] = self.factors(side)[known[known >= 0]]
        solved = solve_block(
            inblock, F[inblock.need_rows], obj, config,
            G=gram(F, config.rank) if obj.gram_weight else None, previous=previous,
            weights=obj.side_weights(side, inblock, self._given_weights(ids, known, side, config)),
        )
        X, k = solved.factors, config.rank
        return FoldIn(
            ids=ids,
            factors=X[:, :k].astype(self.factors(side).dtype),
            biases=X[:, k].copy() if config.mode == "biased" else None,
            weights=X[:, k].copy() if config.mode == "wals" else None,
        )

    def _new_ids(self, values: pd.Series, side: Side) -> np.ndarray:
        """Ids of the rows to fold in, read by ingest's rules as the model's id type: a
        fraction, a missing id or a word among integer ids is refused, not rounded or
        matched to nothing (which would put a row in the model twice)."""
        values = values.reset_index(drop=True)
        role = side[:-1]
        kind, problem = id_kind(values, role)
        if problem is not None:
            raise InputError(problem[1].format(row=problem[0]))
        model_kind = "int" if self.ids(side).dtype.kind in "iu" else "str"
        if model_kind == "int" and kind == "str":  # words, or codes like 007 (read as 7, as ingest's like= does)
            words = np.flatnonzero(pd.to_numeric(values, errors="coerce").isna())
            if words.size:
                row = int(words[0])
                raise InputError(f"{role} id in row {row} is {values[row]!r}, but the model's {role} ids are integers.")
        return convert_ids(values, model_kind)

    def _carried(self, F: np.ndarray, prefix: str, config: ALSConfig) -> np.ndarray:
        """Factor rows with the column their mode carries (bias or WALS weight), as routed in training."""
        if config.carried is None:
            return F
        return np.hstack([F, getattr(self, f"{prefix}_{config.carried}")[:, None].astype(F.dtype)])

    def _given_weights(self, ids: np.ndarray, known: np.ndarray, side: Side, config: ALSConfig) -> np.ndarray | None:
        """The rows' WALS weights when the model's were given as an array (they cannot be derived)."""
        spec = config.row_weights if side == "users" else config.col_weights
        if config.mode != "wals" or spec != "array":
            return None
        if (known < 0).any():
            raise InputError(f"the model's {side} weights were given as an array; {side[:-1]} "
                             f"{ids[known < 0][0]!r} has none.")
        return (self.user_weights if side == "users" else self.item_weights)[known]


def _as_seen(rated: sp.csr_array) -> Seen:
    """A boolean CSR matrix's rows as :class:`Seen`."""
    return Seen(rated.indptr.astype(np.int64), rated.indices.astype(np.int64))
