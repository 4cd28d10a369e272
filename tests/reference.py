"""Dense NumPy reference implementations, independent of blockals' block code."""

from __future__ import annotations

import numpy as np


def dense_explicit_als(R, M, X0, n_iter, reg, reg_scaling="count"):
    """Plain ALS over a dense rating matrix R with mask M: one ridge solve per row.

    Solves items first, then users, each row from its own observed entries.
    """
    X = X0.astype(np.float64).copy()
    Y = np.zeros((R.shape[1], X.shape[1]))
    k = X.shape[1]

    def solve_rows(R, M, F):
        out = np.zeros((R.shape[0], k))
        for r in range(R.shape[0]):
            obs = np.flatnonzero(M[r])
            if obs.size == 0:
                continue
            w = obs.size if reg_scaling == "count" else 1.0
            A = F[obs].T @ F[obs] + reg * w * np.eye(k)
            out[r] = np.linalg.solve(A, F[obs].T @ R[r, obs])
        return out

    for _ in range(n_iter):
        Y = solve_rows(R.T, M.T, X)
        X = solve_rows(R, M, Y)
    return X, Y


def explicit_objective(R, M, X, Y, reg, reg_scaling="count"):
    """sum over observed (r - x.y)^2 + reg * (sum w_u |x_u|^2 + sum w_i |y_i|^2)."""
    X = X.astype(np.float64)
    Y = Y.astype(np.float64)
    E = np.where(M, R - X @ Y.T, 0.0)
    wu = M.sum(1) if reg_scaling == "count" else np.ones(M.shape[0])
    wi = M.sum(0) if reg_scaling == "count" else np.ones(M.shape[1])
    return float((E**2).sum() + reg * (wu @ (X**2).sum(1) + wi @ (Y**2).sum(1)))
