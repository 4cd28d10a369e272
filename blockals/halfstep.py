"""One half-step of one destination block: routed rows in, solved rows and loss terms out.

This is the only place where systems are built and solved. The Dask engine calls
:func:`solve_block` inside its solve tasks; :meth:`blockals.ALS.fold_in` calls it on a
block made of the rows being folded in. Both therefore solve a row exactly the same way:
the objective (:mod:`blockals.objectives`) turns the block's ratings and the routed factor
rows into :class:`~blockals.kernels.RowSystems`, the kernels (:mod:`blockals.kernels`)
solve them, and the objective finishes the factor block (adding a carried column) and
prices it (:class:`LossTerms`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from blockals import kernels
from blockals.objectives import Objective
from blockals.params import ALSConfig
from blockals.routing import InBlock, build_inblock

__all__ = ["LossTerms", "SolvedBlock", "solve_block", "routed_rows", "gram", "compile_kernels"]


@dataclass(frozen=True, kw_only=True)
class LossTerms:
    """One block's share of the objective, at the factors it just solved.

    Attributes
    ----------
    observed : float
        The objective's sum over the block's observed pairs (see :mod:`blockals.objectives`).
    sq_err : float
        Squared training error over the block's ratings.
    penalty : float
        The regularization of the block's factors, λ included.
    gram : ndarray of shape (rank, rank) or None
        ``X_b^T X_b`` of the block's factors, for modes with a term over all pairs.
    """

    observed: float
    sq_err: float
    penalty: float
    gram: np.ndarray | None


@dataclass(frozen=True, kw_only=True)
class SolvedBlock:
    """A destination block's new factor block (rows in local order) and its loss terms."""

    factors: np.ndarray
    terms: LossTerms


def gram(factors: np.ndarray, rank: int) -> np.ndarray:
    """``F^T F`` of a factor block's first ``rank`` columns, in float64."""
    F = factors[:, :rank].astype(np.float64)
    return F.T @ F


def routed_rows(
    inblock: InBlock, messages: Sequence[np.ndarray], whole: np.ndarray, width: int, dtype: str,
) -> np.ndarray:
    """The rows a block's in-block points at (``inblock.col``): its out-blocks laid end to end
    in source-block order.

    ``messages`` holds one array per source block that sends anything (in block order):
    ``Y_j[out(j -> b)]``, or, where ``whole[j]`` (:func:`blockals.routing.ship_whole`), the
    whole factor block ``Y_j``, from which its out-block is cut here.
    """
    M = np.empty((int(inblock.need_ptr[-1]), width), dtype=dtype)
    senders = np.flatnonzero(np.diff(inblock.need_ptr) > 0)
    for j, message in zip(senders, messages, strict=True):
        part = M[inblock.need_ptr[j] : inblock.need_ptr[j + 1]]
        if whole[j]:
            np.take(message, inblock.out_block(j), axis=0, out=part)
        else:
            part[...] = message
    return M


def solve_block(
    inblock: InBlock,
    M: np.ndarray,
    objective: Objective,
    config: ALSConfig,
    *,
    G: np.ndarray | None = None,
    previous: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> SolvedBlock:
    """Solve every row of one destination block against fixed routed rows.

    Parameters
    ----------
    inblock : InBlock
        The block's ratings; ``inblock.col`` indexes rows of ``M``.
    M : ndarray of shape (m, objective.width)
        The routed factor rows of the other side (:func:`routed_rows`).
    objective : Objective
        What the mode minimizes (``config.objective(global_mean)``).
    config : ALSConfig
        Solver, CG steps, nonnegativity and factor precision.
    G : ndarray, optional
        ``Y^T Y`` of the whole other side, for modes with a term over all pairs.
    previous : ndarray of shape (n_rows, >= width), optional
        The rows' previous values: CG and NNLS start from them (zeros otherwise).
    weights : ndarray of shape (n_rows,), optional
        The rows' WALS weights (``R`` or ``C``), or None for the mode's default.

    Returns
    -------
    SolvedBlock
        The factor block (``objective.width`` columns, ``config.dtype``) and its loss terms.
    """
    sys = objective.systems(inblock, M, G, weights)
    x0 = np.zeros((inblock.n_rows, sys.width)) if previous is None else previous[:, : sys.width]
    solution = kernels.solve(sys, x0, objective.rank, config.solver, config.cg_steps, config.nonnegative, loss=True)
    factors = objective.finish(solution.X.astype(config.dtype), inblock, weights)
    terms = LossTerms(
        observed=solution.observed,
        sq_err=solution.sq_err,
        penalty=objective.penalty(factors, inblock),
        gram=gram(factors, objective.rank) if objective.gram_weight else None,
    )
    return SolvedBlock(factors=factors, terms=terms)


def compile_kernels(objective: Objective, config: ALSConfig) -> float:
    """Compile (or load from numba's cache) the kernels a configuration's solves use, by
    solving a block of two rows the way :func:`solve_block` does; returns the seconds taken.

    A fresh installation compiles them once (several seconds, which the first iteration
    would otherwise spend); numba keeps the code beside the module, and later runs load it.
    """
    t = time.perf_counter()
    inblock = build_inblock(np.array([0, 0, 1]), np.zeros(3, dtype=int), np.array([0, 1, 1]),
                            np.array([1.0, -1.0, 2.0], dtype=np.float32), 2, 1)
    M = routed_rows(inblock, [np.ones((2, objective.width), dtype=config.dtype)], np.array([True]), objective.width,
                    config.dtype)
    G = np.eye(objective.rank) if objective.gram_weight else None
    weights = objective.side_weights("users", inblock, np.ones(inblock.n_rows))  # the type of any mode's weights
    sys = objective.systems(inblock, M, G, weights)
    kernels.compile_for(sys, config.solver, config.nonnegative)
    solve_block(inblock, M, objective, config, G=G, previous=np.zeros((2, objective.width), dtype=config.dtype),
                weights=weights)
    return time.perf_counter() - t
