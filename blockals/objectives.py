"""What each ALS mode minimizes, and how one half-step of it becomes row systems.

Notation: ``x_u`` user factors, ``y_i`` item factors, ``Omega`` the observed pairs, ``s_ui``
the model's prediction for (u, i), ``w_u`` a row's regularization weight: its number of
ratings (``reg_scaling="count"``; positive ratings in implicit mode, as Spark counts
them) or 1 (``"none"``).

=============  ===========================================================================
mode           objective
=============  ===========================================================================
explicit       sum_Omega (r - x.y)^2 + reg (sum_u w_u |x_u|^2 + sum_i w_i |y_i|^2)
biased         sum_Omega (r - mu - b_u - b_i - x.y)^2
               + sum_u w_u (reg |x_u|^2 + bias_reg b_u^2) + (same for items)
implicit       sum_{all u,i} c_ui (p_ui - x.y)^2 + reg (sum_u w_u |x_u|^2 + ...),
               c = 1 + alpha |r| on Omega and 1 elsewhere, p = [r > 0]
wals           sum_{all u,i} W_ui (A_ui - x.y)^2 + reg (sum_u w_u |x_u|^2 + ...),
               W = w0 + R_u C_i on Omega and w0 elsewhere, A = r on Omega and 0 elsewhere
=============  ===========================================================================

Sums over all pairs never touch the unobserved ones: they split into a Gram part,
``sum_{all} s_ui^2 = trace(X^T X Y^T Y)``, and a correction over ``Omega``. The same split
gives each row's system the shared term ``G = g Y^T Y``.

Each objective turns the routed factor rows ``M`` (messages concatenated, one row per
source row the block needs) and the block's ratings into :class:`~blockals.kernels.RowSystems`.
Those also carry what the loss needs: every mode's sum over the observed pairs has the form
``sum (a s^2 - 2 beta s + gamma)`` at predictions ``s`` (explicit: ``gamma = r^2``; biased:
the target ``t = r - mu - b_i`` in place of ``r``; implicit: ``a = c - 1``, ``beta = gamma =
c p``; WALS: ``a = R C``, ``beta = (w0 + a) r``, ``gamma = beta r``), so a solve reports its
block's share of the objective from the rows it has already gathered. A factor block may carry one column after
the ``rank`` factors: the learned bias (biased mode) or the fixed WALS row weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from blockals.kernels import RowSystems
from blockals.routing import InBlock

__all__ = ["Objective", "Explicit", "Biased", "Implicit", "WALS"]


@dataclass(frozen=True)
class Objective:
    """Explicit ALS: ``sum_Omega (r - x.y)^2 + reg * sum w |x|^2`` (Spark's with ``"count"``).

    The base class is the explicit mode; the others override what differs.
    """

    rank: int
    reg: float
    reg_scaling: str

    #: Columns a factor block carries after the factors.
    extra: ClassVar[int] = 0

    @property
    def gram_weight(self) -> float:
        """Coefficient ``g`` of the all-pairs term ``g * trace(X^T X Y^T Y)``."""
        return 0.0

    @property
    def width(self) -> int:
        return self.rank + self.extra

    def reg_counts(self, inblock: InBlock) -> np.ndarray:
        """Per-row count that ``reg_scaling="count"`` multiplies λ by."""
        return inblock.counts

    def reg_weights(self, inblock: InBlock) -> np.ndarray:
        if self.reg_scaling == "count":
            return self.reg_counts(inblock).astype(np.float64)
        return np.ones(inblock.n_rows)

    def ridge(self, inblock: InBlock) -> np.ndarray:
        """Ridge diagonal of each row's system, shape (n_rows, width)."""
        return np.repeat((self.reg * self.reg_weights(inblock))[:, None], self.rank, axis=1)

    # -- one half-step ---------------------------------------------------------------
    def systems(self, inblock: InBlock, M: np.ndarray, G: np.ndarray | None, weights: np.ndarray | None) -> RowSystems:
        r = inblock.rating  # float32, widened in the loops: no nnz-long copy
        return RowSystems(inblock=inblock, D=M[:, : self.rank], col=inblock.col, beta=r, a=None, G=None,
                          reg=self.ridge(inblock), gamma=None, tau=r)

    def finish(self, X: np.ndarray, inblock: InBlock, weights: np.ndarray | None) -> np.ndarray:
        """The factor block to keep, from the systems' solution."""
        return X

    def initial(self, factors: np.ndarray, inblock: InBlock, weights: np.ndarray | None) -> np.ndarray:
        """A factor block from initial factors (adds the carried column, if any)."""
        return factors

    def side_weights(self, side: str, inblock: InBlock, given: np.ndarray | None) -> np.ndarray | None:
        """Per-row weights a mode needs besides the ratings (WALS's R or C)."""
        return None

    def shared(self, G: np.ndarray | None) -> np.ndarray | None:
        """The term every row's matrix shares, from the other side's Gram ``Y^T Y``."""
        return None if G is None or not self.gram_weight else self.gram_weight * G

    # -- the loss ----------------------------------------------------------------------
    def penalty(self, X: np.ndarray, inblock: InBlock) -> float:
        """The regularization of one factor block (λ included)."""
        k = self.rank
        norms = np.einsum("ij,ij->i", X[:, :k].astype(np.float64), X[:, :k].astype(np.float64))
        return float(self.reg * (self.reg_weights(inblock) @ norms))


Explicit = Objective


@dataclass(frozen=True)
class Biased(Objective):
    """Explicit ALS with learned biases around a fixed global mean ``mu``.

    Factor blocks carry the bias as their last column. Solving users, each design row is
    ``[y_i, 1]`` and each target ``r - mu - b_i``, so ``[x_u, b_u]`` comes out of one ridge
    system whose diagonal is ``reg * w_u`` on the factors and ``bias_reg * w_u`` on the bias.
    """

    mu: float = 0.0
    bias_reg: float = 0.0
    extra: ClassVar[int] = 1

    def ridge(self, inblock: InBlock) -> np.ndarray:
        w = self.reg_weights(inblock)[:, None]
        return np.hstack([np.repeat(self.reg * w, self.rank, axis=1), self.bias_reg * w])

    def systems(self, inblock, M, G, weights):
        k = self.rank
        D = np.hstack([M[:, :k], np.ones((M.shape[0], 1), dtype=M.dtype)])
        col = inblock.col
        # float64 first: float32 ratings minus a Python float would stay float32 and round mu.
        beta = inblock.rating.astype(np.float64) - self.mu - M[col, k]
        return RowSystems(inblock=inblock, D=D, col=col, beta=beta, a=None, G=None, reg=self.ridge(inblock),
                          gamma=None, tau=beta)

    def initial(self, factors, inblock, weights):
        return np.hstack([factors, np.zeros((factors.shape[0], 1), dtype=factors.dtype)])

    def penalty(self, X, inblock):
        k = self.rank
        b = X[:, k].astype(np.float64)
        return super().penalty(X, inblock) + float(self.bias_reg * (self.reg_weights(inblock) @ (b * b)))


@dataclass(frozen=True)
class Implicit(Objective):
    """Hu, Koren and Volinsky (2008), as Spark implements it.

    Confidence ``c = 1 + alpha |r|`` and preference ``p = [r > 0]`` on observed pairs;
    every other pair has ``c = 1, p = 0``. A row's system is
    ``(Y^T Y + sum_Omega (c - 1) y y^T + reg w I) x = sum_Omega c p y``.
    """

    alpha: float = 1.0

    @property
    def gram_weight(self) -> float:
        return 1.0

    def reg_counts(self, inblock):
        return np.bincount(inblock.row[inblock.rating > 0], minlength=inblock.n_rows)

    def systems(self, inblock, M, G, weights):
        r = inblock.rating.astype(np.float64)
        a = self.alpha * np.abs(r)
        beta = np.where(r > 0, 1.0 + a, 0.0)
        return RowSystems(inblock=inblock, D=M[:, : self.rank], col=inblock.col, beta=beta, a=a, G=self.shared(G),
                          reg=self.ridge(inblock), gamma=beta, tau=(r > 0) * 1.0)


@dataclass(frozen=True)
class WALS(Objective):
    """Weighted ALS as TensorFlow formulated it.

    ``W = w0 + R_u C_i`` on observed pairs and ``w0`` elsewhere. Factor blocks carry each
    row's weight (``R`` for users, ``C`` for items) as their last column, so routed
    messages bring the source rows' weights along. A row's system is
    ``(w0 Y^T Y + sum_Omega R_u C_i y y^T + reg w I) x = sum_Omega (w0 + R_u C_i) r y``.
    """

    unobserved_weight: float = 0.1
    row_weights: str | float = "counts"
    col_weights: str | float = "counts"
    extra: ClassVar[int] = 1

    @property
    def gram_weight(self) -> float:
        return self.unobserved_weight

    def side_weights(self, side, inblock, given):
        spec = self.row_weights if side == "users" else self.col_weights
        if given is not None:
            return np.asarray(given, dtype=np.float64)
        if spec == "counts":
            return inblock.counts.astype(np.float64)
        return np.full(inblock.n_rows, float(spec))

    def systems(self, inblock, M, G, weights):
        k = self.rank
        col = inblock.col
        a = weights[inblock.row] * M[col, k].astype(np.float64)
        r = inblock.rating.astype(np.float64)
        beta = (self.unobserved_weight + a) * r
        return RowSystems(inblock=inblock, D=M[:, :k], col=col, beta=beta, a=a, G=self.shared(G), reg=self.ridge(inblock),
                          gamma=beta * r, tau=r)

    def finish(self, X, inblock, weights):
        return np.hstack([X, weights[:, None].astype(X.dtype)])

    def initial(self, factors, inblock, weights):
        return self.finish(factors, inblock, weights)
