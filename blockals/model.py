"""The ALS estimator: parameters in, factors and history out.

:class:`ALS` holds its parameters (declared once, in :mod:`blockals.params`) and
delegates: training to :mod:`blockals.training`, using the fitted factors to
:class:`blockals.factors.Factors`, recommendations for every user to
:func:`blockals.recommend.recommend_all`, and persistence to :mod:`blockals.modelio`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from blockals import formats, modelio, params, training
from blockals.factors import Factors, FoldIn

__all__ = ["ALS", "FoldIn"]

_DOC = """Matrix factorization by alternating least squares, trained block-wise on Dask.

One estimator covers every formulation; each minimizes exactly the objective written
in ``docs/objectives.md`` (and :mod:`blockals.objectives`), and ``history_`` reports it.
By default it is Spark MLlib's explicit ALS::

    sum_{(u,i) observed} (r_ui - x_u . y_i)^2 + reg * (sum_u w_u |x_u|^2 + sum_i w_i |y_i|^2)

with ``w`` the row's rating count for ``reg_scaling="count"`` (Spark's ALS-WR scaling)
and 1 for ``reg_scaling="none"``. Parameters are stored by ``__init__`` and validated by
``fit``, each refusal one sentence naming the parameter (scikit-learn's contract:
``get_params``, ``set_params`` and ``sklearn.base.clone`` work).

@PARAMETERS@

Attributes
----------
user_factors_, item_factors_ : ndarray of shape (n_users, rank), (n_items, rank)
    Rows in the order of ``user_ids_`` / ``item_ids_``.
user_ids_, item_ids_ : ndarray
    Original ids.
user_bias_, item_bias_, global_mean_ :
    Learned biases and the global mean (``biases=True`` only).
user_weights_, item_weights_ :
    The WALS row weights ``R`` and ``C`` (``weighting="wals"`` only).
user_items_ : scipy.sparse.csr_array of bool, shape (n_users, n_items), or None
    Which items each user rated, kept by the model where the training store cannot tell:
    every rating of a model trained on an in-memory source or file (up to 50M ratings;
    a model trained on a saved store reads them from there), and the rows folded in with
    ``update=True``. :meth:`recommend` leaves them out.
history_ : list of dict
    Per iteration: ``iteration``, ``loss`` (the objective at the end of the
    iteration), ``train_rmse`` (against the ratings, or the preferences ``[r > 0]`` in
    implicit mode, over observed pairs), ``seconds``, ``bytes_routed``.
config_ : dict
    The validated configuration the factors were trained with.
store_path_ : str or None
    The training store (None when the ratings were ingested into a temporary store).
