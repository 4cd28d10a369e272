"""Reading rating sources into a Dask DataFrame, and checking their values.

Every source becomes a Dask DataFrame with columns ``user``, ``item``, ``rating`` so the
ingest reads it partition by partition and never whole. Checks report the first bad row
by its position among the source's data rows, counted from 0 (a CSV file's header line is
not counted).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import math
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from blockals.errors import InputError

__all__ = [
    "Source", "read_source", "source_paths", "reading", "check_partition", "convert_ids", "normalize_ratings",
    "normalize_timestamps", "PartitionCheck",
]

COLUMNS = ("user", "item", "rating")
PARTITION_ROWS = 2_000_000
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Ratings are stored as float32 and factors are float32 by default: the normal equations
# and the objective hold squares of ratings, so a rating whose square overflows float32
# would train to factors of zero and an infinite loss.
RATING_MAX = math.sqrt(FLOAT32_MAX)
MOVIELENS_COLUMNS = ["user", "item", "rating", "timestamp"]
# The file names Dask's Parquet reader takes from a directory.
PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
# How the CSV and Parquet readers fail on malformed files (ragged rows, bad encodings,
# files that are not Parquet), at open or later inside a partition's task.
READ_ERRORS = (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, pa.ArrowInvalid)


def _reader_error(exc: BaseException) -> BaseException | None:
    """The reader's own error behind ``exc``: Dask re-raises some of them (a quote left
    open, found while it samples the header) as a ValueError whose cause is the
    reader's."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, READ_ERRORS):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def reading(description: str) -> Iterator[None]:
    """Turn a reader's failure on a malformed source file into one sentence naming the source."""
    try:
        yield
    except (*READ_ERRORS, ValueError) as exc:
        cause = _reader_error(exc)
        if cause is None:
            raise
        # Dask prefixes the reader's message with its own; keep the last sentence of the
        # reader's first line, which says what is wrong ("Expected 3 fields in line 7, saw 4",
        # "EOF inside string starting at row 2" for a quote left open).
        reason = str(cause).split("Original Message:")[-1].strip().splitlines()[0].rstrip(". ").split(". ")[-1]
        reason = reason.removeprefix("C error: ")
        raise InputError(f"source {description!r} cannot be read: {reason}.") from exc


@dataclass(frozen=True)
class Source:
    """A source opened for reading: its partitions and a description for the store."""

    frame: dd.DataFrame
    description: str


def _from_pandas(df: pd.DataFrame, description: str) -> Source:
    nparts = max(1, math.ceil(len(df) / PARTITION_ROWS))
    # Keep object columns as they are: Dask's string conversion would turn mixed or
    # too-large Python ids into text that passes the id checks.
    with dask.config.set({"dataframe.convert-string": False}):
        frame = dd.from_pandas(df, npartitions=nparts, sort=False)
    return Source(frame, description)


_SPECIAL_FILES = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _refuse_special(path: str) -> None:
    """Refuse a FIFO, device or socket, told by ``stat`` without opening it: the readers
    sample a file and then read it again by byte ranges, and would block on a pipe."""
    mode = os.stat(path).st_mode
    for test, what in _SPECIAL_FILES:
        if test(mode):
            raise InputError(f"source {path!r} is {what}, not a regular file; write the ratings to a file and ingest that.")


def _columns(path: str) -> list[str]:
    """The column names of one CSV or Parquet file (its header line, or its schema)."""
    if path.lower().endswith(PARQUET_SUFFIXES):
        import pyarrow.parquet as pq

        return [name for name in pq.read_schema(path).names if not name.startswith("__index_level_")]
    return [str(c) for c in pd.read_csv(path, nrows=0, dtype=str).columns]


def _same_columns(files: Sequence[str]) -> list[list[str]]:
    """Each file's columns, refused unless every file has the first one's (in any order)."""
    columns = [_columns(f) for f in files]
    for f, cols in zip(files, columns):
        if sorted(cols) != sorted(columns[0]):
            raise InputError(
                f"source file {f!r} has columns {', '.join(map(repr, cols))}, but {files[0]!r} has "
                f"{', '.join(map(repr, columns[0]))}; every file of a glob needs a header naming the same columns."
            )
    return columns


