"""Validated training configuration shared by the estimator, the engine and the kernels."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from blockals.errors import InputError

__all__ = ["ALSConfig", "parse_int", "parse_float", "parse_choice"]

REG_SCALINGS = ("count", "none")
SOLVERS = ("cholesky",)
DTYPES = ("float32", "float64")


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
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value


@dataclass(frozen=True)
class ALSConfig:
    """Everything that determines the factors an ALS run produces.

    Two runs with equal configs on the same store give the same factors, whatever the
    cluster; :meth:`fingerprint` names their checkpoints.
    """

    rank: int
    reg: float
    reg_scaling: str
    solver: str
    seed: int
    dtype: str

    @classmethod
    def parse(cls, **params: Any) -> ALSConfig:
        return cls(
            rank=parse_int(params["rank"], "rank", 1),
            reg=parse_float(params["reg"], "reg"),
            reg_scaling=parse_choice(params["reg_scaling"], "reg_scaling", REG_SCALINGS),
            solver=parse_choice(params["solver"], "solver", SOLVERS),
            seed=parse_int(params["seed"], "seed", 0),
            dtype=parse_choice(params["dtype"], "dtype", DTYPES),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        import hashlib
        import json

        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
