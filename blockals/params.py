"""Every parameter of :class:`blockals.ALS`, declared once.

:data:`PARAMS` is the table: name, default, allowed values, one line of help. Everything
else is derived from it: the estimator's signature and the *Parameters* section of its
docstring (:func:`make_init`, :func:`numpydoc`), validation (:func:`parse_params`, one
sentence per refusal, before any data is read or a cluster started), the frozen
:class:`ALSConfig` the engine runs, the command line's options (:func:`add_arguments`)
and the pipeline's YAML keys (:func:`check_keys`). The other inputs of the command line
and the pipeline (log level, scheduler address, output paths, the memory a rank needs)
and a saved model's recorded parameters are checked here too, with the same sentences.

A parameter either determines the factors (it is in :class:`ALSConfig`, whose
fingerprint names checkpoints) or only how a run goes (``max_iter``,
``checkpoint_interval``, ``checkpoint_seconds``, ``verbose``: a run resumed with more iterations continues the
same checkpoint).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import inspect
import json
import numbers
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, make_dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from blockals.errors import InputError, StoreError

if TYPE_CHECKING:  # the command line imports this table; the solvers load only when a config makes an objective
    from blockals.objectives import Objective

__all__ = [
    "PARAMS",
    "Param",
    "ALSConfig",
    "RunParams",
    "parse_params",
    "parse_int",
    "parse_float",
    "parse_choice",
    "parse_bool",
    "parse_verbose",
    "make_init",
    "numpydoc",
    "add_arguments",
    "check_keys",
    "parse_log_level",
    "parse_address",
    "parse_dashboard_address",
    "parse_output_path",
    "check_solve_memory",
    "parse_saved_params",
]


# -- validators: one sentence naming the parameter -------------------------------------


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


def _parse_weights(value: Any, name: str) -> str | float:
    """``"counts"``, a nonnegative number, or ``"array"`` for per-row weights given as an array."""
    if isinstance(value, str):
        if value != "counts":
            raise InputError(f"{name} must be 'counts', a number or an array of per-row weights; got {value!r}.")
        return value
    if np.ndim(value) == 0:
        return parse_float(value, name)
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 1 or not np.isfinite(arr).all() or (arr < 0).any():
        raise InputError(f"{name} must hold one finite nonnegative weight per row.")
    return "array"


def _parse_init(value: Any, name: str) -> str:
    """``"normal"``, ``"uniform"``, or ``"array"`` for given factors (checked against the store in fit)."""
    if isinstance(value, str):
        return parse_choice(value, name, ("normal", "uniform"))
    return "array"


def parse_verbose(value: Any, name: str) -> int:
    """A level of output: a non-negative integer, or a bool (True is 1)."""
    return int(value) if isinstance(value, bool) else parse_int(value, name, 0)


# -- the command line's and the pipeline's other inputs, checked before any work ---------

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Dask's comm protocols a client can dial; host is a name, an IPv4 address or a bracketed IPv6 one.
ADDRESS_SCHEMES = ("tcp", "tls", "ucx", "ws", "wss")
_ADDRESS = re.compile(r"(?:(?P<scheme>[A-Za-z]+)://)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]@]+):(?P<port>[0-9]+)")


def parse_log_level(value: Any, name: str) -> str:
    """A :mod:`logging` level name, in any case."""
    if not isinstance(value, str) or value.upper() not in LOG_LEVELS:
        raise InputError(f"{name} must be one of {', '.join(LOG_LEVELS)}; got {value!r}.")
    return value.upper()


def parse_address(value: Any, name: str) -> str:
    """A scheduler address ``[protocol://]host:port``, as Dask's ``Client`` dials it:
    refused here, naming the option, rather than by Dask's parser or its connect timeout."""
    match = _ADDRESS.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise InputError(f"{name} must be an address of the form host:port or tcp://host:port, got {value!r}.")
    if match["scheme"] and match["scheme"] not in ADDRESS_SCHEMES:
        raise InputError(f"{name} has the protocol {match['scheme']!r}; use one of "
                         f"{', '.join(s + '://' for s in ADDRESS_SCHEMES)}.")
    if not 0 < int(match["port"]) < 65536:
        raise InputError(f"{name} has the port {match['port']}, which is not between 1 and 65535.")
    return value


def parse_dashboard_address(value: Any, name: str) -> str:
    """Where a dashboard listens, ``[host]:port`` (port 0: any free one). Refused here
    because distributed, given a bad one, serves the dashboard on a random port of every
    interface instead, with a warning."""
    match = _ADDRESS.fullmatch(value) if isinstance(value, str) else None
    if match is None and isinstance(value, str) and value.startswith(":"):  # ":8787", every interface
        match = _ADDRESS.fullmatch("0.0.0.0" + value)
    if match is None or match["scheme"]:
        raise InputError(f"{name} must be host:port (e.g. 127.0.0.1:8787, or :0 for any free port), got {value!r}.")
    if not 0 <= int(match["port"]) < 65536:
        raise InputError(f"{name} has the port {match['port']}, which is not between 0 and 65535.")
    return value


def parse_output_path(value: Any, name: str, kind: str = "file") -> str:
    """A local path a run will write (``kind``: ``"file"``, or ``"directory"`` for a store,
    whose missing parents are made), checked before the run so that its output is not lost
    at the end; fsspec URLs are taken as given (their writers check them)."""
    path = os.fspath(value)
    if "://" in path:
        return path
    if kind == "file" and os.path.isdir(path):
        raise InputError(f"{name} {path} is a directory; give the path of a file to write.")
    parent = os.path.dirname(os.path.abspath(path))
    while kind == "directory" and not os.path.exists(parent):  # a store's missing directories are made
        parent = os.path.dirname(parent)
    if not os.path.exists(parent):
        raise InputError(f"{name} {path} cannot be written: the directory {parent} does not exist.")
    if not os.path.isdir(parent):
        raise InputError(f"{name} {path} cannot be written: {parent} is a file, not a directory.")
    try:  # a probe, not os.access, which root passes for read-only mounts and /proc alike
        fd, probe = tempfile.mkstemp(prefix=".blockals-probe-", dir=parent)
    except OSError as exc:
        raise InputError(f"{name} {path} cannot be written: {parent} is not writable ({exc.strerror}).") from None
    os.close(fd)
    os.unlink(probe)
    return path


def check_solve_memory(rank: int, width: int, itemsize: int, rows: int, limit: int, where: str) -> None:
    """Refuse a ``rank`` whose block solve cannot fit in ``limit`` bytes (``where`` names them).

    A lower bound of what one solve holds: its ``rows`` factor rows of ``width`` columns in
    and out, and three float64 ``width x width`` matrices (a row's normal equations, their
    factorization, the other side's Gram matrix).
    """
    need = 3 * 8 * width**2 + 2 * itemsize * width * rows
    if need > limit:
        raise InputError(
            f"rank={rank} needs at least {need / 2**30:,.1f} GiB for one block's solve ({width}x{width} float64 "
            f"systems{f' and {rows:,} factor rows' if rows else ''}), more than {where} ({limit / 2**30:,.1f} GiB); "
            f"lower rank."
        )


# -- the table ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Param:
    """One parameter of :class:`blockals.ALS`.

    Attributes
    ----------
    name, default, help :
        Its name, default and one line of help (docstring and ``--help``).
    kind :
        How the docstring names its type.
    parse :
        ``parse(value, name)`` returns the validated value or raises :class:`InputError`.
    choices :
        The allowed strings of a choice (offered by the command line).
    config :
        Whether it determines the factors (a field of :class:`ALSConfig`) rather than the run.
    positional :
        Whether ``ALS(...)`` takes it by position (the first ten, as before keywords were required).
    cli :
        How the command line takes it: ``"value"``, ``"flag"`` (a bool switch) or None (not offered).
    """

    name: str
    default: Any
    help: str
    kind: str
    parse: Callable[[Any, str], Any]
    choices: tuple[str, ...] = ()
    config: bool = True
    positional: bool = False
    cli: str | None = "value"


def _int(minimum: int) -> Callable[[Any, str], int]:
    return lambda value, name: parse_int(value, name, minimum)


def _choice(*choices: str) -> Callable[[Any, str], str]:
    return lambda value, name: parse_choice(value, name, choices)


def _optional_float(value: Any, name: str) -> float | None:
    return None if value is None else parse_float(value, name)


def _optional_int(minimum: int) -> Callable[[Any, str], int | None]:
    return lambda value, name: None if value is None else parse_int(value, name, minimum)


def _positive_float(value: Any, name: str) -> float:
    value = parse_float(value, name)
    if value <= 0:
        raise InputError(f"{name} must be greater than 0, got {value:g}.")
    return value


PARAMS: tuple[Param, ...] = (
    Param(name="rank", default=10, kind="int", parse=_int(1), positional=True,
          help="Number of latent factors."),
    Param(name="max_iter", default=10, kind="int", parse=_int(1), positional=True, config=False,
          help="Iterations; each solves all item factors, then all user factors (Spark's order)."),
    Param(name="reg", default=0.1, kind="float", parse=parse_float, positional=True,
          help="λ, the regularization strength."),
    Param(name="reg_scaling", default="count", kind='{"count", "none"}', parse=_choice("count", "none"),
          choices=("count", "none"), positional=True,
          help="Multiply λ by each row's rating count (positive ratings in implicit mode), as Spark does, or not."),
    Param(name="implicit", default=False, kind="bool", parse=parse_bool, positional=True, cli="flag",
          help="Implicit feedback (Hu, Koren, Volinsky): confidence 1 + alpha |r|, preference [r > 0], over all pairs."),
    Param(name="alpha", default=1.0, kind="float", parse=parse_float, positional=True,
          help="Confidence scale of implicit feedback."),
    Param(name="biases", default=False, kind="bool", parse=parse_bool, positional=True, cli="flag",
          help="Learn user and item biases around the fixed global mean (explicit only)."),
    Param(name="nonnegative", default=False, kind="bool", parse=parse_bool, positional=True, cli="flag",
          help="Constrain factors to be nonnegative (per-row NNLS); biases stay free."),
    Param(name="solver", default="cholesky", kind='{"cholesky", "cg"}', parse=_choice("cholesky", "cg"),
          choices=("cholesky", "cg"), positional=True,
          help="Exact solve of each row's normal equations, or cg_steps conjugate-gradient steps warm-started "
               "at the previous factors."),
    Param(name="seed", default=0, kind="int", parse=_int(0), positional=True,
          help="Seeds the initial factors; each row's draw depends only on (seed, row), not on block or worker counts."),
    Param(name="bias_reg", default=None, kind="float or None", parse=_optional_float,
          help="λ of the biases (None: reg)."),
    Param(name="weighting", default="none", kind='{"none", "wals"}', parse=_choice("none", "wals"),
          choices=("none", "wals"),
          help="'wals': TensorFlow's weighted ALS over all pairs, weight w0 off the data and w0 + R_u C_i on it."),
    Param(name="unobserved_weight", default=0.1, kind="float", parse=parse_float,
          help="w0 of WALS."),
    Param(name="row_weights", default="counts", kind='"counts", float or array', parse=_parse_weights,
          help="R of WALS: each user's rating count, a constant, or one weight per user in the store's id order."),
    Param(name="col_weights", default="counts", kind='"counts", float or array', parse=_parse_weights,
          help="C of WALS: each item's rating count, a constant, or one weight per item in the store's id order."),
    Param(name="cg_steps", default=3, kind="int", parse=_int(1),
          help="Conjugate-gradient steps per half-step (solver='cg')."),
    Param(name="init", default="normal", kind='"normal", "uniform", array or (array, array)', parse=_parse_init,
          choices=("normal", "uniform"),
          help="Initial factors: unit-norm Gaussian rows (Spark), U(0, 0.01) (implicit), or given user "
               "(and item) factors in the store's id order."),
    Param(name="dtype", default="float32", kind='{"float32", "float64"}', parse=_choice("float32", "float64"),
          choices=("float32", "float64"),
          help="Precision of the factors and of the messages routed between blocks."),
    Param(name="checkpoint_interval", default=None, kind="int or None", parse=_optional_int(0), config=False,
          help="Checkpoint every this many iterations (and after the last); None: once checkpoint_seconds have "
               "passed since the last checkpoint (and after the last iteration); 0 disables checkpoints and resume."),
    Param(name="checkpoint_seconds", default=60.0, kind="float", parse=_positive_float, config=False,
          help="With checkpoint_interval=None, the training time a failure may lose: a checkpoint is written "
               "after the first iteration that ends this many seconds after the last one."),
    Param(name="verbose", default=0, kind="int", parse=parse_verbose, config=False, cli=None,
          help="1: one line per iteration; 2: also progress over each iteration's blocks on standard error "
               "(a bar on a terminal, a line per quarter otherwise)."),
)
BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}