def _read_csvs(files: Sequence[str]) -> dd.DataFrame:
    """CSV files as one frame, every file's columns read by name.

    Dask reads the header of the first file only and takes every other file's first line
    for a header like it: a file with its columns in another order would be read by
    position, and one without a header would lose its first row. So each file's header is
    read here, and consecutive files sharing a column order are read together.
    """
    if len(files) == 1:
        return dd.read_csv(files, dtype=str)
    columns = _same_columns(files)
    runs = [[f for f, _ in run] for _, run in itertools.groupby(zip(files, columns), key=lambda fc: fc[1])]
    frames = [dd.read_csv(run, dtype=str)[columns[0]] for run in runs]
    return frames[0] if len(frames) == 1 else dd.concat(frames)


def _read_path(path: str) -> tuple[dd.DataFrame, dict[str, str] | None]:
    """Open a file, directory or glob; returns the frame and, for MovieLens, a column map."""
    files = source_paths(path)
    if not files or not all(os.path.exists(f) for f in files):
        raise InputError(f"source {path!r} does not exist.")
    for f in files:
        _refuse_special(f)
    empty = next((f for f in files if os.path.isfile(f) and os.path.getsize(f) == 0), None)
    if empty is not None:
        raise InputError(f"source file {empty!r} is empty: it has no header and no ratings.")
    first = files[0]
    name = os.path.basename(first).lower()
    if os.path.isdir(first):
        parquet = [os.path.join(d, f) for d, _, fs in os.walk(first) for f in fs if f.lower().endswith(PARQUET_SUFFIXES)]
        if not parquet:
            raise InputError(f"source {first!r} is a directory with no Parquet files ({', '.join(PARQUET_SUFFIXES)}) in it.")
        for f in parquet:
            _refuse_special(f)
    if os.path.isdir(first) or name.endswith(PARQUET_SUFFIXES):
        if len(files) > 1 and not any(os.path.isdir(f) for f in files):
            _same_columns(files)  # read by name, but a file lacking a column must not read as missing values
        return dd.read_parquet(files if len(files) > 1 else first), None
    if name == "u.data":
        return dd.read_csv(files, sep="\t", header=None, names=MOVIELENS_COLUMNS, dtype=str), {}
    if name.endswith((".dat", ".txt")):
        with open(first, encoding="utf-8", errors="replace") as fh:
            head = fh.readline()
        if "::" in head:
            # MovieLens 1M/10M and Spark's sample data: user::item::rating[::timestamp].
            names = MOVIELENS_COLUMNS[: head.count("::") + 1]
            frame = dd.read_csv(files, sep="::", engine="python", header=None, names=names, dtype=str)
            return frame, {}
    if name == "ratings.csv":
        return _read_csvs(files), {"userId": "user", "movieId": "item"}
    # Text first: a bad value deep in a file then names its row instead of failing dtype inference.
    return _read_csvs(files), None


def _parse_columns(user_col: Any, item_col: Any, rating_col: Any, timestamp_col: Any) -> dict[str, str]:
    """The source's column names: strings, each naming another column (one column read as
    both users and items would report every pair as repeated)."""
    names = {"user_col": user_col, "item_col": item_col, "rating_col": rating_col, "timestamp_col": timestamp_col}
    seen: dict[str, str] = {}
    for name, value in names.items():
        if value is None and name == "timestamp_col":
            continue
        if not isinstance(value, str) or not value:
            raise InputError(f"{name} must be a column name (a non-empty string), got {value!r}.")
        if value in seen:
            raise InputError(f"{seen[value]} and {name} both name the column {value!r}; each must name its own column.")
        seen[value] = name
    return {"user": user_col, "item": item_col, "rating": rating_col}


def source_paths(source: Any) -> list[str]:
    """The files (or directory) a path or glob source reads; none for data in memory."""
    if not isinstance(source, (str, os.PathLike)):
        return []
    path = os.fspath(source)
    return sorted(glob.glob(path)) if glob.has_magic(path) else [path]


