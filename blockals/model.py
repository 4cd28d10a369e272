"""The ALS estimator: parameters in, factors and history out."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import pandas as pd

from blockals.checkpoint import Checkpoint
from blockals.config import ALSConfig, parse_int
from blockals.engine import Engine, connect
from blockals.errors import InputError, StoreError
from blockals.ingest import ingest
from blockals.store import RatingStore, open_group, open_store, write_array, read_array

__all__ = ["ALS"]

log = logging.getLogger("blockals")

MODEL_FORMAT = "blockals-model"
MODEL_FORMAT_VERSION = 1


class ALS:
    """Matrix factorization by alternating least squares, trained block-wise on Dask.

    Explicit feedback, as Spark MLlib's ALS, minimizes::

        sum_{(u,i) observed} (r_ui - x_u . y_i)^2 + reg * (sum_u w_u |x_u|^2 + sum_i w_i |y_i|^2)

    with ``w`` the row's rating count for ``reg_scaling="count"`` (Spark's ALS-WR scaling)
    and 1 for ``reg_scaling="none"``. See ``docs/objectives.md``.

    Parameters
    ----------
    rank : int
        Number of latent factors.
    max_iter : int
        Iterations; each solves all item factors, then all user factors (Spark's order).
    reg : float
        λ, the regularization strength.
    reg_scaling : {"count", "none"}
        Whether λ is multiplied by each row's number of ratings.
    implicit, alpha, biases, nonnegative :
        Implicit feedback, learned biases and nonnegative factors (not yet available).
    solver : {"cholesky"}
        Exact solve of each row's normal equations.
    seed : int
        Seeds the initial factors; each row's draw depends only on (seed, row), so the
        model does not depend on block or worker counts.
    dtype : {"float32", "float64"}
        Precision of factors and of the messages routed between blocks.
    checkpoint_interval : int
        Write a checkpoint every this many iterations (and after the last); 0 disables
        checkpoints and with them ``resume``.
    verbose : bool
        Print one line per iteration.

    Attributes
    ----------
    user_factors_, item_factors_ : ndarray of shape (n_users, rank), (n_items, rank)
        Rows in the order of ``user_ids_`` / ``item_ids_``.
    user_ids_, item_ids_ : ndarray
        Original ids.
    history_ : list of dict
        Per iteration: ``iteration``, ``loss`` (the objective above at the end of the
        iteration), ``train_rmse``, ``seconds``, ``bytes_routed``.
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
        dtype: str = "float32",
        checkpoint_interval: int = 1,
        verbose: bool = False,
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
        self.dtype = dtype
        self.checkpoint_interval = checkpoint_interval
        self.verbose = verbose

    # -- parameters -------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__init__.__code__.co_varnames[1 : self.__init__.__code__.co_argcount]}

    def _config(self) -> ALSConfig:
        for name in ("implicit", "biases", "nonnegative"):
            if getattr(self, name):
                raise InputError(f"{name}=True is not available in this version of blockals.")
        return ALSConfig.parse(
            rank=self.rank, reg=self.reg, reg_scaling=self.reg_scaling, solver=self.solver, seed=self.seed, dtype=self.dtype
        )

    # -- training ------------------------------------------------------------------------
    def fit(
        self,
        ratings: Any,
        client: Any = None,
        *,
        resume: bool = False,
        checkpoint_path: str | None = None,
        storage_options: dict | None = None,
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
        """
        config = self._config()
        max_iter = parse_int(self.max_iter, "max_iter", 1)
        interval = parse_int(self.checkpoint_interval, "checkpoint_interval", 0)
        tmpdir = None
        try:
            if isinstance(ratings, RatingStore):
                store = ratings
            elif isinstance(ratings, (str, os.PathLike)) and _is_store(os.fspath(ratings), storage_options):
                store = open_store(os.fspath(ratings), storage_options)
            else:
                tmpdir = tempfile.mkdtemp(prefix="blockals-")
                store = ingest(ratings, os.path.join(tmpdir, "ratings.zarr"))
            if config.rank > min(store.n_users, store.n_items):
                log.warning("rank %d exceeds min(n_users, n_items); extra factors are unidentified", config.rank)
            checkpoint = None
            if interval:
                path = checkpoint_path or f"{store.path}/checkpoints/{config.fingerprint()}"
                checkpoint = Checkpoint(path, store.store_id, config.to_dict(), store.storage_options)
            elif resume:
                raise InputError("resume=True needs checkpoints; checkpoint_interval is 0.")
            with connect(client) as c:
                engine = Engine(c, store, config, checkpoint, interval or 1, self._report if self.verbose else None)
                result = engine.run(max_iter, resume=resume)
            self.user_factors_ = _assemble(store, "users", result.blocks["users"], config.rank, config.dtype)
            self.item_factors_ = _assemble(store, "items", result.blocks["items"], config.rank, config.dtype)
            self.user_ids_ = store.user_ids.to_numpy()
            self.item_ids_ = store.item_ids.to_numpy()
            self.history_ = result.history
        finally:
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
        return self

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

    def predict(self, users: Any, items: Any) -> np.ndarray:
        """Predicted ratings ``x_u . y_i`` for pairs of original ids; NaN for unknown ids."""
        self._check_fitted()
        u, i = self._index(users, "users"), self._index(items, "items")
        if u.shape != i.shape:
            raise InputError(f"users and items must have one length, got {u.shape[0]} and {i.shape[0]}.")
        known = (u >= 0) & (i >= 0)
        out = np.full(u.shape[0], np.nan)
        out[known] = np.einsum(
            "ij,ij->i",
            self.user_factors_[u[known]].astype(np.float64),
            self.item_factors_[i[known]].astype(np.float64),
        )
        return out

    # -- persistence --------------------------------------------------------------------
    def save(self, path: str, storage_options: dict | None = None) -> None:
        """Write the model as a Zarr group with JSON attributes (no pickle)."""
        self._check_fitted()
        root = open_group(str(path), "w", storage_options)
        meta = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "params": self.get_params(), "complete": False}
        root.attrs["blockals"] = meta
        for name in ("user_factors_", "item_factors_", "user_ids_", "item_ids_"):
            write_array(root, name.rstrip("_"), getattr(self, name))
        root.attrs["blockals"] = {**meta, "history": self.history_, "complete": True}

    @classmethod
    def load(cls, path: str, storage_options: dict | None = None) -> ALS:
        """Read a model written by :meth:`save`."""
        root = open_group(str(path), "r", storage_options)
        meta = root.attrs.get("blockals")
        if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
            raise StoreError(f"{path} is not a blockals model.")
        if meta.get("format_version") != MODEL_FORMAT_VERSION:
            raise StoreError(
                f"model {path} has format version {meta.get('format_version')}, but this blockals "
                f"reads version {MODEL_FORMAT_VERSION}."
            )
        if not meta.get("complete"):
            raise StoreError(f"model {path} is incomplete: it was not completely written.")
        model = cls(**meta["params"])
        for name in ("user_factors", "item_factors", "user_ids", "item_ids"):
            setattr(model, name + "_", read_array(root, name, str(path)))
        model.history_ = meta["history"]
        return model


def _is_store(path: str, storage_options: dict | None) -> bool:
    try:
        meta = open_group(path, "r", storage_options).attrs.get("blockals")
    except StoreError:
        return False
    return isinstance(meta, dict)


def _assemble(store: RatingStore, side: str, blocks: list[np.ndarray], rank: int, dtype: str) -> np.ndarray:
    """Factor blocks into one array in global-index (sorted id) order."""
    out = np.zeros((store.n_rows(side), rank), dtype=dtype)
    for b, factors in enumerate(blocks):
        out[store.rows(side, b)] = factors
    return out