# -- the engine's frozen configuration ---------------------------------------------------


def _digest(arrays: dict[str, np.ndarray]) -> str:
    """A short hash of user-given arrays, so checkpoints of different inputs never mix."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()[:16] if arrays else ""


class _ConfigMethods:
    """What :class:`ALSConfig` derives from its fields."""

    @property
    def mode(self) -> str:
        if self.implicit:
            return "implicit"
        if self.weighting == "wals":
            return "wals"
        return "biased" if self.biases else "explicit"

    @property
    def carried(self) -> str | None:
        """The column a factor block carries after the factors, named as the model's
        attribute (``user_bias``, ``user_weights``), or None."""
        return {"biased": "bias", "wals": "weights"}.get(self.mode)

    @property
    def warm_start(self) -> bool:
        """Whether a solve starts from the previous factors of its own rows."""
        return self.solver == "cg" or self.nonnegative

    def objective(self, global_mean: float) -> Objective:
        from blockals.objectives import WALS, Biased, Implicit, Objective

        base = {"rank": self.rank, "reg": self.reg, "reg_scaling": self.reg_scaling}
        if self.mode == "implicit":
            return Implicit(**base, alpha=self.alpha)
        if self.mode == "wals":
            return WALS(**base, unobserved_weight=self.unobserved_weight, row_weights=self.row_weights,
                        col_weights=self.col_weights)
        if self.mode == "biased":
            return Biased(**base, mu=global_mean, bias_reg=self.bias_reg)
        return Objective(**base)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def parse(cls, arrays: dict[str, np.ndarray] | None = None, **params: Any) -> ALSConfig:
        """Validate parameters (missing ones take their defaults) into a config."""
        return parse_params(params, arrays).config


ALSConfig = make_dataclass(
    "ALSConfig",
    [(p.name, Any) for p in PARAMS if p.config] + [("arrays_digest", str, field(default=""))],
    bases=(_ConfigMethods,),
    frozen=True,
    kw_only=True,
)
ALSConfig.__module__ = __name__  # pickled into Dask tasks: workers must find it here
ALSConfig.__doc__ = """Everything that determines the factors an ALS run produces, validated.