def read_source(
    source: Any, user_col: str = "user", item_col: str = "item", rating_col: str = "rating",
    timestamp_col: str | None = None,
) -> Source:
    """Open ``source`` as a Dask DataFrame with columns ``user``, ``item``, ``rating``
    (and ``timestamp`` when ``timestamp_col`` is given, or the source is a MovieLens file
    with timestamps).

    Parameters
    ----------
    source : pandas or Dask DataFrame, str or path, (users, items, ratings), or a SciPy sparse matrix
        A sparse matrix (CSR, as ``implicit`` takes) is users x items: its row and column
        indices are the ids, its stored entries the ratings.
        A path may be a CSV or Parquet file, a directory of Parquet files, a glob, or a
        MovieLens file (``u.data``, ``ratings.dat``, ``ratings.csv``), recognised by name.
    user_col, item_col, rating_col, timestamp_col : str
        Column names in the source (MovieLens files have theirs set automatically).
    """
    cols = _parse_columns(user_col, item_col, rating_col, timestamp_col)
    if isinstance(source, pd.DataFrame):
        src = _from_pandas(source, "pandas DataFrame")
    elif isinstance(source, dd.DataFrame):
        src = Source(source, "Dask DataFrame")
    elif isinstance(source, (str, os.PathLike)):
        with reading(os.fspath(source)):
            frame, movielens = _read_path(os.fspath(source))
        if movielens is not None:
            frame = frame.rename(columns=movielens)
            cols = {c: c for c in COLUMNS}
            if timestamp_col is None and "timestamp" in frame.columns:
                timestamp_col = "timestamp"
        src = Source(frame, os.fspath(source))
    elif sp.issparse(source):
        if source.ndim != 2:
            raise InputError(f"a sparse ratings matrix must be 2-D (users x items), got {source.ndim}-D.")
        coo = source.tocoo()  # stored entries are the ratings; explicit zeros included
        src = _from_pandas(pd.DataFrame({"user": coo.row, "item": coo.col, "rating": coo.data}),
                           "sparse user x item matrix")
        cols = {c: c for c in COLUMNS}
    elif isinstance(source, Sequence) and len(source) == 3:
        arrays = [np.asarray(a) for a in source]
        # NumPy turns a list like [1, "a"] into text; keep such values as given, so mixed
        # ids are refused as they are in an object column.
        arrays = [
            np.asarray(a, dtype=object) if arr.dtype.kind in "US" and not isinstance(a, np.ndarray) else arr
            for a, arr in zip(source, arrays)
        ]
        lengths = {a.shape for a in arrays}
        if len(lengths) != 1 or arrays[0].ndim != 1:
            raise InputError(
                f"(users, items, ratings) must be three 1-D arrays of one length, got shapes "
                f"{[a.shape for a in arrays]}."
            )
        src = _from_pandas(pd.DataFrame(dict(zip(COLUMNS, arrays))), "arrays")
        cols = {c: c for c in COLUMNS}
    else:
        raise InputError(
            f"source must be a DataFrame, a path, (users, items, ratings) arrays or a sparse matrix, "
            f"got {type(source).__name__}."
        )
    if timestamp_col is not None:
        cols["timestamp"] = timestamp_col
    present = list(src.frame.columns)
    for role, col in cols.items():
        if col not in present:
            raise InputError(
                f"{role} column {col!r} is not in the source; its columns are "
                f"{', '.join(map(repr, map(str, present)))} (pass {role}_col=...)."
            )
    frame = src.frame[list(cols.values())]
    frame.columns = list(cols)
    return Source(frame, src.description)


def _describe(value: Any) -> str:
    return repr(value.item() if isinstance(value, np.generic) else value)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


_LEADING_ZERO = re.compile(r"\s*[-+]?0\d")
_INT_TEXT = re.compile(r"\s*[-+]?\d+\s*")
_NUMBER_TEXT = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")
_EXACT_FLOAT_INT = 2.0**53  # beyond this, a number read through float64 may not be the integer written
_INT64_MIN, _INT64_END = -(2**63), 2**63


def _numeric_id_problem(v: np.ndarray, role: str) -> tuple[int, str] | None:
    if v.dtype.kind == "i":
        return None
    if v.dtype.kind == "u":
        big = v > np.iinfo(np.int64).max
        return (_first(big), f"{role} id in row {{row}} is larger than int64 allows.") if big.any() else None
    v = v.astype(np.float64)
    big = np.abs(v) >= 2.0**63
    if big.any():
        return _first(big), f"{role} id in row {{row}} is larger than int64 allows."
    fraction = v != np.floor(v)
    if fraction.any():
        row = _first(fraction)
        return row, (
            f"{role} id in row {{row}} is {v[row]:g}, which is not a whole number; "
            f"ids must be integers or strings."
        )
    return None


