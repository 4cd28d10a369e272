"""Model selection on one ratings store: successive halving over a space of parameters.

:func:`search` carves one validation split from the training store (by rating for RMSE
and MAE, per user for ranking metrics; :func:`blockals.evaluation.split`), then trains
every candidate of the space for ``min_iter`` iterations, all at once on one cluster,
scores them on the validation ratings (:func:`blockals.evaluation.evaluate`), keeps the
best ``1/factor`` and lets the survivors run ``factor`` times as many iterations, until
``max_iter``. This is Jamieson and Talwalkar's successive halving, as dask-ml's
``SuccessiveHalvingSearchCV`` runs it; Spark's ``TrainValidationSplit`` is the same
search without the early stops.

Every candidate reads the same two stores: the block cache of a worker is keyed by the
store's id (:mod:`blockals.store`), so concurrent candidates share the blocks it holds.
A survivor continues from its checkpoint (``fit(resume=True)``), which gives the same
factors as one uninterrupted run of as many iterations, so the early stops cost no
quality. The best candidate is then refitted on every training rating, with the
iterations it reached.

The split stores and the candidates' checkpoints live under ``<store>/search/``, held by
a lease (:mod:`blockals.lock`) so a second search of the store is refused (the store is
leased for reading too), and removed
when the search ends, however it ends; a search killed outright leaves them for the next
search of the store to remove.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from blockals import training
from blockals.cluster import connect
from blockals.errors import InputError
from blockals.evaluation import evaluate, split
from blockals.formats import remove_path
from blockals.lock import Lease
from blockals.model import ALS
from blockals.params import BY_NAME, check_keys, parse_bool, parse_float, parse_int, parse_params, parse_verbose
from blockals.store import RatingStore, open_store

__all__ = ["search", "plan", "Plan", "SearchResult", "Candidate", "Schedule", "DEFAULT_SPACES", "parse_space", "parse_metric"]

# Explicit: both regularization scalings, each over its own range of λ (Spark's count-scaled
# λ is about a rating count smaller than the plain one), with and without biases.
# Implicit: confidence scales from implicit's default to Hu, Koren and Volinsky's 40.
DEFAULT_SPACES: dict[str, list[dict[str, list[Any]]]] = {
    "explicit": [
        {"rank": [8, 16, 32], "reg": [0.02, 0.05, 0.1, 0.2], "reg_scaling": ["count"], "biases": [False, True]},
        {"rank": [8, 16, 32], "reg": [1.0, 3.0, 10.0], "reg_scaling": ["none"], "biases": [False, True]},
    ],
    "implicit": [
        {"rank": [16, 32, 64], "reg": [0.01, 0.1, 1.0], "reg_scaling": ["none"], "alpha": [1.0, 10.0, 40.0]},
    ],
}

# Parameters that describe a run rather than a model, or are set by the search itself.
_NOT_SEARCHED = {
    "max_iter": "the search sets each candidate's iterations (use min_iter and max_iter of search)",
    "implicit": "pass implicit=True to search, which also picks the default space and metric",
    "verbose": "it does not change the model",
    "checkpoint_interval": "the search checkpoints each candidate at the end of each rung",
    "checkpoint_seconds": "the search checkpoints each candidate at the end of each rung",
}
_LOWER_IS_BETTER = ("rmse", "mae")
_RANKING = ("precision", "recall", "ndcg", "map")
# Added to the seed of the validation split. The split draws each rating by a hash of
# (seed, user, item), so with the seed that made the caller's train/test split it would
# draw exactly the ratings that split already moved to the test set: none would be left.
SPLIT_SEED = 0x5EA4C4
# Candidates trained at once: enough to keep every core busy between one candidate's
# iterations, few enough that the scheduler and the driver's threads stay light.
CONCURRENT = 16


# -- validation --------------------------------------------------------------------------


def parse_metric(metric: Any, implicit: bool) -> tuple[str, int]:
    """``(name, k)`` of a metric :func:`blockals.evaluation.evaluate` reports: ``"rmse"``,
    ``"mae"``, ``"auc"`` or ``"<precision|recall|ndcg|map>@<k>"``; None: RMSE, or nDCG@10
    in implicit mode (whose predictions are preferences, not ratings)."""
    if metric is None:
        return ("ndcg@10", 10) if implicit else ("rmse", 10)
    cut = str(metric).partition("@")[2]
    k = int(cut) if cut.isdigit() and int(cut) >= 1 else 10
    check_keys([metric], [*_LOWER_IS_BETTER, "auc", *(f"{name}@{k}" for name in _RANKING)], "unknown metric {key}")
    return metric, k


def _values(name: str, values: Any) -> list[Any]:
    """The values a space gives a parameter: a list, or one value."""
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if not values:
        raise InputError(f"space gives {name} no value; give it at least one.")
    for value in values:
        if not isinstance(value, (str, bool, int, float, np.generic)):
            raise InputError(f"space gives {name} the value {value!r}; values must be numbers, strings or booleans.")
    return values


def parse_space(space: Any, implicit: bool, seed: int) -> list[dict[str, Any]]:
    """The candidates of a space: each grid's Cartesian product, in order, without repeats.

    ``space`` is a dict from parameter name to a list of values (one value fixes it), a
    list of such dicts (their candidates together, as scikit-learn's ``param_grid``), or
    None for :data:`DEFAULT_SPACES`. Every candidate is validated as :class:`blockals.ALS`
    would validate it; each refusal is one sentence naming the parameter.
    """
    if space is None:
        space = DEFAULT_SPACES["implicit" if implicit else "explicit"]
    grids = [space] if isinstance(space, Mapping) else list(space) if isinstance(space, (list, tuple)) else None
    if grids is None or not all(isinstance(g, Mapping) for g in grids):
        raise InputError(f"space must be a dict from parameter name to values, or a list of such dicts; got {type(space).__name__}.")
    if not grids or not any(grids):
        raise InputError("space is empty; give at least one parameter and its values.")
    searchable = [name for name in BY_NAME if name not in _NOT_SEARCHED]
    candidates: list[dict[str, Any]] = []
    for grid in grids:
        for name in grid:
            if name in _NOT_SEARCHED:
                raise InputError(f"space cannot hold {name}: {_NOT_SEARCHED[name]}.")
        check_keys(grid, searchable, "space has unknown parameter {key}")
        names = list(grid)
        for combo in itertools.product(*(_values(name, grid[name]) for name in names)):
            params = {"seed": seed, **{n: v.item() if isinstance(v, np.generic) else v for n, v in zip(names, combo)}}
            try:
                parse_params({**params, "implicit": implicit})
            except InputError as exc:
                raise InputError(f"space: {exc}") from None
            if params not in candidates:
                candidates.append(params)
    return candidates


@dataclass(frozen=True)
class Schedule:
    """Successive halving's rungs: every candidate runs ``min_iter`` iterations, then the
    best ``1/factor`` of each rung run ``factor`` times as many, up to ``max_iter``."""

    min_iter: int
    max_iter: int
    factor: int

    @classmethod
    def parse(cls, min_iter: Any, max_iter: Any, factor: Any) -> Schedule:
        min_iter = parse_int(min_iter, "min_iter", 1)
        return cls(min_iter, parse_int(max_iter, "max_iter", min_iter), parse_int(factor, "factor", 2))

    def rungs(self, n_candidates: int, budget: int | None) -> list[tuple[int, int]]:
        """``(candidates, iterations)`` of each rung; rungs past ``budget`` (iterations summed
        over candidates) are left out, and a budget short of the first rung is refused."""
        rungs, n, iterations = [(n_candidates, self.min_iter)], n_candidates, self.min_iter
        while iterations < self.max_iter:
            n, iterations = max(1, math.ceil(n / self.factor)), min(iterations * self.factor, self.max_iter)
            rungs.append((n, iterations))
        costs = np.cumsum([n * (it - prev) for (n, it), prev in zip(rungs, [0] + [it for _, it in rungs])])
        if budget is not None:
            if budget < costs[0]:
                raise InputError(
                    f"budget={budget} is too small for one rung: {n_candidates} candidates x {self.min_iter} "
                    f"iterations need {costs[0]}."
                )
            rungs = rungs[: int(np.searchsorted(costs, budget, side="right"))]
        return rungs


def _parse_validation(validation: Any) -> float:
    validation = parse_float(validation, "validation")
    if validation >= 1:
        raise InputError(f"validation={validation:g} leaves no training rating; give a fraction below 1, such as 0.1.")
    if validation == 0:
        raise InputError("validation must be above 0: the candidates are scored on that fraction of the ratings.")
    return validation


# -- the search --------------------------------------------------------------------------


@dataclass
class Candidate:
    """One point of the space and how far it went: ``scores`` maps iterations to the
    validation metric; ``seconds`` adds up its fits and evaluations (which overlap with
    other candidates')."""

    index: int
    params: dict[str, Any]
    scores: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def iterations(self) -> int:
        return max(self.scores, default=0)


@dataclass(frozen=True, kw_only=True)
class SearchResult:
    """What :func:`search` found.

    Attributes
    ----------
    best_params : dict
        The parameters of the best candidate of the last rung, ``max_iter`` included.
    best_model : ALS
        An ``ALS(**best_params)`` fitted on every rating of the store.
    best_score : float
        The best candidate's validation metric.
    metric : str
    candidates : pandas.DataFrame
        One row per candidate: its parameters, ``iterations`` run, the validation metric
        after each rung's iterations (``<metric>_it<n>``, NaN where it was stopped before)
        and ``seconds``.
    rungs : list of str
        The progress line of each rung.
    """

    best_params: dict[str, Any]
    best_model: ALS
    best_score: float
    metric: str
    candidates: pd.DataFrame
    rungs: list[str]

    def plot(self, path: str | None = None):
        """The validation metric against iterations, one line per candidate; returns the
        matplotlib figure, also written to ``path`` if given. Needs matplotlib."""
        try:
            from matplotlib.figure import Figure  # not pyplot: no backend or global figure is touched
        except ImportError as exc:
            raise InputError("plotting a search needs matplotlib: pip install 'blockals[plot]'.") from exc
        columns = [c for c in self.candidates if c.startswith(f"{self.metric}_it")]
        x = [int(c.rsplit("_it", 1)[1]) for c in columns]
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for _, row in self.candidates.iterrows():
            ax.plot(x, row[columns].to_numpy(dtype=float), marker="o", lw=1, alpha=0.6)
        ax.set(xlabel="iterations", ylabel=f"validation {self.metric}", title="successive halving", xscale="log")
        ax.set_xticks(x, [str(i) for i in x])
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if k != "seed")


def _table(candidates: list[Candidate], metric: str, checkpoints: Iterable[int]) -> pd.DataFrame:
    rows = [
        {"candidate": c.index, **c.params, "iterations": c.iterations,
         **{f"{metric}_it{it}": c.scores.get(it, np.nan) for it in checkpoints}, "seconds": round(c.seconds, 3)}
        for c in candidates
    ]
    return pd.DataFrame(rows).set_index("candidate")


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A validated search: the candidates' parameters, the rungs ``(candidates, iterations)``
    and how candidates are scored (see :func:`search` for the fields)."""

    candidates: tuple[dict[str, Any], ...]
    rungs: tuple[tuple[int, int], ...]
    implicit: bool
    metric: str
    k: int
    validation: float
    seed: int

    @property
    def ranking(self) -> bool:
        """Whether the metric ranks items (its validation ratings are then drawn per user)."""
        return self.metric not in (*_LOWER_IS_BETTER, "auc")


def plan(
    space: Any = None, *, implicit: bool = False, metric: str | None = None, validation: float = 0.1,
    min_iter: int = 3, max_iter: int = 20, factor: int = 3, budget: int | None = None, seed: int = 0,
) -> Plan:
    """Validate :func:`search`'s arguments, each refusal one sentence naming the argument,
    before any data is read or a cluster started."""
    implicit = parse_bool(implicit, "implicit")
    metric, k = parse_metric(metric, implicit)
    validation = _parse_validation(validation)
    seed = parse_int(seed, "seed", 0)
    schedule = Schedule.parse(min_iter, max_iter, factor)
    budget = None if budget is None else parse_int(budget, "budget", 1)
    candidates = parse_space(space, implicit, seed)
    return Plan(candidates=tuple(candidates), rungs=tuple(schedule.rungs(len(candidates), budget)), implicit=implicit,
                metric=metric, k=k, validation=validation, seed=seed)


def search(
    store: RatingStore | str,
    space: Any = None,
    *,
    implicit: bool = False,
    metric: str | None = None,
    validation: float = 0.1,
    min_iter: int = 3,
    max_iter: int = 20,
    factor: int = 3,
    budget: int | None = None,
    seed: int = 0,
    client: Any = None,
    verbose: int = 1,
    storage_options: dict | None = None,
) -> SearchResult:
    """Choose ALS parameters on a validation split of one store, by successive halving.

    Parameters
    ----------
    store : RatingStore or str
        The training ratings (a store or its path); the caller's test set stays out of it.
    space : dict or list of dict, optional
        Parameter name to the values to try (one value fixes it), or a list of such dicts
        whose candidates are taken together; any :class:`blockals.ALS` parameter except
        ``max_iter``, ``implicit`` and how a run checkpoints. None: :data:`DEFAULT_SPACES`
        (explicit: rank, reg, reg_scaling, biases; implicit: rank, reg, alpha).
    implicit : bool
        Search implicit-feedback models (and their default space and metric).
    metric : str, optional
        What the candidates are ranked by, on the validation ratings: ``"rmse"``, ``"mae"``,
        ``"auc"``, or ``"precision@k"``, ``"recall@k"``, ``"ndcg@k"``, ``"map@k"``
        (:mod:`blockals.evaluation` defines each). None: ``"rmse"``, or ``"ndcg@10"`` with
        ``implicit=True``.
    validation : float
        The fraction of the ratings held out to score candidates: each rating with this
        probability for RMSE and MAE (a user whose ratings all fall out is predicted as a
        new user), ``floor(validation * n_u)`` of every user's ratings for the others.
    min_iter, max_iter, factor : int
        The rungs: every candidate runs ``min_iter`` iterations; the best ``1/factor`` of a
        rung continue to ``factor`` times as many iterations, up to ``max_iter``, which the
        best candidate reaches.
    budget : int, optional
        At most this many iterations, summed over candidates and rungs (the refit apart);
        rungs that would pass it are not run, and the best candidate of the last rung run
        wins. None: every rung.
    seed : int
        Seeds the validation split (drawn independently of a split made with the same seed
        by :func:`blockals.evaluation.split`) and, unless the space gives ``seed``, every
        candidate.
    client : distributed.Client, optional
        Defaults to the current client, else a LocalCluster started for the search.
    verbose : int
        1: a progress line per rung; 0: none.
    storage_options : dict, optional
        fsspec options of a store given by path.

    Returns
    -------
    SearchResult
    """
    p = plan(space, implicit=implicit, metric=metric, validation=validation, min_iter=min_iter, max_iter=max_iter,
             factor=factor, budget=budget, seed=seed)
    verbose = parse_verbose(verbose, "verbose")
    if not isinstance(store, RatingStore):
        store = open_store(str(store), storage_options)

    work = f"{store.path}/search"
    with store.reading(), Lease(work, "search", store.storage_options), connect(client, ratings=store.nnz) as c:
        remove_path(work, store.storage_options)  # what a search killed outright left behind
        try:
            return _halve(c, store, work, p, verbose)
        finally:
            remove_path(work, store.storage_options)


def _halve(client: Any, store: RatingStore, work: str, p: Plan, verbose: int) -> SearchResult:
    try:
        train, held = split(store, f"{work}/train.zarr", f"{work}/validation.zarr",
                            method="ratio" if p.ranking else "random", fraction=p.validation, seed=SPLIT_SEED + p.seed)
    except InputError as exc:  # the arguments are valid, so a part came out empty
        raise InputError(f"validation={p.validation:g} cannot split the {store.nnz} ratings of {store.path} into "
                         f"two parts with ratings ({exc})") from None
    metric, rungs = p.metric, p.rungs
    sign = 1.0 if metric in _LOWER_IS_BETTER else -1.0  # sorted ascending: the best first

    def fit(c: Candidate, iterations: int, resume: bool) -> None:
        start = time.perf_counter()
        model = ALS(**c.params, implicit=p.implicit, max_iter=iterations, checkpoint_interval=iterations)
        trained = training.train(model.get_params(), train, client, resume=resume, checkpoint_path=f"{work}/c{c.index}",
                                 key_prefix="blockals-search", run_tag=f"c{c.index}")
        model._learned(trained)
        score = evaluate(model, held, train if p.ranking else None, k=p.k, client=client)[metric]
        c.scores[iterations] = float(score) if np.isfinite(score) else np.inf * sign
        c.seconds += time.perf_counter() - start

    candidates = [Candidate(i, params) for i, params in enumerate(p.candidates)]
    alive, lines, done = list(candidates), [], 0
    with ThreadPoolExecutor(CONCURRENT, thread_name_prefix="blockals-search") as pool:
        try:
            for r, (n, iterations) in enumerate(rungs):
                start = time.perf_counter()
                alive = sorted(alive, key=lambda c: sign * c.scores[done])[:n] if r else alive
                list(pool.map(lambda c: fit(c, iterations, r > 0), alive))
                done = iterations
                alive = sorted(alive, key=lambda c: sign * c.scores[iterations])
                then = f"{rungs[r + 1][0]} go on to {rungs[r + 1][1]}" if r + 1 < len(rungs) else "the best is refitted"
                lines.append(
                    f"rung {r + 1}/{len(rungs)}: {len(alive)} candidates at {iterations} iterations in "
                    f"{time.perf_counter() - start:.1f} s; best {metric} {alive[0].scores[iterations]:.4f} "
                    f"({_describe(alive[0].params)}); {then}"
                )
                if verbose:
                    print(lines[-1], flush=True)
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the running fits end their rung; none starts
            raise
    best = alive[0]
    best_params = {**best.params, "implicit": p.implicit, "max_iter": best.iterations}
    model = ALS(**best_params)
    # Checkpointed once, at the end, into the search's directory: nothing is left in the store.
    trained = training.train({**model.get_params(), "checkpoint_interval": best.iterations}, store, client,
                             checkpoint_path=f"{work}/refit", key_prefix="blockals-search", run_tag="refit")
    model._learned(trained)
    if verbose:
        print(f"refitted {_describe(best_params)} on all {store.nnz:,} ratings", flush=True)
    return SearchResult(best_params=best_params, best_model=model, best_score=best.scores[best.iterations],
                        metric=metric, candidates=_table(candidates, metric, [it for _, it in rungs]), rungs=lines)
