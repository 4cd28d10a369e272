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


def weights_and_targets(R, M, mode, alpha=1.0, w0=0.1, row_w=None, col_w=None):
    """The dense weight matrix W and target T of a mode's objective sum W (T - X Y^T)^2."""
    if mode == "explicit":
        return M.astype(float), R
    if mode == "implicit":
        return np.where(M, 1 + alpha * np.abs(R), 1.0), (M & (R > 0)).astype(float)
    if mode == "wals":
        row_w = M.sum(1) if row_w is None else row_w
        col_w = M.sum(0) if col_w is None else col_w
        return np.where(M, w0 + np.outer(row_w, col_w), w0), np.where(M, R, 0.0)
    raise ValueError(mode)


def reg_counts(R, M, mode, reg_scaling):
    """Per-user and per-item multipliers of λ."""
    if reg_scaling == "none":
        return np.ones(M.shape[0]), np.ones(M.shape[1])
    counted = M & (R > 0) if mode == "implicit" else M
    return counted.sum(1).astype(float), counted.sum(0).astype(float)


def dense_weighted_als(W, T, X0, n_iter, reg, wu, wi):
    """ALS on sum W (T - X Y^T)^2 + reg (sum wu |x|^2 + sum wi |y|^2), items first.

    Returns the factors after every half-step: [(X0, Y1), (X1, Y1), (X1, Y2), ...].
    """
    k = X0.shape[1]
    X = X0.astype(float).copy()

    def solve(W, T, F, w):
        out = np.zeros((W.shape[0], k))
        for r in range(W.shape[0]):
            A = F.T @ (W[r][:, None] * F) + reg * w[r] * np.eye(k)
            rhs = F.T @ (W[r] * T[r])
            out[r] = np.linalg.lstsq(A, rhs, rcond=None)[0]
        return out

    for _ in range(n_iter):
        Y = solve(W.T, T.T, X, wi)
        X = solve(W, T, Y, wu)
    return X, Y


def weighted_objective(W, T, X, Y, reg, wu, wi):
    return float((W * (T - X @ Y.T) ** 2).sum() + reg * (wu @ (X**2).sum(1) + wi @ (Y**2).sum(1)))


def dense_biased_als(R, M, X0, n_iter, reg, bias_reg, wu, wi):
    """ALS on sum_M (r - mu - b_u - b_i - x.y)^2 + sum w (reg |x|^2 + bias_reg b^2), items first."""
    mu = R[M].mean()
    k = X0.shape[1]
    X, bu = X0.astype(float).copy(), np.zeros(M.shape[0])
    Y, bi = np.zeros((M.shape[1], k)), np.zeros(M.shape[1])

    def solve(R, M, F, b_other, w):
        out, bias = np.zeros((R.shape[0], k)), np.zeros(R.shape[0])
        for r in range(R.shape[0]):
            obs = np.flatnonzero(M[r])
            if obs.size == 0:
                continue
            D = np.hstack([F[obs], np.ones((obs.size, 1))])
            A = D.T @ D + np.diag([reg * w[r]] * k + [bias_reg * w[r]])
            z = np.linalg.solve(A, D.T @ (R[r, obs] - mu - b_other[obs]))
            out[r], bias[r] = z[:k], z[k]
        return out, bias

    for _ in range(n_iter):
        Y, bi = solve(R.T, M.T, X, bu, wi)
        X, bu = solve(R, M, Y, bi, wu)
    return X, Y, bu, bi, mu


def biased_objective(R, M, X, Y, bu, bi, mu, reg, bias_reg, wu, wi):
    E = np.where(M, R - mu - bu[:, None] - bi[None, :] - X @ Y.T, 0.0)
    return float(
        (E**2).sum() + wu @ (reg * (X**2).sum(1) + bias_reg * bu**2) + wi @ (reg * (Y**2).sum(1) + bias_reg * bi**2)
    )