def id_kind(values: pd.Series, role: str) -> tuple[str, tuple[int, str] | None]:
    """Decide whether a partition's ids are integers (``"int"``) or strings (``"str"``).

    Returns the kind and the first problem as ``(row, sentence)``, or None. Numeric
    columns must hold whole numbers within int64. A text column (CSV files are read as
    text) is integer when every value is a number, else string; see :func:`_text_id_kind`.
    A column of Python objects must not mix numbers and strings.
    """
    missing = values.isna().to_numpy()
    if missing.any():
        return "int", (_first(missing), f"{role} id in row {{row}} is missing.")
    kind = values.dtype.kind
    if kind == "b":
        return "int", (0, f"{role} ids are booleans; ids must be integers or strings.")
    if kind in "iuf":
        return "int", _numeric_id_problem(values.to_numpy(), role)
    v = values.to_numpy(dtype=object)
    is_str = np.fromiter((isinstance(x, str) for x in v), bool, len(v))
    if is_str.all():
        empty = np.fromiter((not x.strip() for x in v), bool, len(v))
        if empty.any():
            row = _first(empty)
            what = "an empty string" if not v[row] else f"{v[row]!r}, a blank string"
            return "str", (row, f"{role} id in row {{row}} is {what}; string ids need a character other than whitespace.")
        return _text_id_kind(v, role)
    is_int = np.fromiter((isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in v), bool, len(v))
    if is_int.all():
        big = np.fromiter((not _INT64_MIN <= int(x) < _INT64_END for x in v), bool, len(v))
        if big.any():
            return "int", (_first(big), f"{role} id in row {{row}} is larger than int64 allows.")
        return "int", None
    # The first row whose type differs from the first row's.
    row = _first(is_str != is_str[0]) if is_str.any() else _first(~is_int)
    return "str", (
        row,
        f"{role} id in row {{row}} is {_describe(v[row])} of type {type(v[row]).__name__}, "
        f"but the column mixes types; ids must be all integers or all strings.",
    )


def _text_id_kind(v: np.ndarray, role: str) -> tuple[str, tuple[int, str] | None]:
    """Ids given as text: integers when every value is a number, else strings.

    Numbers may be written like ``1.0`` (as pandas writes a float column), so a CSV and a
    Parquet file of one frame give the same ids; a number with a fraction is refused, as
    in a numeric column. A value with a leading zero (``007``) is a code, not a number:
    its column is strings, kept as written, so ``007`` and ``7`` stay two ids.
    """
    if any(_LEADING_ZERO.match(x) for x in v):
        return "str", None
    is_int = np.fromiter((_INT_TEXT.fullmatch(x) is not None for x in v), bool, len(v))
    if not is_int.all() and not all(_NUMBER_TEXT.fullmatch(x) for x in v):
        return "str", None
    big = np.fromiter((ok and not _INT64_MIN <= int(x) < _INT64_END for ok, x in zip(is_int, v)), bool, len(v))
    value = np.array([0.0 if ok else float(x) for ok, x in zip(is_int, v)])
    fraction = value != np.floor(value)
    inexact = np.abs(value) >= _EXACT_FLOAT_INT
    problems = [
        (_first(big), f"{role} id in row {{row}} is larger than int64 allows.") if big.any() else None,
        (_first(fraction), f"{role} id in row {{row}} is {v[_first(fraction)].strip()!r}, which is not a whole number; "
                           f"in a column of numbers, ids must be integers.") if fraction.any() else None,
        (_first(inexact), f"{role} id in row {{row}} is {v[_first(inexact)].strip()!r}, too large to read exactly "
                          f"unless written as an integer.") if inexact.any() else None,
    ]
    return "int", min((p for p in problems if p is not None), default=None)