Two runs with equal configs on the same store give the same factors, whatever the
cluster; :meth:`fingerprint` names their checkpoints. Its fields are the parameters of
:data:`PARAMS` that determine the factors, plus ``arrays_digest``, a hash of user-given
arrays (initial factors, WALS weights). Array-valued parameters appear as ``"array"``.
"""


@dataclass(frozen=True, kw_only=True)
class RunParams:
    """Validated parameters: the factors' configuration and how the run goes."""

    config: ALSConfig
    max_iter: int
    checkpoint_interval: int | None
    checkpoint_seconds: float
    verbose: int


def parse_params(params: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> RunParams:
    """Validate a parameter dict (missing names take their defaults).

    Raises :class:`InputError` naming the first unknown or invalid parameter, or the
    combination that cannot run.
    """
    check_keys(params)
    values = {p.name: p.parse(params.get(p.name, p.default), p.name) for p in PARAMS}
    if values["bias_reg"] is None:
        values["bias_reg"] = values["reg"]
    if values["biases"] and values["implicit"]:
        raise InputError("biases=True applies to explicit feedback; it cannot be combined with implicit=True.")
    if values["weighting"] == "wals" and (values["implicit"] or values["biases"]):
        raise InputError("weighting='wals' is its own objective; it cannot be combined with implicit or biases.")
    if values["nonnegative"] and values["solver"] == "cg":
        raise InputError("nonnegative=True solves each row exactly; use solver='cholesky' with it.")
    config = ALSConfig(**{p.name: values[p.name] for p in PARAMS if p.config}, arrays_digest=_digest(arrays or {}))
    return RunParams(config=config, max_iter=values["max_iter"], checkpoint_interval=values["checkpoint_interval"],
                     checkpoint_seconds=values["checkpoint_seconds"], verbose=values["verbose"])


# Parameters a user may give as arrays, which a saved model's JSON leaves out.
ARRAY_VALUED = ("row_weights", "col_weights", "init")


def parse_saved_params(saved: Any, where: str) -> RunParams:
    """The parameters recorded in a saved model's metadata file ``where``.

    Metadata edited by hand (or by another version) is refused with :class:`StoreError`
    naming the key: an unknown key, a value of the wrong type, or a missing parameter that
    determines the factors (one that only shaped the run takes its default).
    """
    if not isinstance(saved, dict):
        raise StoreError(f"{where}: key 'params' must map parameter names to values, got {type(saved).__name__}.")
    try:
        check_keys(saved, template="unknown key {key} in 'params'")
        for p in PARAMS:
            if p.name in saved:
                p.parse(saved[p.name], f"key 'params.{p.name}'")
            elif p.config and p.name not in ARRAY_VALUED:
                raise InputError(f"key 'params.{p.name}' is missing.")
        return parse_params(saved)
    except InputError as exc:
        raise StoreError(f"{where}: {exc}") from None


def check_keys(keys: Iterable[str], known: Iterable[str] | None = None, template: str = "unknown parameter {key}") -> None:
    """Refuse a name that is not known (by default: not a parameter), suggesting the nearest one.

    ``template`` words the refusal, ``{key}`` standing for the quoted name.
    """
    known = list(BY_NAME) if known is None else list(known)
    for key in keys:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(known)}."
            raise InputError(template.format(key=repr(key)) + hint)


