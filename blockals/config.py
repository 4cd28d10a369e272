"""Validated training configuration shared by the estimator, the engine and the kernels."""

from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from blockals.errors import InputError
from blockals.objectives import WALS, Biased, Implicit, Objective

__all__ = ["ALSConfig", "parse_int", "parse_float", "parse_choice", "parse_weights"]

REG_SCALINGS = ("count", "none")
SOLVERS = ("cholesky", "cg")
DTYPES = ("float32", "float64")
WEIGHTINGS = ("none", "wals")
INITS = ("normal", "uniform")


def parse_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise InputError(f"{name} must be at least {minimum}, got {value}.")
    return int(value)


def parse_float(value: Any, name: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}.")
    if value < minimum:
        raise InputError(f"{name} must be at least {minimum:g}, got {value:g}.")
    return float(value)


def parse_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value


def parse_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def parse_weights(value: Any, name: str) -> str | float:
    """``"counts"``, a nonnegative number, or ``"array"`` for per-row weights given as an array."""
    if isinstance(value, str):
        if value != "counts":
            raise InputError(f"{name} must be 'counts', a number or an array of per-row weights; got {value!r}.")
        return value
    if np.ndim(value) == 0:
        return parse_float(value, name)
    arr = np.asarray(value, dtype=np.float64)
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise InputError(f"{name} must hold finite nonnegative weights.")
    return "array"


def digest(arrays: dict[str, np.ndarray]) -> str:
    """A short hash of user-given arrays, so checkpoints of different inputs never mix."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()[:16] if arrays else ""


@dataclass(frozen=True)
class ALSConfig:
    """Everything that determines the factors an ALS run produces.

    Two runs with equal configs on the same store give the same factors, whatever the
    cluster; :meth:`fingerprint` names their checkpoints. User-given arrays (initial
    factors, WALS weights) enter through ``arrays_digest``.
    """

    rank: int
    reg: float
    reg_scaling: str
    implicit: bool
    alpha: float
    biases: bool
    bias_reg: float
    weighting: str
    unobserved_weight: float
    row_weights: str | float
    col_weights: str | float
    nonnegative: bool
    solver: str
    cg_steps: int
    init: str
    seed: int
    dtype: str
    arrays_digest: str = ""

    @classmethod
    def parse(cls, **p: Any) -> ALSConfig:
        reg = parse_float(p["reg"], "reg")
        config = cls(
            rank=parse_int(p["rank"], "rank", 1),
            reg=reg,
            reg_scaling=parse_choice(p["reg_scaling"], "reg_scaling", REG_SCALINGS),
            implicit=parse_bool(p.get("implicit", False), "implicit"),
            alpha=parse_float(p.get("alpha", 1.0), "alpha"),
            biases=parse_bool(p.get("biases", False), "biases"),
            bias_reg=reg if p.get("bias_reg") is None else parse_float(p["bias_reg"], "bias_reg"),
            weighting=parse_choice(p.get("weighting", "none"), "weighting", WEIGHTINGS),
            unobserved_weight=parse_float(p.get("unobserved_weight", 0.1), "unobserved_weight"),
            row_weights=parse_weights(p.get("row_weights", "counts"), "row_weights"),
            col_weights=parse_weights(p.get("col_weights", "counts"), "col_weights"),
            nonnegative=parse_bool(p.get("nonnegative", False), "nonnegative"),
            solver=parse_choice(p["solver"], "solver", SOLVERS),
            cg_steps=parse_int(p.get("cg_steps", 3), "cg_steps", 1),
            init=p.get("init", "normal") if isinstance(p.get("init", "normal"), str) else "array",
            seed=parse_int(p["seed"], "seed", 0),
            dtype=parse_choice(p["dtype"], "dtype", DTYPES),
            arrays_digest=p.get("arrays_digest", ""),
        )
        if config.init != "array":
            parse_choice(config.init, "init", INITS)
        if config.biases and config.implicit:
            raise InputError("biases=True applies to explicit feedback; it cannot be combined with implicit=True.")
        if config.weighting == "wals" and (config.implicit or config.biases):
            raise InputError("weighting='wals' is its own objective; it cannot be combined with implicit or biases.")
        if config.nonnegative and config.solver == "cg":
            raise InputError("nonnegative=True solves each row exactly; use solver='cholesky' with it.")
        return config

    @property
    def mode(self) -> str:
        if self.implicit:
            return "implicit"
        if self.weighting == "wals":
            return "wals"
        return "biased" if self.biases else "explicit"

    @property
    def warm_start(self) -> bool:
        """Whether a solve starts from the previous factors of its own rows."""
        return self.solver == "cg" or self.nonnegative

    def objective(self, global_mean: float) -> Objective:
        base = {"rank": self.rank, "reg": self.reg, "reg_scaling": self.reg_scaling}
        if self.mode == "implicit":
            return Implicit(**base, alpha=self.alpha)
        if self.mode == "wals":
            return WALS(**base, unobserved_weight=self.unobserved_weight, row_weights=self.row_weights, col_weights=self.col_weights)
        if self.mode == "biased":
            return Biased(**base, mu=global_mean, bias_reg=self.bias_reg)
        return Objective(**base)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