def convert_ids(values: pd.Series | pd.Index, kind: str) -> np.ndarray:
    """Ids in their final type: int64, or (object array of) the text as written."""
    values = pd.Series(values)
    if kind == "int":
        if values.dtype.kind in "iuf":
            return values.to_numpy(dtype=np.int64)
        text = values.astype(str).str.strip()
        numbers = pd.to_numeric(text)
        if numbers.dtype.kind == "f":
            # Some ids are written like 1.0: convert one by one, so large integers stay exact.
            return np.array([int(x) if _INT_TEXT.fullmatch(x) else int(float(x)) for x in text], dtype=np.int64)
        return numbers.to_numpy(dtype=np.int64)
    if values.dtype.kind in "iuf":
        values = values.astype(np.int64)
    return values.astype(str).to_numpy(dtype=object)


def normalize_ratings(values: pd.Series) -> tuple[np.ndarray, tuple[int, str] | None]:
    """Ratings as float64; the problem names the first non-numeric, missing or infinite row."""
    if values.dtype.kind in "iuf":
        r = values.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        coerced = pd.to_numeric(values, errors="coerce")
        bad = coerced.isna().to_numpy() & values.notna().to_numpy()
        if bad.any():
            row = _first(bad)
            return np.empty(0), (
                row,
                f"rating in row {{row}} is {_describe(values.iloc[row])}, which is not a number.",
            )
        r = coerced.to_numpy(dtype=np.float64, na_value=np.nan)
    nonfinite = ~np.isfinite(r)
    huge = np.abs(np.where(nonfinite, 0.0, r)) > RATING_MAX
    if nonfinite.any() or huge.any():
        row = _first(nonfinite | huge)
        if huge[row]:
            return r, (row, f"rating in row {{row}} is {r[row]:g}; ratings must be finite float32 numbers whose square "
                            f"fits float32 too (at most {RATING_MAX:.3g} in magnitude).")
        what = "missing (NaN)" if np.isnan(r[row]) else f"{r[row]:g}"
        return r, (row, f"rating in row {{row}} is {what}; ratings must be finite float32 numbers.")
    return r, None


def normalize_timestamps(values: pd.Series) -> tuple[np.ndarray, tuple[int, str] | None]:
    """Timestamps as int64 (datetimes become seconds since the epoch); numbers must be
    whole and within int64, less its lowest value, which has no negation."""
    if values.dtype.kind == "M":
        missing = values.isna().to_numpy()
        if missing.any():
            return np.empty(0), (_first(missing), "timestamp in row {row} is missing.")
        return values.astype("datetime64[s]").astype(np.int64).to_numpy(), None
    numbers = pd.to_numeric(values, errors="coerce")
    t = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(t) | (t != np.floor(t))
    if bad.any():
        row = _first(bad)
        return np.empty(0), (row, f"timestamp in row {{row}} is {_describe(values.iloc[row])}, not a whole number.")
    outside = np.abs(t) >= 2.0**63  # float64 rounds int64's extremes to +-2**63: both refused
    if outside.any():
        row = _first(outside)
        return np.empty(0), (row, f"timestamp in row {{row}} is {_describe(values.iloc[row])}, outside the range of "
                                  f"int64; timestamps must be whole numbers of magnitude below 2**63.")
    # Integers as they were read (float64 would round those beyond 2**53).
    return (numbers.to_numpy(dtype=np.int64) if numbers.dtype.kind == "i" else t.astype(np.int64)), None


@dataclass(frozen=True, kw_only=True)
class PartitionCheck:
    """What the first ingest pass learns from one partition."""

    n_rows: int
    problem: tuple[int, str] | None  # (row within the partition, sentence with {row})
    user_kind: str
    item_kind: str


def check_partition(part: pd.DataFrame) -> PartitionCheck:
    """First ingest pass over one partition: length, first problem and id kinds."""
    user_kind, user_problem = id_kind(part["user"], "user")
    item_kind, item_problem = id_kind(part["item"], "item")
    rating_problem = normalize_ratings(part["rating"])[1]
    time_problem = normalize_timestamps(part["timestamp"])[1] if "timestamp" in part else None
    problem = min((p for p in (user_problem, item_problem, rating_problem, time_problem) if p is not None), default=None)
    return PartitionCheck(
        n_rows=len(part),
        problem=problem,
        user_kind=user_kind,
        item_kind=item_kind,
    )
