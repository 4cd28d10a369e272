"""The ALS estimator: parameters in, factors and history out."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from blockals.checkpoint import Checkpoint
from blockals.config import ALSConfig, digest, parse_choice, parse_int
from blockals.cluster import connect
from blockals.engine import Engine
from blockals.errors import InputError, StoreError
from blockals.ingest import ingest
from blockals.lock import Lease
from blockals.formats import check_meta, open_group, read_array, remove_path, writable_meta, write_array
from blockals.store import RatingStore, open_store

__all__ = ["ALS", "FoldIn"]

log = logging.getLogger("blockals")

MODEL_FORMAT = "blockals-model"
MODEL_FORMAT_VERSION = 1
# Learned attributes a saved model holds (the bias ones only for biased models).
_LEARNED = (
    "user_factors_", "item_factors_", "user_ids_", "item_ids_", "user_bias_", "item_bias_", "global_mean_",
    "user_weights_", "item_weights_",
)


@dataclass(frozen=True)
class FoldIn:
    """Rows solved by :meth:`ALS.fold_in`: ids, factors, and biases or WALS weights when the model has them."""

    ids: np.ndarray
    factors: np.ndarray
    biases: np.ndarray | None = None
    weights: np.ndarray | None = None


class ALS:
    """Matrix factorization by alternating least squares, trained block-wise on Dask.

    One estimator covers every formulation; each minimizes exactly the objective written
    in ``docs/objectives.md`` (and :mod:`blockals.objectives`), and ``history_`` reports it.
    By default it is Spark MLlib's explicit ALS::

        sum_{(u,i) observed} (r_ui - x_u . y_i)^2 + reg * (sum_u w_u |x_u|^2 + sum_i w_i |y_i|^2)

    with ``w`` the row's rating count for ``reg_scaling="count"`` (Spark's ALS-WR scaling)
    and 1 for ``reg_scaling="none"``.

    Parameters
    ----------
    rank : int
        Number of latent factors.
    max_iter : int
        Iterations, at least 1; each solves all item factors, then all user factors (Spark's order).
    reg : float
        λ, the regularization strength.
    reg_scaling : {"count", "none"}
        Whether λ is multiplied by each row's number of ratings (positive ratings in
        implicit mode, as Spark counts them).
    implicit : bool
        Hu-Koren-Volinsky implicit feedback: confidence ``1 + alpha |r|``, preference
        ``[r > 0]``, summed over all (user, item) pairs.
    alpha : float
        Confidence scale of implicit feedback.
    biases : bool
        Learn user and item biases around the (fixed) global mean; explicit only.
    nonnegative : bool
        Constrain factors to be nonnegative (per-row NNLS); biases stay free.
    solver : {"cholesky", "cg"}
        Exact solve of each row's normal equations, or ``cg_steps`` conjugate-gradient steps
        warm-started at the previous factors.
    seed : int
        Seeds the initial factors; each row's draw depends only on (seed, row), so the
        model does not depend on block or worker counts.
    bias_reg : float, optional
        λ of the biases (default: ``reg``).
    weighting : {"none", "wals"}
        ``"wals"``: TensorFlow's weighted ALS over all pairs, weights ``unobserved_weight``
        off the data and ``unobserved_weight + R_u C_i`` on it.
    unobserved_weight : float
        ``w0`` of WALS.
    row_weights, col_weights : "counts", float or array
        ``R`` and ``C`` of WALS: each row's rating count, a constant, or one weight per
        user / item in the order of the store's ids.
    cg_steps : int
        Conjugate-gradient steps per half-step for ``solver="cg"``.
    init : "normal", "uniform", array or (array, array)
        Initial factors: unit-norm Gaussian rows (Spark), U(0, 0.01) (implicit), or given
        user factors (and item factors, used to warm-start the first item solve), rows in
        the order of the store's ids.
    dtype : {"float32", "float64"}
        Precision of factors and of the messages routed between blocks.
    checkpoint_interval : int
        Write a checkpoint every this many iterations (and after the last); 0 disables
        checkpoints and with them ``resume``.
    verbose : int
        1 (or True): print one line per iteration; 2: also a progress bar over the blocks
        of each iteration (on standard error).

    Attributes
    ----------
    user_factors_, item_factors_ : ndarray of shape (n_users, rank), (n_items, rank)
        Rows in the order of ``user_ids_`` / ``item_ids_``.
    user_ids_, item_ids_ : ndarray
        Original ids.
    user_bias_, item_bias_, global_mean_ :
        Learned biases and the global mean (``biases=True`` only).
    history_ : list of dict
        Per iteration: ``iteration``, ``loss`` (the objective at the end of the
        iteration), ``train_rmse`` (against the ratings, or the preferences ``[r > 0]`` in
        implicit mode, over observed pairs), ``seconds``, ``bytes_routed``.
    """

    def __init__(
        self,
        rank: int = 10,
        max_iter: int = 10,
        reg: float = 0.1,
        reg_scaling: str = "count",
        implicit: bool = False,
        alpha: float = 1.0,
        biases: bool = False,
        nonnegative: bool = False,
        solver: str = "cholesky",
        seed: int = 0,
        *,
        bias_reg: float | None = None,
        weighting: str = "none",
        unobserved_weight: float = 0.1,
        row_weights: Any = "counts",
        col_weights: Any = "counts",
        cg_steps: int = 3,
        init: Any = "normal",
        dtype: str = "float32",
        checkpoint_interval: int = 1,
        verbose: int = False,
    ) -> None:
        self.rank = rank
        self.max_iter = max_iter
        self.reg = reg
        self.reg_scaling = reg_scaling
        self.implicit = implicit
        self.alpha = alpha
        self.biases = biases
        self.nonnegative = nonnegative
        self.solver = solver
        self.seed = seed
        self.bias_reg = bias_reg
        self.weighting = weighting
        self.unobserved_weight = unobserved_weight
        self.row_weights = row_weights
        self.col_weights = col_weights
        self.cg_steps = cg_steps
        self.init = init
        self.dtype = dtype
        self.checkpoint_interval = checkpoint_interval
        self.verbose = verbose

    # -- parameters -------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """Constructor parameters, as scikit-learn estimators report them."""
        code = self.__init__.__code__
        names = code.co_varnames[1 : code.co_argcount + code.co_kwonlyargcount]
        return {name: getattr(self, name) for name in names}

    def _arrays(self, store: RatingStore) -> dict[str, np.ndarray]:
        """User-given arrays (initial factors, WALS weights), checked against the store."""
        arrays: dict[str, np.ndarray] = {}
        if not isinstance(self.init, str):
            users, items = self.init if isinstance(self.init, tuple) else (self.init, None)
            for key, value, side in (("user_init", users, "users"), ("item_init", items, "items")):
                if value is None:
                    continue
                value = np.asarray(value, dtype=np.float64)
                shape = (store.n_rows(side), self.rank)
                if value.shape != shape or not np.isfinite(value).all():
                    raise InputError(
                        f"init for {side} must be a finite array of shape {shape} (rows in the order of "
                        f"the store's {side[:-1]} ids), got shape {value.shape}."
                    )
                arrays[key] = value
        for key, side in (("row_weights", "users"), ("col_weights", "items")):
            value = getattr(self, key)
            if not isinstance(value, str) and np.ndim(value) == 1:
                value = np.asarray(value, dtype=np.float64)
                if value.shape != (store.n_rows(side),):
                    raise InputError(f"{key} must have one weight per {side[:-1]} ({store.n_rows(side)}), got {value.shape[0]}.")
                arrays[key] = value
        return arrays

    def _check_params(self) -> tuple[int, int]:
        """Check every parameter before any data is read (or a cluster started).

        Returns ``max_iter`` and ``checkpoint_interval``. ``max_iter=0`` is refused rather
        than returning the initial factors, which fit nothing.
        """
        self._config({})
        return parse_int(self.max_iter, "max_iter", 1), parse_int(self.checkpoint_interval, "checkpoint_interval", 0)

    def _config(self, arrays: dict[str, np.ndarray]) -> ALSConfig:
        params = {name: getattr(self, name) for name in (
            "rank", "reg", "reg_scaling", "implicit", "alpha", "biases", "bias_reg", "weighting",
            "unobserved_weight", "row_weights", "col_weights", "nonnegative", "solver", "cg_steps",
            "init", "seed", "dtype",
        )}
        return ALSConfig.parse(**params, arrays_digest=digest(arrays))

    # -- training ------------------------------------------------------------------------
    def fit(
        self,
        ratings: Any,
        client: Any = None,
        *,
        resume: bool = False,
        checkpoint_path: str | None = None,
        storage_options: dict | None = None,
        break_lease: bool = False,
    ) -> ALS:
        """Train on a ratings store (or anything :func:`blockals.ingest` accepts).

        Parameters
        ----------
        ratings : RatingStore, str, DataFrame or (users, items, ratings)
            A store, a store's path, or a source that is ingested into a temporary store.
        client : distributed.Client, optional
            Defaults to the current client, else a LocalCluster started for this fit.
        resume : bool
            Continue from the last committed iteration of this configuration's checkpoint.
        checkpoint_path : str, optional
            Where checkpoints go; by default ``<store>/checkpoints/<config fingerprint>``.
        break_lease : bool
            Take over the checkpoint's lease (:mod:`blockals.lock`) left on an object store
            by a training that died; a second training of one checkpoint is otherwise refused.
        """
        max_iter, interval = self._check_params()
        tmpdir = None
        try:
            if isinstance(ratings, RatingStore):
                store = ratings
            elif isinstance(ratings, (str, os.PathLike)) and _is_store(os.fspath(ratings), storage_options):
                store = open_store(os.fspath(ratings), storage_options)
            else:
                tmpdir = tempfile.mkdtemp(prefix="blockals-")
                store = ingest(ratings, os.path.join(tmpdir, "ratings.zarr"))
            arrays = self._arrays(store)
            config = self._config(arrays)
            if config.rank > min(store.n_users, store.n_items):
                log.warning("rank %d exceeds min(n_users, n_items); extra factors are unidentified", config.rank)
            checkpoint, lease = None, contextlib.nullcontext()
            if interval:
                path = checkpoint_path or f"{store.path}/checkpoints/{config.fingerprint()}"
                checkpoint = Checkpoint(path, store.store_id, config.to_dict(), store.storage_options)
                checkpoint.check_writable()  # before a cluster starts, not after
                # Taken before a cluster starts, so a second training is refused at once.
                lease = Lease(path, "checkpoint", store.storage_options, break_lease)
            elif resume:
                raise InputError("resume=True needs checkpoints; checkpoint_interval is 0.")
            with lease, connect(client) as c:
                engine = Engine(
                    c, store, config, checkpoint, interval or 1, self._report if self.verbose else None, arrays,
                    self._progress if self.verbose and self.verbose >= 2 else None,
                )
                result = engine.run(max_iter, resume=resume)
            users = _assemble(store, "users", result.blocks["users"], config.dtype)
            items = _assemble(store, "items", result.blocks["items"], config.dtype)
            k = config.rank
            self.user_factors_, self.item_factors_ = users[:, :k], items[:, :k]
            if config.biases:
                self.user_bias_, self.item_bias_ = users[:, k].copy(), items[:, k].copy()
                self.global_mean_ = float(store.stats["rating_mean"])
            if config.mode == "wals":
                self.user_weights_, self.item_weights_ = users[:, k].copy(), items[:, k].copy()
            self.config_ = config.to_dict()
            self.store_path_ = None if tmpdir is not None else store.path
            self.user_ids_ = store.user_ids.to_numpy()
            self.item_ids_ = store.item_ids.to_numpy()
            self.history_ = result.history
        finally:
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
        return self

    @staticmethod
    def _progress(iteration: int, done: int, total: int) -> None:
        bar = "#" * (30 * done // total)
        end = "\n" if done == total else ""
        print(f"\riteration {iteration:>3} [{bar:<30}] {done}/{total} blocks", end=end, file=sys.stderr, flush=True)

    @staticmethod
    def _report(entry: dict[str, Any]) -> None:
        print(
            f"iteration {entry['iteration']:>3}  objective {entry['loss']:.6g}  "
            f"train RMSE {entry['train_rmse']:.4f}  {entry['seconds']:.2f} s",
            flush=True,
        )

    # -- using the model -------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "user_factors_"):
            raise InputError("this ALS model is not fitted yet; call fit() or ALS.load() first.")

    def _index(self, ids: Any, side: str) -> np.ndarray:
        known = pd.Index(self.user_ids_ if side == "users" else self.item_ids_)
        ids = np.asarray(ids)
        if known.dtype.kind in "iu" and ids.dtype.kind not in "iu":
            ids = pd.to_numeric(pd.Series(ids), errors="coerce").to_numpy()
        return known.get_indexer(ids)

    def predict(self, users: Any, items: Any, cold_start: str = "nan") -> np.ndarray:
        """Predicted ratings for pairs of original ids.

        ``x_u . y_i``, plus ``mu + b_u + b_i`` for biased models. As Spark's
        ``coldStartStrategy``: ``"nan"`` gives NaN where the user or the item is unknown,
        ``"drop"`` leaves those pairs out.
        """
        self._check_fitted()
        cold_start = parse_choice(cold_start, "cold_start", ("nan", "drop"))
        u, i = self._index(users, "users"), self._index(items, "items")
        if u.shape != i.shape:
            raise InputError(f"users and items must have one length, got {u.shape[0]} and {i.shape[0]}.")
        known = (u >= 0) & (i >= 0)
        out = np.full(u.shape[0], np.nan)
        u, i = u[known], i[known]
        scores = np.einsum("ij,ij->i", self.user_factors_[u].astype(np.float64), self.item_factors_[i].astype(np.float64))
        if hasattr(self, "user_bias_"):
            scores += self.global_mean_ + self.user_bias_[u] + self.item_bias_[i]
        out[known] = scores
        return out[known] if cold_start == "drop" else out

    # -- recommendations ---------------------------------------------------------------
    def _seen_store(self, seen: Any) -> RatingStore:
        """The training ratings, refused unless its id maps are the model's.

        Rows are matched by global index, so a store with other ids (or one re-ingested
        at the training path) would silently pair users with other users' ratings. The
        model may hold more ids than the store: :meth:`fold_in` appends new ones after them.
        """
        if seen is not None:
            store = seen if isinstance(seen, RatingStore) else open_store(seen)
        elif getattr(self, "store_path_", None) is None:
            raise InputError(
                "exclude_seen=True needs the training ratings: this model was not fitted on a "
                "saved store, so pass seen=<store> or exclude_seen=False."
            )
        else:
            store = open_store(self.store_path_)
        for side, ids in (("users", self.user_ids_), ("items", self.item_ids_)):
            stored = store.ids(side).to_numpy()
            if len(stored) > len(ids) or not np.array_equal(stored, ids[: len(stored)]):
                raise InputError(
                    f"the {side[:-1]} ids of {store.path} are not the model's; use the store the model was "
                    f"trained on, or a split of it."
                )
        return store

    def _item_bias(self) -> np.ndarray | None:
        return getattr(self, "item_bias_", None)

    def recommend(self, users: Any, n: int = 10, exclude_seen: bool = True, items: Any = None, seen: Any = None) -> pd.DataFrame:
        """Top-``n`` items for each known user, as Spark's ``recommendForUserSubset``.

        Parameters
        ----------
        users : array-like
            Original user ids; unknown ones are left out of the result.
        n : int
            Items per user.
        exclude_seen : bool
            Leave out the items each user rated in the training store.
        items : array-like, optional
            Only recommend among these original item ids.
        seen : RatingStore or path, optional
            The ratings to exclude, when the model was not fitted on a saved store.

        Returns
        -------
        DataFrame with columns ``user``, ``rank`` (1 = best), ``item``, ``score``.
        Scores are ``x_u . y_i`` (+ ``b_i`` for biased models); ties go to the lower
        item index; users with fewer than ``n`` candidates get fewer rows.
        """
        from blockals.recommend import recommend_rows, seen_items, to_frame

        self._check_fitted()
        n = parse_int(n, "n", 1)
        u = self._index(users, "users")
        u = u[u >= 0]
        candidates = None
        if items is not None:
            candidates = self._index(items, "items")
            candidates = candidates[candidates >= 0]
        excluded = seen_items(self._seen_store(seen), u) if exclude_seen else None
        idx, val = recommend_rows(self.user_factors_[u], self.item_factors_, n, self._item_bias(), excluded, candidates)
        return to_frame("user", self.user_ids_[u], "item", self.item_ids_, idx, val)

    def recommend_users(self, items: Any, n: int = 10) -> pd.DataFrame:
        """Top-``n`` users for each known item, as Spark's ``recommendForItemSubset``."""
        from blockals.recommend import recommend_rows, to_frame

        self._check_fitted()
        i = self._index(items, "items")
        i = i[i >= 0]
        user_bias = getattr(self, "user_bias_", None)
        idx, val = recommend_rows(self.item_factors_[i], self.user_factors_, parse_int(n, "n", 1), user_bias)
        return to_frame("item", self.item_ids_[i], "user", self.user_ids_, idx, val)

    def recommend_all(self, n: int, output: str, exclude_seen: bool = True, client: Any = None, storage_options: dict | None = None) -> str:
        """Top-``n`` items for every user of the training store, written to a Zarr store.

        One Dask task per user block scores its users against all items in chunks (a
        batched product and a partial top-k), so the full score matrix never exists.
        Read the result with :func:`blockals.recommend.read_recommendations`.
        """
        from blockals.recommend import RECS_FORMAT, RECS_FORMAT_VERSION, recommend_block, write_recommendations

        self._check_fitted()
        n = parse_int(n, "n", 1)
        store = self._seen_store(None)
        output = str(output)
        writable_meta(output, RECS_FORMAT, "recommendations store", storage_options)
        root = open_group(output, "w", storage_options)
        meta = {"format": RECS_FORMAT, "format_version": RECS_FORMAT_VERSION, "n": n,
                "n_blocks": store.n_user_blocks, "complete": False}
        root.attrs["blockals"] = meta
        write_array(root, "user_ids", self.user_ids_)
        write_array(root, "item_ids", self.item_ids_)
        for b in range(store.n_user_blocks):
            root.require_group(f"blocks/{b}")
        with connect(client) as c:
            V = c.scatter(self.item_factors_, broadcast=True)
            bias = None if self._item_bias() is None else c.scatter(self._item_bias(), broadcast=True)
            tag = os.urandom(4).hex()
            writes = []
            for b in range(store.n_user_blocks):
                rows = store.rows("users", b)
                top = c.submit(recommend_block, store.ref, b, store.n_item_blocks, self.user_factors_[rows], V, bias, n,
                               exclude_seen, key=f"blockals-recommend-{b}-{tag}")
                writes.append(c.submit(lambda t, b=b: write_recommendations(output, storage_options, b, *t), top,
                                       key=f"blockals-recommend-write-{b}-{tag}"))
            c.gather(writes)
        root.attrs["blockals"] = {**meta, "complete": True}
        return output

    def similar_items(self, items: Any, n: int = 10) -> pd.DataFrame:
        """The ``n`` items most similar (cosine of factors) to each known item."""
        return self._similar(items, n, "items")

    def similar_users(self, users: Any, n: int = 10) -> pd.DataFrame:
        """The ``n`` users most similar (cosine of factors) to each known user."""
        return self._similar(users, n, "users")

    def _similar(self, ids: Any, n: int, side: str) -> pd.DataFrame:
        from blockals.recommend import similar, to_frame

        self._check_fitted()
        F, all_ids = (self.item_factors_, self.item_ids_) if side == "items" else (self.user_factors_, self.user_ids_)
        rows = self._index(ids, side)
        rows = rows[rows >= 0]
        idx, val = similar(F, rows, parse_int(n, "n", 1))
        name = side[:-1]
        return to_frame(name, all_ids[rows], "similar", all_ids, idx, val)

    def fold_in(self, ratings: Any, side: str = "users", update: bool = False) -> FoldIn:
        """Factors of new or changed users (or items), solved against the fixed other side.

        Each row is solved exactly as a half-step of training would solve it, with the
        model's own objective: the same systems, solver and constraints.

        Parameters
        ----------
        ratings : DataFrame with columns user, item, rating
            All ratings of the rows to fold in; ids of the other side must be known.
        side : {"users", "items"}
        update : bool
            Also put the rows into the model (replacing known ids, appending new ones).
        """
        from blockals.recommend import fold_in

        self._check_fitted()
        result = fold_in(self, ratings, parse_choice(side, "side", ("users", "items")))
        if update:
            self._absorb(result, side)
        return result

    def _absorb(self, result: FoldIn, side: str) -> None:
        prefix = "user" if side == "users" else "item"
        ids = getattr(self, f"{prefix}_ids_")
        pos = pd.Index(ids).get_indexer(result.ids)
        new = pos < 0
        for name, values in (("factors", result.factors), ("bias", result.biases), ("weights", result.weights)):
            attr = f"{prefix}_{name}_"
            if values is None or not hasattr(self, attr):
                continue
            current = getattr(self, attr)
            current[pos[~new]] = values[~new]
            setattr(self, attr, np.concatenate([current, values[new].astype(current.dtype)]))
        setattr(self, f"{prefix}_ids_", np.concatenate([ids, np.asarray(result.ids)[new].astype(ids.dtype)]))

    # -- persistence --------------------------------------------------------------------
    def save(self, path: str, storage_options: dict | None = None, *, break_lease: bool = False) -> None:
        """Write the model as a Zarr group with JSON attributes (no pickle).

        The model's lease (:mod:`blockals.lock`) is held while it is written, so a save
        while another training writes the same path is refused with
        :class:`~blockals.errors.LeaseError` instead of mixing the two models' arrays.
        ``break_lease`` takes over a lease left on an object store by a training that died.
        """
        self._check_fitted()
        with Lease(str(path), "model", storage_options, break_lease):
            writable_meta(str(path), MODEL_FORMAT, "model", storage_options)  # mode "w" empties what is there
            # An older model is marked incomplete before its arrays go: a save cut short never reads as complete.
            remove_path(str(path), storage_options)
            params = {k: v for k, v in self.get_params().items() if isinstance(v, (str, int, float, bool, type(None)))}
            meta = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "params": params, "complete": False}
            root = open_group(str(path), "w", storage_options, attributes={"blockals": meta})
            for name in _LEARNED:
                if hasattr(self, name):
                    write_array(root, name.rstrip("_"), np.atleast_1d(getattr(self, name)))
            extra = {"config": getattr(self, "config_", None), "store_path": getattr(self, "store_path_", None)}
            root.attrs["blockals"] = {**meta, **extra, "history": self.history_, "complete": True}

    @classmethod
    def load(cls, path: str, storage_options: dict | None = None) -> ALS:
        """Read a model written by :meth:`save`."""
        root = open_group(str(path), "r", storage_options)
        meta = check_meta(root.attrs.get("blockals"), str(path), MODEL_FORMAT, MODEL_FORMAT_VERSION, "model")
        model = cls(**meta["params"])
        try:
            present = set(root.array_keys())
        except ValueError as exc:  # an array's metadata Zarr cannot parse, e.g. a planted pickle codec
            raise StoreError(f"{path} cannot be read ({exc}).") from exc
        for name in _LEARNED:
            if name.rstrip("_") in present:
                setattr(model, name, read_array(root, name.rstrip("_"), str(path)))
        if hasattr(model, "global_mean_"):
            model.global_mean_ = float(model.global_mean_[0])
        model.history_ = meta["history"]
        model.config_ = meta.get("config")
        model.store_path_ = meta.get("store_path")
        return model


def _is_store(path: str, storage_options: dict | None) -> bool:
    try:
        meta = open_group(path, "r", storage_options).attrs.get("blockals")
    except StoreError:
        return False
    return isinstance(meta, dict)


def _assemble(store: RatingStore, side: str, blocks: list[np.ndarray], dtype: str) -> np.ndarray:
    """Factor blocks into one array in global-index (sorted id) order."""
    out = np.zeros((store.n_rows(side), blocks[0].shape[1]), dtype=dtype)
    for b, factors in enumerate(blocks):
        out[store.rows(side, b)] = factors
    return out