# -- derived faces: signature, docstring, command line -----------------------------------


def signature() -> inspect.Signature:
    kinds = {True: inspect.Parameter.POSITIONAL_OR_KEYWORD, False: inspect.Parameter.KEYWORD_ONLY}
    self_ = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return inspect.Signature([self_] + [inspect.Parameter(p.name, kinds[p.positional], default=p.default) for p in PARAMS])


def make_init() -> Callable[..., None]:
    """An ``__init__`` with the table's signature that only stores its arguments (scikit-learn's contract)."""
    sig = signature()

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        for name, value in bound.arguments.items():
            if name != "self":
                setattr(self, name, value)

    __init__.__signature__ = sig  # type: ignore[attr-defined]
    __init__.__doc__ = "Store the parameters; they are validated in ``fit``."
    return __init__


def numpydoc() -> str:
    """The *Parameters* section of the estimator's docstring."""
    lines = ["Parameters", "----------"]
    for p in PARAMS:
        lines += [f"{p.name} : {p.kind}, default={p.default!r}", f"    {p.help}"]
    return "\n".join(lines)


def _cli_value(p: Param) -> Callable[[str], Any]:
    """Command-line text to the parameter's type (validated later, with the API's sentences)."""
    if isinstance(p.default, bool):
        raise AssertionError(p.name)
    if isinstance(p.default, int) or p.kind == "int or None":
        return int
    if isinstance(p.default, float) or p.default is None:
        return float
    if p.name in ("row_weights", "col_weights"):
        return _counts_or_number
    return str


def _counts_or_number(text: str) -> str | float:
    if text == "counts":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'counts' or a number, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per parameter the command line offers (``--max-iter`` for ``max_iter``)."""
    for p in PARAMS:
        flag = "--" + p.name.replace("_", "-")
        if p.cli == "flag":
            parser.add_argument(flag, action="store_true", help=p.help)
        elif p.cli == "value":
            parser.add_argument(flag, type=_cli_value(p), default=p.default, choices=p.choices or None,
                                help=f"{p.help} (default: {p.default})")


def from_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The parameters :func:`add_arguments` parsed."""
    return {p.name: getattr(args, p.name) for p in PARAMS if p.cli}