"""


class ALS:
    __doc__ = _DOC.replace("@PARAMETERS@", params.numpydoc())
    __init__ = params.make_init()

    # -- parameters (scikit-learn's contract) --------------------------------------------
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor parameters by name (``deep`` is accepted for scikit-learn; ALS nests no estimator)."""
        return {p.name: getattr(self, p.name) for p in params.PARAMS}

    def set_params(self, **values: Any) -> ALS:
        """Set parameters by name; an unknown name is refused, naming the nearest known one."""
        params.check_keys(values)
        for name, value in values.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        changed = [f"{p.name}={getattr(self, p.name)!r}" for p in params.PARAMS if not _same(getattr(self, p.name), p.default)]
        return f"ALS({', '.join(changed)})"

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
        client : distributed.Client or str, optional
            A client or a scheduler's address (``tcp://host:8786``); defaults to the current
            client, else a LocalCluster started for this fit.
        resume : bool
            Continue from the last committed iteration of this configuration's checkpoint.
        checkpoint_path : str, optional
            Where checkpoints go; by default ``<store>/checkpoints/<config fingerprint>``.
        storage_options : dict, optional
            fsspec options of a store given by path.
        break_lease : bool
            Take over the checkpoint's lease (:mod:`blockals.lock`) left on an object store
            by a training that died; a second training of one checkpoint is otherwise refused.
        """
        trained = training.train(self.get_params(), ratings, client, resume=resume, checkpoint_path=checkpoint_path,
                                 storage_options=storage_options, break_lease=break_lease)
        return self._learned(trained)

    def _learned(self, trained: training.Trained) -> ALS:
        """Take a training's factors and history as the learned attributes."""
        for name, value in trained.factors.attributes().items():
            setattr(self, name, value)
        self.history_ = trained.history
        return self

    # -- using the model -----------------------------------------------------------------
    def predict(self, users: Any, items: Any, cold_start: str = "nan") -> np.ndarray:
        """Predicted ratings for pairs of original ids.

        ``x_u . y_i``, plus ``mu + b_u + b_i`` for biased models. As Spark's
        ``coldStartStrategy``: ``"nan"`` gives NaN where the user or the item is unknown,
        ``"drop"`` leaves those pairs out.
        """
        return Factors.of(self).predict(users, items, cold_start)

    def recommend(self, users: Any, n: int = 10, exclude_seen: bool = True, items: Any = None, seen: Any = None,
                  filter_items: Any = None) -> pd.DataFrame:
        """Top-``n`` items for each known user, as Spark's ``recommendForUserSubset``.

        Parameters
        ----------
        users : id or array-like
            Original user ids; unknown ones are left out of the result.
        n : int
            Items per user.
        exclude_seen : bool
            Leave out the items each user rated: in the training store, or, for a model
            trained on an in-memory source, in ``user_items_``; and the items of rows
            folded in with ``update=True``.
        items : array-like, optional
            Only recommend among these original item ids.
        seen : RatingStore or path, optional
            The ratings to exclude instead of the training store's.
        filter_items : array-like, optional
            Never recommend these original item ids (as ``implicit``'s ``filter_items``).

        Returns
        -------
        DataFrame with columns ``user``, ``rank`` (1 = best), ``item``, ``score``.
        Scores are ``x_u . y_i`` (+ ``b_i`` for biased models); ties go to the lower
        item index; users with fewer than ``n`` candidates get fewer rows.
        """
        return Factors.of(self).recommend(users, n, exclude_seen, items, seen, filter_items)

    def recommend_users(self, items: Any, n: int = 10) -> pd.DataFrame:
        """Top-``n`` users for each known item, as Spark's ``recommendForItemSubset``."""
        return Factors.of(self).recommend_users(items, n)

    def recommend_all(self, n: int = 10, output: str | None = None, exclude_seen: bool = True, client: Any = None,
                      storage_options: dict | None = None, *, side: str = "users",
                      format: str | None = None, verbose: int = 0) -> str | pd.DataFrame:
        """Top-``n`` items for every user (``side="users"``, Spark's ``recommendForAllUsers``),
        or top-``n`` users for every item (``side="items"``, ``recommendForAllItems``).

        One Dask task per block of the training store scores its rows against the other
        side a tile at a time, so the full score matrix never exists; rows the store does
        not hold (folded in, or every row of a model trained without a saved store) are
        scored in this process.

        Parameters
        ----------
        n : int
            Results per row.
        output : str, optional
            Where to write them; None returns a DataFrame (for results that fit in memory).
        exclude_seen : bool
            Leave out the pairs rated in training (as :meth:`recommend` does).
        side : {"users", "items"}
            Whose recommendations.
        format : {"zarr", "parquet"}, optional
            ``"zarr"``: a recommendations store (:func:`blockals.recstore.read_recommendations`);
            ``"parquet"``: a Parquet dataset, one file per block, columns ``user, rank, item,
            score`` (``item, rank, user, score`` for items) in original ids, readable by Dask,
            Spark or pandas. Default: Parquet when ``output`` ends in ``.parquet``, else Zarr.
        verbose : int
            0: nothing; 1: the duration of the pass over the store's blocks, on standard
            output; 2: also its blocks as they finish, on standard error
            (:mod:`blockals.progress`).

        Returns
        -------
        str or DataFrame
            ``output``, or the recommendations when ``output`` is None.
        """
        return Factors.of(self).recommend_all(n, output, exclude_seen, client, storage_options, side, format, verbose)

    def similar_items(self, items: Any, n: int = 10, *, among: Any = None, filter_items: Any = None) -> pd.DataFrame:
        """The ``n`` items most similar (cosine of factors) to each known item, among ``among``
        (original ids; default all) less ``filter_items``."""
        return Factors.of(self).similar(items, n, "items", among, filter_items)

    def similar_users(self, users: Any, n: int = 10, *, among: Any = None, filter_users: Any = None) -> pd.DataFrame:
        """The ``n`` users most similar (cosine of factors) to each known user, among ``among``
        (original ids; default all) less ``filter_users``."""
        return Factors.of(self).similar(users, n, "users", among, filter_users)

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
        result = Factors.of(self).fold_in(ratings, side)
        if update:
            self._absorb(result, side)
            self._keep_rated(ratings)
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

    def _keep_rated(self, ratings: pd.DataFrame) -> None:
        """Add folded-in pairs to ``user_items_``, so recommendations leave them out."""
        factors = Factors.of(self)
        users, items = factors.index(ratings["user"].to_numpy(), "users"), factors.index(ratings["item"].to_numpy(), "items")
        shape = (factors.user_ids.shape[0], factors.item_ids.shape[0])
        pairs = sp.csr_array((np.ones(users.shape[0], dtype=bool), (users, items)), shape=shape)
        kept = getattr(self, "user_items_", None)
        if kept is not None:
            kept = kept.copy()
            kept.resize(shape)
            pairs = pairs + kept
        self.user_items_ = pairs

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str, storage_options: dict | None = None, *, overwrite: bool = False,
             break_lease: bool = False) -> None:
        """Write the model as a Zarr group with JSON attributes (no pickle).

        A complete model already at ``path`` is replaced only with ``overwrite=True``, as
        stores are by :func:`blockals.ingest`; it stays loadable until the new model is
        written whole (so a model may be saved over the path it was loaded from, and a
        save that fails leaves the old one in place).
        The model's lease (:mod:`blockals.lock`) is held while it is written, so a save
        while another run writes the same path is refused with
        :class:`~blockals.errors.LeaseError` instead of mixing the two models' arrays.
        ``break_lease`` takes over a lease left on an object store by a training that died.
        """
        path = formats.parse_path(path, "path")
        storage_options = formats.parse_storage_options(storage_options)
        overwrite = params.parse_bool(overwrite, "overwrite")
        factors = Factors.of(self)
        arrays = {name: getattr(factors, name) for name in modelio.ARRAYS
                  if hasattr(factors, name) and getattr(factors, name) is not None}
        if factors.user_items is not None:
            arrays |= {"user_items_indptr": factors.user_items.indptr.astype(np.int64),
                       "user_items_indices": factors.user_items.indices.astype(np.int64)}
        json_params = {k: v for k, v in self.get_params().items() if isinstance(v, (str, int, float, bool, type(None)))}
        saved = modelio.SavedModel(params=json_params, arrays=arrays, config=factors.config,
                                   store_path=factors.store_path, history=self.history_)
        modelio.write_model(path, saved, storage_options, overwrite=overwrite, break_lease=break_lease)

    @classmethod
    def load(cls, path: str, storage_options: dict | None = None) -> ALS:
        """Read a model written by :meth:`save`."""
        path = formats.parse_path(path, "path")
        saved = modelio.read_model(path, formats.parse_storage_options(storage_options))
        params.parse_saved_params(saved.params, f"{path}/zarr.json")  # edited by hand, or by another version
        model = cls(**saved.params)
        arrays = dict(saved.arrays)
        if "user_items_indptr" in arrays:
            indptr, indices = arrays.pop("user_items_indptr"), arrays.pop("user_items_indices")
            model.user_items_ = sp.csr_array((np.ones(indices.shape[0], dtype=bool), indices, indptr),
                                             shape=(indptr.shape[0] - 1, arrays["item_ids"].shape[0]))
        for name, value in arrays.items():
            setattr(model, f"{name}_", float(value[0]) if name == "global_mean" else value)
        model.history_, model.config_, model.store_path_ = saved.history, saved.config, saved.store_path
        return model


def _same(value: Any, default: Any) -> bool:
    """Whether a parameter still has its default (arrays never do)."""
    if isinstance(value, (np.ndarray, tuple, list)):
        return False
    return type(value) is type(default) and value == default
