"""Hostile input, through the Python API and the command line alike.

Every bad input must give one sentence naming the row, column, parameter or path at
fault: a :class:`blockals.BlockalsError` from the API, and from the CLI exit status 2 with
that sentence alone on stderr. A refused ingest leaves nothing behind, and a refused
write leaves what was at the path untouched. Degenerate data that is allowed (negative
ratings, rows with one rating or none, rank above the number of items, λ = 0) must give
finite factors, checked against closed forms or a dense NumPy reference written here or
in ``tests/reference.py``.

Most CLI cases run ``blockals.cli.main`` in-process (training ones against the session
cluster through ``--scheduler``); a few run ``python -m blockals.cli`` in a subprocess to
show that no traceback reaches the user.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import blockals
from blockals.cli import main
from blockals.evaluation import evaluate, split
from blockals.kernels import init_factors
from blockals.recstore import read_recommendations
from conftest import cluster_client
from reference import dense_explicit_als, dense_weighted_als, reg_counts, weights_and_targets
from test_ingest import assert_store_holds
from test_model import random_ratings, to_frame

HEADER = "user,item,rating\n"
GOOD_ROWS = "1,10,4\n2,10,3\n2,11,5\n"


# -- helpers -----------------------------------------------------------------------------


def one_sentence(message: str) -> None:
    """One line, one sentence: it ends with a full stop (a question mark where it suggests a
    name) and no full stop starts another."""
    assert "\n" not in message.strip() and message.rstrip().endswith((".", "?")), message
    assert re.search(r"\.\s+[A-Z]", message) is None, message


def work_reported(out: str) -> list[str]:
    """Lines of ``out`` that report work done. A bad row is found by reading the source and
    a repeated pair by sorting it into user blocks, so a refused ingest may report those
    passes (``ingest scan: 3 partitions in 0.02 s``); nothing else may be reported."""
    passes = r"ingest (scan|stage|users): \d+ (partitions|blocks) in [\d.]+ s"
    return [line for line in out.splitlines() if not re.fullmatch(passes, line)]


def cli_fails(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    """Run the CLI in-process; it must exit with status 2, report no work done on stdout
    (:func:`work_reported`) and print one sentence on stderr, which is returned."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.err and not work_reported(captured.out), captured
    line = captured.err.strip()
    assert line.startswith("blockals: error: "), captured.err
    one_sentence(line)
    return line


def cli_ok(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def api_fails(error: type[Exception], match: str, call: Callable[..., object], *args: object, **kwargs: object) -> str:
    with pytest.raises(error, match=match) as info:
        call(*args, **kwargs)
    assert isinstance(info.value, blockals.BlockalsError)
    one_sentence(str(info.value))
    return str(info.value)


def scheduler() -> str:
    return cluster_client(2).scheduler.address


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def set_format_version(path: Path, version: int) -> None:
    meta_path = path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["blockals"]["format_version"] = version
    meta_path.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, blockals.RatingStore, blockals.ALS]:
    """A small store (users 0..5, items 10..13, every pair rated) and a model saved from it."""
    root = tmp_path_factory.mktemp("trained")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"user": np.repeat(np.arange(6), 4), "item": np.tile(np.arange(10, 14), 6),
                          "rating": rng.integers(1, 6, 24).astype(float)})
    store = blockals.ingest(frame, root / "s.zarr", n_user_blocks=2, n_item_blocks=2)
    model = blockals.ALS(rank=2, max_iter=2, dtype="float64").fit(store, cluster_client(2))
    model.save(root / "m.zarr")
    return root, frame, store, model


# -- 1. sources that cannot be ingested ----------------------------------------------------

BAD_SOURCES = [
    # (case, file contents, the sentence's essential part[, ingest options, also given to the CLI])
    ("empty-file", "", r"source file '.*r\.csv' is empty: it has no header and no ratings\."),
    ("header-only", HEADER, r"the source .*r\.csv has no ratings\."),
    ("missing-column", "user,item\n1,10\n", r"rating column 'rating' is not in the source; its columns are 'user', 'item'"),
    ("misnamed-columns", "uid,iid,stars\n1,10,4\n",
     r"user column 'user' is not in the source; its columns are 'uid', 'iid', 'stars' \(pass user_col=\.\.\.\)\."),
    ("non-numeric-rating", HEADER + GOOD_ROWS + "3,12,four\n", r"rating in row 3 is 'four', which is not a number\."),
    ("nan-rating", HEADER + GOOD_ROWS + "3,12,NaN\n", r"rating in row 3 is missing \(NaN\)"),
    ("inf-rating", HEADER + "3,12,-inf\n" + GOOD_ROWS, r"rating in row 0 is -inf; ratings must be finite float32 numbers\."),
    ("huge-rating", HEADER + GOOD_ROWS + "3,12,1e300\n", r"rating in row 3 is 1e\+300; ratings must be finite float32"),
    # Storable as float32, but its square is not: it would train to zero factors and an infinite loss.
    ("rating-square-overflows", HEADER + GOOD_ROWS + "3,12,-2e19\n",
     r"rating in row 3 is -2e\+19; ratings must be finite float32 numbers whose square fits float32 too "
     r"\(at most 1\.84e\+19 in magnitude\)\."),
    ("timestamp-beyond-int64", "user,item,rating,t\n1,10,4,0\n2,10,3,1e20\n",
     r"timestamp in row 1 is '1e20', outside the range of int64; timestamps must be whole numbers of magnitude "
     r"below 2\*\*63\.", {"timestamp_col": "t"}),
    ("timestamp-int64-min", "user,item,rating,t\n1,10,4,-9223372036854775808\n",
     r"timestamp in row 0 is '-9223372036854775808', outside the range of int64", {"timestamp_col": "t"}),
    ("duplicate-pair", HEADER + GOOD_ROWS + "3,12,1\n2,10,5\n",
     r"the source has 1 duplicate \(user, item\) pair, the first being user 2 and item 10 in rows 1 and 4; "
     r"pass duplicates='sum', 'last' or 'mean'"),
    ("fraction-id", HEADER + GOOD_ROWS + "3.5,12,1\n", r"user id in row 3 is '3\.5', which is not a whole number"),
    ("empty-id", HEADER + "1,,4\n" + GOOD_ROWS, r"item id in row 0 is missing\."),
    ("blank-id", HEADER + GOOD_ROWS + "  ,12,1\n", r"user id in row 3 is '  ', a blank string; string ids need a character other than whitespace\."),
    ("id-beyond-int64", HEADER + GOOD_ROWS + "9223372036854775808,12,1\n", r"user id in row 3 is larger than int64 allows\."),
    ("ragged-row", HEADER + "1,10,4\n2,10,3,7\n", r"source '.*r\.csv' cannot be read: .*Expected 3 fields in line 3, saw 4\."),
    ("unclosed-quote", HEADER + '1,10,4\n"2,10,3\n3,11,1\n',
     r"source '.*r\.csv' cannot be read: EOF inside string starting at row 2\."),
]


def cli_options(options: dict[str, object]) -> list[str]:
    """Keyword arguments of the API as command-line options."""
    return [str(a) for name, value in options.items() for a in (f"--{name.replace('_', '-')}", value)]


@pytest.mark.parametrize("text,match,options", [pytest.param(*c[1:3], *c[3:] or [{}], id=c[0]) for c in BAD_SOURCES])
def test_bad_source_file(text, match, options, tmp_path, capsys):
    (tmp_path / "r.csv").write_text(text)
    api_fails(blockals.InputError, match, blockals.ingest, tmp_path / "r.csv", tmp_path / "api.zarr", **options)
    line = cli_fails(capsys, "ingest", tmp_path / "r.csv", tmp_path / "cli.zarr", *cli_options(options))
    assert re.search(match, line)
    # Refused before or after writing began: nothing is left that could pass for a store.
    assert not (tmp_path / "api.zarr").exists() and not (tmp_path / "cli.zarr").exists()


GLOB_COLUMNS = r"; every file of a glob needs a header naming the same columns\."
BAD_GLOB_PARTS = [
    # (case, contents of the glob's second file, the sentence; the first file is good)
    # The reader samples the first file only: these fail inside the second one's partition.
    ("ragged-row", HEADER + "4,12,1\n5,12,2,9\n", r"cannot be read: .*Expected 3 fields in line 3, saw 4\."),
    ("unclosed-quote", HEADER + '4,12,1\n"5,12,2\n6,12,1\n', r"cannot be read: EOF inside string starting at row 2\."),
    # Dask would take the first line for a header like the first file's: read by position, or a row lost.
    ("no-header", "4,12,1\n5,12,2\n",
     r"source file '.*part-1\.csv' has columns '4', '12', '1', but '.*part-0\.csv' has 'user', 'item', 'rating'"
     + GLOB_COLUMNS),
    ("extra-column", "user,item,rating,note\n4,12,1,x\n",
     r"source file '.*part-1\.csv' has columns 'user', 'item', 'rating', 'note', but" + ".*" + GLOB_COLUMNS),
    ("missing-column", "item,user\n12,4\n", r"source file '.*part-1\.csv' has columns 'item', 'user', but" + ".*" + GLOB_COLUMNS),
]


@pytest.mark.parametrize("bad,match", [pytest.param(*c[1:], id=c[0]) for c in BAD_GLOB_PARTS])
def test_bad_file_in_a_glob_is_one_sentence(bad, match, tmp_path, capsys):
    (tmp_path / "part-0.csv").write_text(HEADER + GOOD_ROWS)
    (tmp_path / "part-1.csv").write_text(bad)
    pattern = str(tmp_path / "part-*.csv")
    api_fails(blockals.InputError, match, blockals.ingest, pattern, tmp_path / "api.zarr")
    assert re.search(match, cli_fails(capsys, "ingest", pattern, tmp_path / "cli.zarr"))
    assert not (tmp_path / "api.zarr").exists() and not (tmp_path / "cli.zarr").exists()


def test_files_of_a_glob_are_read_by_column_name(tmp_path):
    # Reordered headers: each file is read by its own header's names, rows counted in file order.
    (tmp_path / "part-0.csv").write_text(HEADER + GOOD_ROWS)
    (tmp_path / "part-1.csv").write_text("item,rating,user\n12,1,4\n13,5,5\n")
    (tmp_path / "part-2.csv").write_text("rating,user,item\n2,6,10\nx,7,11\n")
    expected = pd.DataFrame({"user": [1, 2, 2, 4, 5, 6], "item": [10, 10, 11, 12, 13, 10],
                             "rating": [4.0, 3.0, 5.0, 1.0, 5.0, 2.0]})
    api_fails(blockals.InputError, r"rating in row 6 is 'x', which is not a number\.", blockals.ingest,
              str(tmp_path / "part-*.csv"), tmp_path / "bad.zarr")
    (tmp_path / "part-2.csv").write_text("rating,user,item\n2,6,10\n")
    assert_store_holds(blockals.ingest(str(tmp_path / "part-*.csv"), tmp_path / "r.zarr"), expected)
    # Parquet files are read by name already; one lacking a column is refused all the same.
    expected.iloc[:3].to_parquet(tmp_path / "p-0.parquet")
    expected.iloc[3:, [1, 2, 0]].to_parquet(tmp_path / "p-1.parquet")
    assert_store_holds(blockals.ingest(str(tmp_path / "p-*.parquet"), tmp_path / "pq.zarr"), expected)
    expected.iloc[3:, [0, 1]].to_parquet(tmp_path / "p-2.parquet")
    api_fails(blockals.InputError, r"source file '.*p-2\.parquet' has columns 'user', 'item', but '.*p-0\.parquet' has "
              r"'user', 'item', 'rating'" + GLOB_COLUMNS, blockals.ingest, str(tmp_path / "p-*.parquet"),
              tmp_path / "pq2.zarr")


SPECIAL_SOURCES = [
    # (case, source (made in tmp_path), the sentence): refused from stat, before anything opens them.
    ("fifo", "r.csv", r"source '.*r\.csv' is a named pipe \(FIFO\), not a regular file; write the ratings to a file "
                      r"and ingest that\."),
    ("fifo-in-a-glob", "part-*.csv", r"source '.*part-1\.csv' is a named pipe \(FIFO\), not a regular file"),
    ("device", "/dev/null", r"source '/dev/null' is a character device, not a regular file"),
]


@pytest.mark.parametrize("source,match", [pytest.param(*c[1:], id=c[0]) for c in SPECIAL_SOURCES])
def test_special_files_as_source(source, match, tmp_path, capsys):
    os.mkfifo(tmp_path / ("part-1.csv" if "*" in source else "r.csv"))  # nothing ever writes to it: a read would hang
    (tmp_path / "part-0.csv").write_text(HEADER + GOOD_ROWS)
    source = str(tmp_path / source) if not source.startswith("/") else source
    api_fails(blockals.InputError, match, blockals.ingest, source, tmp_path / "api.zarr")
    api_fails(blockals.InputError, match, blockals.ALS().fit, source)
    assert re.search(match, cli_fails(capsys, "ingest", source, tmp_path / "cli.zarr"))
    assert not (tmp_path / "api.zarr").exists() and not (tmp_path / "cli.zarr").exists()


def test_directory_without_ratings_as_source(tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "notes.txt").write_text("not ratings")
    match = r"source '.*dir' is a directory with no Parquet files \(\.parquet, \.parq, \.pq\) in it\."
    api_fails(blockals.InputError, match, blockals.ingest, tmp_path / "dir", tmp_path / "api.zarr")
    # fit() takes a path that is not a store as a source, and says so in the same words.
    api_fails(blockals.InputError, match, blockals.ALS().fit, tmp_path / "dir")
    assert re.search(match, cli_fails(capsys, "ingest", tmp_path / "dir", tmp_path / "cli.zarr"))
    assert (tmp_path / "dir" / "notes.txt").read_text() == "not ratings"


# -- 2. ids --------------------------------------------------------------------------------


def test_whole_numbers_written_as_decimals_are_integer_ids(tmp_path, capsys):
    # pandas writes a float id column as 1.0, 2.0: the CSV and the Parquet file of one frame
    # give the same integer ids (an exactly written large integer stays exact beside them).
    frame = pd.DataFrame({"user": [1.0, 2.0, 2.0, 7.0], "item": [10, 10, 11, 11], "rating": [4.0, 3.0, 5.0, 1.0]})
    frame.to_csv(tmp_path / "r.csv", index=False)
    frame.to_parquet(tmp_path / "r.parquet")
    from_csv = blockals.ingest(tmp_path / "r.csv", tmp_path / "csv.zarr", n_user_blocks=1, n_item_blocks=1)
    from_parquet = blockals.ingest(tmp_path / "r.parquet", tmp_path / "pq.zarr", n_user_blocks=1, n_item_blocks=1)
    assert list(from_csv.user_ids) == list(from_parquet.user_ids) == [1, 2, 7]
    assert np.asarray(from_csv.user_ids).dtype == np.int64
    (tmp_path / "big.csv").write_text(HEADER + "1.0,10,4\n9007199254740993,10,3\n")
    cli_ok(capsys, "ingest", tmp_path / "big.csv", tmp_path / "big.zarr")
    assert list(blockals.open_store(tmp_path / "big.zarr").user_ids) == [1, 9007199254740993]
    # "1" and "1.0" are one user, so the pair repeats.
    (tmp_path / "dup.csv").write_text(HEADER + "1,10,4\n1.0,10,3\n")
    match = r"duplicate \(user, item\) pair, the first being user 1 and item 10 in rows 0 and 1"
    api_fails(blockals.InputError, match, blockals.ingest, tmp_path / "dup.csv", tmp_path / "dup.zarr")
    # A decimal beyond float64's exact integers is refused rather than rounded.
    (tmp_path / "inexact.csv").write_text(HEADER + GOOD_ROWS + "9007199254740993.0,12,1\n")
    match = r"user id in row 3 is '9007199254740993\.0', too large to read exactly unless written as an integer\."
    assert re.search(match, cli_fails(capsys, "ingest", tmp_path / "inexact.csv", tmp_path / "inexact.zarr"))


def test_numbers_with_leading_zeros_are_string_ids(tmp_path, capsys):
    # Codes such as 007 are not numbers: read as strings and kept as written, so 007 and 7 stay two users
    # (as integers they would be one, their ratings merged).
    (tmp_path / "r.csv").write_text(HEADER + "007,10,4\n7,10,3\n0042,11,5\n")
    cli_ok(capsys, "ingest", tmp_path / "r.csv", tmp_path / "r.zarr")
    store = blockals.open_store(tmp_path / "r.zarr")
    assert list(store.user_ids) == ["0042", "007", "7"] and list(store.item_ids) == [10, 11]


def test_fractional_ids_in_numeric_columns(tmp_path, capsys):
    frame = pd.DataFrame({"user": [1.0, 2.5, 3.0], "item": [10, 10, 11], "rating": [4.0, 3.0, 5.0]})
    match = r"user id in row 1 is 2\.5, which is not a whole number; ids must be integers or strings\."
    api_fails(blockals.InputError, match, blockals.ingest, frame, tmp_path / "api.zarr")
    frame.to_parquet(tmp_path / "r.parquet")
    assert re.search(match, cli_fails(capsys, "ingest", tmp_path / "r.parquet", tmp_path / "cli.zarr"))
    assert not (tmp_path / "api.zarr").exists() and not (tmp_path / "cli.zarr").exists()


def test_mixed_id_types(tmp_path, capsys):
    # Python objects of both kinds are refused ...
    frame = pd.DataFrame({"user": pd.Series([1, 2, "x"], dtype=object), "item": [10, 10, 11], "rating": [4.0, 3.0, 5.0]})
    match = r"user id in row 2 is 'x' of type str, but the column mixes types; ids must be all integers or all strings\."
    api_fails(blockals.InputError, match, blockals.ingest, frame, tmp_path / "api.zarr")
    # ... while a text column (a CSV's) holding numbers and words is a column of strings, as
    # documented: "10" then sorts before "9".
    (tmp_path / "r.csv").write_text(HEADER + "10,1,4\n9,1,3\nx,2,5\n")
    cli_ok(capsys, "ingest", tmp_path / "r.csv", tmp_path / "cli.zarr")
    assert list(blockals.open_store(tmp_path / "cli.zarr").user_ids) == ["10", "9", "x"]


def test_ids_beyond_int64_in_a_parquet_file(tmp_path, capsys):
    frame = pd.DataFrame({"user": np.array([1, 2, 2**63 + 5], dtype=np.uint64), "item": [10, 10, 11], "rating": 1.0})
    frame.to_parquet(tmp_path / "r.parquet")
    match = r"user id in row 2 is larger than int64 allows\."
    api_fails(blockals.InputError, match, blockals.ingest, tmp_path / "r.parquet", tmp_path / "api.zarr")
    assert re.search(match, cli_fails(capsys, "ingest", tmp_path / "r.parquet", tmp_path / "cli.zarr"))


# -- 3. parameters -------------------------------------------------------------------------

BAD_TRAINING = [
    # (case, ALS keyword arguments, CLI options, sentence)
    ("rank-zero", {"rank": 0}, ["--rank", "0"], r"rank must be at least 1, got 0\."),
    ("rank-negative", {"rank": -3}, ["--rank", "-3"], r"rank must be at least 1, got -3\."),
    ("reg-negative", {"reg": -0.5}, ["--reg", "-0.5"], r"reg must be at least 0, got -0\.5\."),
    ("alpha-negative", {"implicit": True, "alpha": -1.0}, ["--implicit", "--alpha", "-1"], r"alpha must be at least 0, got -1\."),
    # Documented choice: zero iterations would return the random initial factors, so it is refused.
    ("max-iter-zero", {"max_iter": 0}, ["--max-iter", "0"], r"max_iter must be at least 1, got 0\."),
    # One 10^6 x 10^6 float64 system alone is 7.3 TiB: refused against the workers' 2 GiB.
    ("rank-beyond-memory", {"rank": 1_000_000}, ["--rank", "1000000"],
     r"rank=1000000 needs at least 22,351\.\d GiB for one block's solve \(1000000x1000000 float64 systems and \d+ "
     r"factor rows\), more than a worker's memory limit \(2\.0 GiB\); lower rank\."),
]


@pytest.mark.parametrize("params,options,match", [pytest.param(*c[1:], id=c[0]) for c in BAD_TRAINING])
def test_bad_training_parameter(params, options, match, trained, tmp_path, capsys):
    root, _, store, _ = trained
    api_fails(blockals.InputError, match, blockals.ALS(**params).fit, store, cluster_client(2))
    line = cli_fails(capsys, "train", store.path, tmp_path / "m.zarr", *options, "--scheduler", scheduler())
    assert re.search(match, line)
    assert not (tmp_path / "m.zarr").exists()


BAD_ARGUMENTS = [
    # (case, CLI arguments, sentence). {store}, {model}: the trained fixture's; {csv}: a good
    # source; {file}: a regular file; {out}: an empty directory, which must stay empty.
    ("log-level", ["--log-level", "LOUD", "train", "{store}", "{out}/m.zarr"],
     r"--log-level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL; got 'LOUD'\."),
    ("scheduler-without-port", ["train", "{store}", "{out}/m.zarr", "--scheduler", "localhost"],
     r"--scheduler must be an address of the form host:port or tcp://host:port, got 'localhost'\."),
    ("scheduler-port-out-of-range", ["evaluate", "{model}", "{store}", "--scheduler", "tcp://127.0.0.1:99999"],
     r"--scheduler has the port 99999, which is not between 1 and 65535\."),
    ("scheduler-protocol", ["recommend", "{model}", "--output", "{out}/r.zarr", "--scheduler", "http://127.0.0.1:8786"],
     r"--scheduler has the protocol 'http'; use one of tcp://, tls://, ucx://, ws://, wss://\."),
    ("report-in-missing-directory", ["train", "{store}", "{out}/m.zarr", "--report", "{out}/no/such/r.html"],
     r"--report .*/no/such/r\.html cannot be written: the directory .*/no/such does not exist\."),
    ("plot-under-a-file", ["train", "{store}", "{out}/m.zarr", "--plot", "{file}/loss.png"],
     r"--plot .*/loss\.png cannot be written: .*notes\.txt is a file, not a directory\."),
    ("plot-is-a-directory", ["train", "{store}", "{out}/m.zarr", "--plot", "{out}"],
     r"--plot .* is a directory; give the path of a file to write\."),
    ("model-under-a-file", ["train", "{store}", "{file}/m.zarr"],
     r"model path .*/m\.zarr cannot be written: .*notes\.txt is a file, not a directory\."),
    ("store-under-a-file", ["ingest", "{csv}", "{file}/a/s.zarr"],
     r"store path .*/a/s\.zarr cannot be written: .*notes\.txt is a file, not a directory\."),
    ("split-under-a-file", ["split", "{store}", "{out}/train.zarr", "{file}/test.zarr"],
     r"test store path .*/test\.zarr cannot be written: .*notes\.txt is a file, not a directory\."),
    ("output-under-a-file", ["recommend", "{model}", "--output", "{file}/r.zarr"],
     r"--output .*/r\.zarr cannot be written: .*notes\.txt is a file, not a directory\."),
    ("json-in-missing-directory", ["evaluate", "{model}", "{store}", "--json", "{out}/no/m.json"],
     r"--json .*/no/m\.json cannot be written: the directory .*/no does not exist\."),
    # Without --scheduler the cluster would start here: the rank is weighed against this machine.
    ("rank-beyond-this-machine", ["train", "{store}", "{out}/m.zarr", "--rank", "1000000"],
     r"rank=1000000 needs at least 22,351\.\d GiB for one block's solve .*, more than this machine's memory "
     r"\([\d,.]+ GiB\); lower rank\."),
    ("split-fraction", ["split", "{store}", "{out}/train.zarr", "{out}/test.zarr", "--fraction", "1.5"],
     r"--fraction must be above 0 and below 1, got 1\.5\."),
    ("evaluate-k-zero", ["evaluate", "{model}", "{store}", "--k", "0"], r"--k must be at least 1, got 0\."),
    ("recommend-n-zero", ["recommend", "{model}", "--output", "{out}/r.zarr", "--n", "0"],
     r"--n must be at least 1, got 0\."),
    # distributed, given these, serves the dashboard on a random port of every interface.
    ("dashboard-address-without-port", ["train", "{store}", "{out}/m.zarr", "--dashboard-address", "localhost"],
     r"--dashboard-address must be host:port \(e\.g\. 127\.0\.0\.1:8787, or :0 for any free port\), got 'localhost'\."),
    ("dashboard-port-out-of-range", ["evaluate", "{model}", "{store}", "--dashboard-address", ":99999"],
     r"--dashboard-address has the port 99999, which is not between 0 and 65535\."),
    ("dashboard-address-with-protocol", ["recommend", "{model}", "--output", "{out}/r.zarr", "--dashboard-address", "tcp://127.0.0.1:8787"],
     r"--dashboard-address must be host:port"),
    # One column read as both would report every pair as repeated.
    ("ingest-one-column-twice", ["ingest", "{csv}", "{out}/s.zarr", "--item-col", "user"],
     r"user_col and item_col both name the column 'user'; each must name its own column\."),
    ("ingest-timestamp-is-the-rating", ["ingest", "{csv}", "{out}/s.zarr", "--timestamp-col", "rating"],
     r"rating_col and timestamp_col both name the column 'rating'; each must name its own column\."),
    ("split-fraction-zero", ["split", "{store}", "{out}/train.zarr", "{out}/test.zarr", "--fraction", "0"],
     r"--fraction must be above 0 and below 1, got 0\."),
    ("evaluate-relevance-nan", ["evaluate", "{model}", "{store}", "--relevance", "nan"],
     r"--relevance must be a finite number, got nan\."),
    ("recommend-users-and-output", ["recommend", "{model}", "--users", "0", "--output", "{out}/r.zarr"],
     r"recommend takes --users \(print those users' items\) or --output \(write every user's\), not both\."),
    # A Zarr group named recs.csv is not what was asked for.
    ("recommend-output-suffix", ["recommend", "{model}", "--output", "{out}/recs.csv"],
     r"output .*/recs\.csv ends in \.csv; recommendations are written as Zarr \(\.zarr\) or Parquet \(\.parquet\), "
     r"so name it so or pass format='zarr' or 'parquet'\."),
]


@pytest.mark.parametrize("args,match", [pytest.param(*c[1:], id=c[0]) for c in BAD_ARGUMENTS])
def test_bad_command_line_argument(args, match, trained, tmp_path, capsys):
    # Refused before anything is read, trained or started: cli_fails checks that nothing
    # reached stdout (a started cluster prints its dashboard), and {out} stays empty.
    root, _, store, _ = trained
    (tmp_path / "out").mkdir()
    (tmp_path / "notes.txt").write_text("precious")
    (tmp_path / "r.csv").write_text(HEADER + GOOD_ROWS)
    paths = {"store": store.path, "model": root / "m.zarr", "csv": tmp_path / "r.csv", "file": tmp_path / "notes.txt",
             "out": tmp_path / "out"}
    line = cli_fails(capsys, *(arg.format(**paths) for arg in args))
    assert re.search(match, line), line
    assert not any((tmp_path / "out").iterdir()) and (tmp_path / "notes.txt").read_text() == "precious"


BAD_RESUMES = [
    # (case, store: "trained" (checkpointed at rank 2, float64) or "fresh", ALS keyword arguments,
    #  CLI options, sentence)
    ("nothing-to-resume", "fresh", {"rank": 2}, ["--rank", "2"],
     r"resume=True, but there is no committed checkpoint to resume at .*fresh\.zarr/checkpoints/[0-9a-f]{16}; "
     r"train without resume to start\."),
    ("another-rank", "trained", {"rank": 3, "dtype": "float64"}, ["--rank", "3", "--dtype", "float64"],
     r"resume=True, but .*s\.zarr has no checkpoint of these parameters, only one made with rank=2 \(not rank=3\); "
     r"resume with rank=2, or train without resume\."),
    ("another-reg", "trained", {"rank": 2, "dtype": "float64", "reg": 0.5}, ["--rank", "2", "--dtype", "float64",
                                                                             "--reg", "0.5"],
     r"only one made with reg=0\.1 \(not reg=0\.5\); resume with reg=0\.1, or train without resume\."),
]


@pytest.mark.parametrize("which,params,options,match", [pytest.param(*c[1:], id=c[0]) for c in BAD_RESUMES])
def test_resume_with_nothing_to_resume(which, params, options, match, trained, tmp_path, capsys):
    # Documented: resume continues from the last committed iteration of these parameters'
    # checkpoint. Without one it is refused (before a cluster starts: no dashboard line on
    # stdout), not quietly turned into a fresh start that discards the checkpoint meant.
    root, frame, store, _ = trained
    if which == "fresh":
        store = blockals.ingest(frame, tmp_path / "fresh.zarr", n_user_blocks=2, n_item_blocks=2)
    before = sorted(p.name for p in (Path(store.path) / "checkpoints").glob("*"))
    api_fails(blockals.StoreError, match, blockals.ALS(max_iter=1, **params).fit, store, cluster_client(2), resume=True)
    assert re.search(match, cli_fails(capsys, "train", store.path, tmp_path / "m.zarr", "--resume", *options))
    assert not (tmp_path / "m.zarr").exists()
    assert sorted(p.name for p in (Path(store.path) / "checkpoints").glob("*")) == before  # no checkpoint started


EDITED_MODELS = [
    # (case, edit of the model's blockals attributes, sentence naming the key)
    ("params-missing", lambda m: m.pop("params"), r"key 'params' must map parameter names to values\."),
    ("rank-missing", lambda m: m["params"].pop("rank"), r"key 'params\.rank' is missing\."),
    ("rank-as-text", lambda m: m["params"].update(rank="2"), r"key 'params\.rank' must be an integer, got '2'\."),
    ("dtype-missing", lambda m: m["params"].pop("dtype"), r"key 'params\.dtype' is missing\."),
    ("solver-unknown", lambda m: m["params"].update(solver="lu"),
     r"key 'params\.solver' must be one of 'cholesky', 'cg'; got 'lu'\."),
    ("reg-as-text", lambda m: m["params"].update(reg="0.1"), r"key 'params\.reg' must be a finite number, got '0\.1'\."),
    ("unknown-key", lambda m: m["params"].update(rnak=2), r"unknown key 'rnak' in 'params'; did you mean 'rank'\?"),
    ("history-not-a-list", lambda m: m.update(history="none"),
     r"key 'history' must be a list of one mapping per iteration\."),
    ("config-not-a-mapping", lambda m: m.update(config=[2]), r"key 'config' must be a dict or null, got list\."),
    ("store-path-a-number", lambda m: m.update(store_path=3), r"key 'store_path' must be a str or null, got int\."),
]


@pytest.mark.parametrize("edit,match", [pytest.param(*c[1:], id=c[0]) for c in EDITED_MODELS])
def test_model_metadata_edited_by_hand(edit, match, trained, tmp_path, capsys):
    root = trained[0]
    shutil.copytree(root / "m.zarr", tmp_path / "m.zarr")
    meta_path = tmp_path / "m.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta["attributes"]["blockals"])
    meta_path.write_text(json.dumps(meta))
    match = r"m\.zarr/zarr\.json: " + match  # the file, then the key
    api_fails(blockals.StoreError, match, blockals.ALS.load, tmp_path / "m.zarr")
    assert re.search(match, cli_fails(capsys, "recommend", tmp_path / "m.zarr", "--users", "0"))
    assert re.search(match, cli_fails(capsys, "evaluate", tmp_path / "m.zarr", trained[2].path))


BAD_BLOCKS = [
    ("user-blocks-zero", "n_user_blocks", 0, r"n_user_blocks must be a positive integer, got 0\."),
    ("user-blocks-negative", "n_user_blocks", -2, r"n_user_blocks must be a positive integer, got -2\."),
    ("item-blocks-zero", "n_item_blocks", 0, r"n_item_blocks must be a positive integer, got 0\."),
    # Documented choice: more blocks than rows is refused, not clamped (a block needs a row).
    ("user-blocks-above-users", "n_user_blocks", 4,
     r"n_user_blocks=4 is larger than the number of users \(3\); a block needs at least one row\."),
    ("item-blocks-above-items", "n_item_blocks", 99, r"n_item_blocks=99 is larger than the number of items \(2\)"),
]


@pytest.mark.parametrize("name,value,match", [pytest.param(*c[1:], id=c[0]) for c in BAD_BLOCKS])
def test_bad_block_count(name, value, match, tmp_path, capsys):
    (tmp_path / "r.csv").write_text(HEADER + GOOD_ROWS + "3,11,1\n")  # 3 users, 2 items
    api_fails(blockals.InputError, match, blockals.ingest, tmp_path / "r.csv", tmp_path / "api.zarr", **{name: value})
    line = cli_fails(capsys, "ingest", tmp_path / "r.csv", tmp_path / "cli.zarr", f"--{name.replace('_', '-')}", value)
    assert re.search(match, line)
    assert not (tmp_path / "api.zarr").exists() and not (tmp_path / "cli.zarr").exists()


# -- 4. paths that are not what they should be ---------------------------------------------


@pytest.fixture
def foreign(tmp_path) -> Path:
    """A directory with someone's files in it."""
    path = tmp_path / "mine"
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("precious")
    (path / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return path


def test_path_that_is_not_a_store_as_input(foreign, trained, capsys):
    root, _, store, _ = trained
    match = r"mine is not a blockals store: there is no Zarr group there\."
    api_fails(blockals.StoreError, match, blockals.open_store, foreign)
    api_fails(blockals.StoreError, match, blockals.ALS.load, foreign)
    for args in (["info", foreign], ["train", foreign, root / "unused.zarr"], ["recommend", foreign, "--users", "1"]):
        assert re.search(match, cli_fails(capsys, *args))
    # A ratings store is not a model.
    match = r"s\.zarr is not a blockals model \(its attributes do not say 'blockals-model'\)\."
    api_fails(blockals.StoreError, match, blockals.ALS.load, store.path)
    assert re.search(match, cli_fails(capsys, "evaluate", store.path, store.path))


def test_path_that_is_not_a_store_as_output(foreign, trained, tmp_path, capsys):
    _, _, store, model = trained
    before = tree(foreign)
    match = r"mine exists and is not a blockals (store|model|recommendations store|checkpoint); refusing to write over it\."
    # Ingest, save, training (as the model's or the checkpoint's path) and recommendations
    # all refuse to empty the directory (Zarr's mode "w" would); training refuses before it
    # trains (cli_fails: nothing on stdout).
    (tmp_path / "r.csv").write_text(HEADER + GOOD_ROWS)
    assert re.search(match, cli_fails(capsys, "ingest", tmp_path / "r.csv", foreign))
    api_fails(blockals.InputError, match, model.save, foreign)
    api_fails(blockals.InputError, match, model.recommend_all, 2, foreign, client=cluster_client(2))
    for resume in (False, True):
        api_fails(blockals.InputError, match, blockals.ALS(rank=2, max_iter=1).fit, store.path, cluster_client(2),
                  checkpoint_path=str(foreign), resume=resume)
    assert re.search(match, cli_fails(capsys, "train", store.path, foreign, "--scheduler", scheduler()))
    assert tree(foreign) == before
    # Saving a model over the ratings store it was trained on is refused too.
    api_fails(blockals.InputError, r"s\.zarr exists and is not a blockals model", model.save, store.path)
    assert blockals.open_store(store.path).nnz == store.nnz


def test_an_existing_model_is_replaced_only_with_overwrite(trained, tmp_path, capsys):
    # As a store is by ingest: a complete model is never replaced unasked, and the
    # training is refused before it starts (nothing on stdout), not after it has trained.
    root, _, store, _ = trained
    path = tmp_path / "m.zarr"
    shutil.copytree(root / "m.zarr", path)
    before = tree(path)
    match = r"m\.zarr already holds a complete model; pass overwrite=True \(--overwrite\) to replace it\."
    api_fails(blockals.InputError, match, blockals.ALS.load(path).save, path)
    assert re.search(match, cli_fails(capsys, "train", store.path, path, "--rank", "3", "--max-iter", "1",
                                      "--scheduler", scheduler()))
    assert tree(path) == before
    cli_ok(capsys, "train", store.path, path, "--rank", "3", "--max-iter", "1", "--overwrite", "--scheduler", scheduler())
    assert blockals.ALS.load(path).rank == 3  # the fixture's model has rank 2


def test_newer_format_versions_are_refused(trained, tmp_path, capsys):
    root, _, store, _ = trained
    shutil.copytree(store.path, tmp_path / "s.zarr")
    shutil.copytree(root / "m.zarr", tmp_path / "m.zarr")
    set_format_version(tmp_path / "s.zarr", 2)
    set_format_version(tmp_path / "m.zarr", 2)
    store_match = r"s\.zarr has format version 2, but this blockals reads version 1; upgrade blockals or write the ratings store again\."
    model_match = r"m\.zarr has format version 2, but this blockals reads version 1; upgrade blockals or write the model again\."
    api_fails(blockals.StoreError, store_match, blockals.open_store, tmp_path / "s.zarr")
    api_fails(blockals.StoreError, store_match, blockals.ALS(max_iter=1).fit, tmp_path / "s.zarr", cluster_client(2))
    api_fails(blockals.StoreError, model_match, blockals.ALS.load, tmp_path / "m.zarr")
    for args, match in ((["info", tmp_path / "s.zarr"], store_match),
                        (["train", tmp_path / "s.zarr", tmp_path / "new.zarr"], store_match),
                        (["recommend", tmp_path / "m.zarr", "--users", "1"], model_match),
                        (["evaluate", tmp_path / "m.zarr", store.path], model_match)):
        assert re.search(match, cli_fails(capsys, *args))
    assert not (tmp_path / "new.zarr").exists()


# -- 5. models and ids -----------------------------------------------------------------------


def test_model_applied_to_a_store_with_other_ids(trained, tmp_path, capsys):
    root, frame, store, model = trained
    # Same shape and blocks, other user ids: every index would line up, every id is wrong.
    other = blockals.ingest(frame.assign(user=frame["user"] + 100), tmp_path / "other.zarr",
                            n_user_blocks=2, n_item_blocks=2)
    match = r"the test store's ids differ from the model's; evaluate on stores split from the training store\."
    api_fails(blockals.InputError, match, evaluate, model, other, client=cluster_client(2))
    assert re.search(match, cli_fails(capsys, "evaluate", root / "m.zarr", other.path, "--scheduler", scheduler()))
    match = r"the user ids of .*other\.zarr are not the model's; use the store the model was trained on"
    api_fails(blockals.InputError, match, model.recommend, [0], n=2, seen=other)
    # Fewer ids than the model is not a prefix of them either.
    fewer = blockals.ingest(frame[frame["user"] > 0], tmp_path / "fewer.zarr")
    api_fails(blockals.InputError, r"the user ids of .*fewer\.zarr are not the model's", model.recommend, [5], seen=fewer)

    # The training store re-ingested at its path with other ids: recommend_all refuses it and
    # writes nothing (the model itself is loaded from disk: it remembers the store's path).
    copy = tmp_path / "train.zarr"
    shutil.copytree(store.path, copy)
    moved = blockals.ALS.load(root / "m.zarr")
    moved.store_path_ = str(copy)
    moved.save(tmp_path / "m.zarr")
    recs = tmp_path / "recs.zarr"
    assert blockals.ALS.load(tmp_path / "m.zarr").recommend_all(1, recs, client=cluster_client(2)) == str(recs)
    shutil.rmtree(recs)
    blockals.ingest(frame.assign(item=frame["item"] * 2), copy, overwrite=True)
    match = r"the item ids of .*train\.zarr are not the model's"
    api_fails(blockals.InputError, match, blockals.ALS.load(tmp_path / "m.zarr").recommend_all, 1, recs,
              client=cluster_client(2))
    assert re.search(match, cli_fails(capsys, "recommend", tmp_path / "m.zarr", "--output", recs, "--scheduler", scheduler()))
    assert not recs.exists()


def test_folded_in_users_keep_working_with_the_training_store(trained):
    # fold_in(update=True) appends ids after the store's: the store's ids are still the
    # model's first ones, so excluding the training store's items works for old and new users,
    # and the folded-in ratings are excluded too.
    model = blockals.ALS.load(trained[0] / "m.zarr")
    model.fold_in(pd.DataFrame({"user": [50, 50], "item": [10, 11], "rating": [5.0, 1.0]}), update=True)
    recs = model.recommend([0, 50], n=4)
    assert (recs["user"] == 0).sum() == 0  # user 0 rated every item in the training store
    assert sorted(recs.loc[recs["user"] == 50, "item"]) == [12, 13]  # user 50 rated 10 and 11, by fold-in


BAD_FOLD_IN = [
    # (case, user ids of two new ratings, the sentence): ingest's id rules, as the model's ids (integers) are.
    ("fraction", [7.5, 7.5], r"user id in row 0 is 7\.5, which is not a whole number; ids must be integers or strings\."),
    ("nan", [7.0, np.nan], r"user id in row 1 is missing\."),
    ("word", ["7", "seven"], r"user id in row 1 is 'seven', but the model's user ids are integers\."),
    ("blank", [" ", " "], r"user id in row 0 is ' ', a blank string; string ids need a character other than whitespace\."),
]


@pytest.mark.parametrize("users,match", [pytest.param(*c[1:], id=c[0]) for c in BAD_FOLD_IN])
def test_fold_in_applies_ingests_id_rules(users, match, trained):
    model = blockals.ALS.load(trained[0] / "m.zarr")
    model.fold_in(pd.DataFrame({"user": [7, 7], "item": [10, 11], "rating": [5.0, 1.0]}), update=True)
    api_fails(blockals.InputError, match, model.fold_in,
              pd.DataFrame({"user": users, "item": [10, 12], "rating": [4.0, 2.0]}), update=True)
    assert list(model.user_ids_) == [0, 1, 2, 3, 4, 5, 7]  # 7 once, still an integer
    # Whole numbers, as floats or text, are the model's integer ids: user 7 is updated, not added again.
    model.fold_in(pd.DataFrame({"user": [7.0, 7.0], "item": [10, 12], "rating": [4.0, 2.0]}), update=True)
    model.fold_in(pd.DataFrame({"user": ["7", "8"], "item": [10, 12], "rating": [4.0, 2.0]}), update=True)
    assert list(model.user_ids_) == [0, 1, 2, 3, 4, 5, 7, 8] and model.user_ids_.dtype == np.int64


def test_unknown_ids(trained, capsys):
    root, frame, _, model = trained
    # Documented: NaN for a pair with an unknown user or item, whatever the id's type.
    pred = model.predict([0, 99, "zed", 2.5, 1, 1], [10, 10, 10, 10, 77, "x"])
    assert np.isfinite(pred[0]) and np.isnan(pred[1:]).all()
    x, y = model.user_factors_[0], model.item_factors_[0]
    assert pred[0] == pytest.approx(float(x @ y))
    np.testing.assert_array_equal(model.predict([0, 99], [10, 10], cold_start="drop"), pred[:1])
    assert model.recommend([99, "zed"], n=3, exclude_seen=False).empty  # unknown users are left out
    api_fails(blockals.InputError, r"users and items must have one length, got 2 and 1\.", model.predict, [0, 1], [10])
    # The CLI names them instead of printing an empty table.
    line = cli_fails(capsys, "recommend", root / "m.zarr", "--users", "0", "99", "zed")
    assert re.search(r"--users: 2 of the 3 ids are not users of the model .*m\.zarr, the first being '99'\.", line)


BAD_CALLS = [
    # (case, call(store, model, frame, out) with the trained fixture's store, model and ratings
    #  and an empty directory out, the error, the sentence). Each is refused before anything is
    #  written or started: out stays empty, the fixture's store and model unchanged.
    ("recommend-none", lambda s, m, f, o: m.recommend(None), blockals.InputError,
     r"users must be one id or a sequence of ids, got None\."),
    ("recommend-2d-ids", lambda s, m, f, o: m.recommend(np.array([[0, 1]])), blockals.InputError,
     r"users must be one id or a 1-D sequence of ids, got an array of shape \(1, 2\)\."),
    ("predict-none", lambda s, m, f, o: m.predict(None, None), blockals.InputError,
     r"users must be one id or a sequence of ids, got None\."),
    ("similar-items-2d-ids", lambda s, m, f, o: m.similar_items([[10], [11]]), blockals.InputError,
     r"items must be one id or a 1-D sequence of ids, got an array of shape \(2, 1\)\."),
    # A pair twice would count twice in its row's normal equations.
    ("fold-in-repeated-pair",
     lambda s, m, f, o: m.fold_in(pd.DataFrame({"user": [50, 50], "item": [10, 10], "rating": [1.0, 2.0]})),
     blockals.InputError, r"fold_in ratings rate user 50 and item 10 twice, in rows 0 and 1; combine repeated ratings "
                          r"before folding them in\."),
    ("fold-in-unknown-item",
     lambda s, m, f, o: m.fold_in(pd.DataFrame({"user": [50], "item": [999], "rating": [1.0]})),
     blockals.InputError, r"item id in row 0 \(999\) is not known to the model\."),
    # "no" is truthy: taken as given, it would resume.
    ("fit-resume-as-text", lambda s, m, f, o: blockals.ALS(max_iter=1).fit(s, cluster_client(2), resume="no"),
     blockals.InputError, r"resume must be True or False, got 'no'\."),
    ("fit-client-without-port", lambda s, m, f, o: blockals.ALS(max_iter=1).fit(s, "tcp://127.0.0.1"),
     blockals.InputError, r"client must be an address of the form host:port or tcp://host:port, got 'tcp://127\.0\.0\.1'\."),
    ("fit-client-of-another-kind", lambda s, m, f, o: blockals.ALS(max_iter=1).fit(s, 8786), blockals.InputError,
     r"client must be a distributed\.Client, a scheduler address such as tcp://host:8786, or None; got int\."),
    ("fit-storage-options-as-text",
     lambda s, m, f, o: blockals.ALS(max_iter=1).fit(f, cluster_client(2), storage_options="anon"),
     blockals.InputError, r"storage_options must be a dict of fsspec options \(string keys\) or None, got str\."),
    ("fit-checkpoint-path-a-number",
     lambda s, m, f, o: blockals.ALS(max_iter=1).fit(s, cluster_client(2), checkpoint_path=3),
     blockals.InputError, r"checkpoint_path must be a path \(str or os\.PathLike\), got 3\."),
    ("save-to-a-number", lambda s, m, f, o: m.save(5), blockals.InputError,
     r"path must be a path \(str or os\.PathLike\), got 5\."),
    ("save-overwrite-as-text", lambda s, m, f, o: m.save(o / "m.zarr", overwrite="yes"), blockals.InputError,
     r"overwrite must be True or False, got 'yes'\."),
    ("load-a-number", lambda s, m, f, o: blockals.ALS.load(5), blockals.InputError,
     r"path must be a path \(str or os\.PathLike\), got 5\."),
    ("recommend-all-to-a-number", lambda s, m, f, o: m.recommend_all(2, 5, client=cluster_client(2)),
     blockals.InputError, r"output must be a path \(str or os\.PathLike\), got 5\."),
    ("ingest-one-column-twice", lambda s, m, f, o: blockals.ingest(f, o / "s.zarr", item_col="user"),
     blockals.InputError, r"user_col and item_col both name the column 'user'; each must name its own column\."),
    ("ingest-column-not-a-name", lambda s, m, f, o: blockals.ingest(f, o / "s.zarr", user_col=0), blockals.InputError,
     r"user_col must be a column name \(a non-empty string\), got 0\."),
    ("ingest-empty-column-name", lambda s, m, f, o: blockals.ingest(f, o / "s.zarr", rating_col=""),
     blockals.InputError, r"rating_col must be a column name \(a non-empty string\), got ''\."),
    ("ingest-overwrite-as-text", lambda s, m, f, o: blockals.ingest(f, o / "s.zarr", overwrite="no"),
     blockals.InputError, r"overwrite must be True or False, got 'no'\."),
    ("ingest-budget-zero", lambda s, m, f, o: blockals.ingest(f, o / "s.zarr", block_budget=0), blockals.InputError,
     r"block_budget must be at least 1, got 0\."),
    ("ingest-storage-options-as-text", lambda s, m, f, o: blockals.ingest(f, o / "s.zarr", storage_options="anon"),
     blockals.InputError, r"storage_options must be a dict of fsspec options \(string keys\) or None, got str\."),
    ("ingest-to-a-number", lambda s, m, f, o: blockals.ingest(f, 7), blockals.InputError,
     r"store path must be a path \(str or os\.PathLike\), got 7\."),
    ("open-store-a-number", lambda s, m, f, o: blockals.open_store(7), blockals.InputError,
     r"store path must be a path \(str or os\.PathLike\), got 7\."),
    # A fraction of 0 leaves the test store empty.
    ("split-fraction-zero", lambda s, m, f, o: split(s, o / "train.zarr", o / "test.zarr", fraction=0),
     blockals.InputError, r"fraction must be above 0 and below 1, got 0\."),
    ("split-of-another-kind", lambda s, m, f, o: split(f, o / "train.zarr", o / "test.zarr"), blockals.InputError,
     r"store must be a RatingStore or the path of one, got DataFrame\."),
    ("evaluate-model-of-another-kind", lambda s, m, f, o: evaluate(s, s, client=cluster_client(2)),
     blockals.InputError, r"model must be a fitted blockals\.ALS or the path of a saved model, got RatingStore\."),
    ("evaluate-unfitted-model", lambda s, m, f, o: evaluate(blockals.ALS(), s, client=cluster_client(2)),
     blockals.InputError, r"this ALS model is not fitted yet; call fit\(\) or ALS\.load\(\) first\."),
    ("evaluate-test-of-another-kind", lambda s, m, f, o: evaluate(m, f, client=cluster_client(2)), blockals.InputError,
     r"test must be a RatingStore or the path of one, got DataFrame\."),
    ("evaluate-relevance-nan", lambda s, m, f, o: evaluate(m, s, relevance=float("nan"), client=cluster_client(2)),
     blockals.InputError, r"relevance must be a finite number, got nan\."),
]


@pytest.mark.parametrize("call,error,match", [pytest.param(*c[1:], id=c[0]) for c in BAD_CALLS])
def test_bad_api_call(call, error, match, trained, tmp_path):
    root, frame, store, model = trained
    before = tree(Path(store.path)), tree(root / "m.zarr")
    (tmp_path / "out").mkdir()
    api_fails(error, match, call, store, model, frame, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())
    assert (tree(Path(store.path)), tree(root / "m.zarr")) == before


def test_stores_and_models_given_by_path(trained, tmp_path):
    # evaluate and split take paths as fit does; the metrics are those of the objects themselves.
    root, frame, store, model = trained
    by_path = evaluate(str(root / "m.zarr"), store.path, client=cluster_client(2))
    direct = evaluate(model, store, client=cluster_client(2))
    assert by_path.keys() == direct.keys()
    np.testing.assert_array_equal([by_path[k] for k in direct], [direct[k] for k in direct])  # NaN where AUC is
    pred = model.predict(frame["user"], frame["item"])
    assert by_path["rmse"] == pytest.approx(float(np.sqrt(np.mean((pred - frame["rating"]) ** 2))), rel=1e-5)
    train, test = split(store.path, tmp_path / "train.zarr", tmp_path / "test.zarr", fraction=0.25, seed=1)
    assert train.nnz + test.nnz == store.nnz and test.nnz > 0


# -- 6. degenerate data that is allowed --------------------------------------------------------


def test_negative_ratings_in_explicit_mode_are_ordinary_values(tmp_path, capsys):
    # Documented (docs/objectives.md): explicit modes fit the ratings as given.
    R, M = random_ratings(12, 8, 0.5, seed=4)
    R = np.where(M, R - 3.0, 0.0)
    assert (R[M] < 0).mean() > 0.3
    store = blockals.ingest(to_frame(R, M), tmp_path / "r.zarr", n_user_blocks=2, n_item_blocks=2)
    assert store.stats["rating_min"] == R[M].min()
    model = blockals.ALS(rank=3, max_iter=4, reg=0.05, seed=2, dtype="float64").fit(store, cluster_client(2))
    X, Y = dense_explicit_als(R, M, init_factors(np.arange(12), 3, 2, "users", "float64"), 4, 0.05)
    np.testing.assert_allclose(model.user_factors_, X, atol=1e-6)
    np.testing.assert_allclose(model.item_factors_, Y, atol=1e-6)
    to_frame(R, M).to_csv(tmp_path / "r.csv", index=False)
    cli_ok(capsys, "ingest", tmp_path / "r.csv", tmp_path / "cli.zarr")
    cli_ok(capsys, "train", tmp_path / "cli.zarr", tmp_path / "m.zarr", "--rank", "3", "--max-iter", "2",
           "--scheduler", scheduler())
    loaded = blockals.ALS.load(tmp_path / "m.zarr")
    assert np.isfinite(loaded.user_factors_).all() and np.isfinite(loaded.item_factors_).all()
    assert loaded.history_[-1]["train_rmse"] < np.sqrt(np.mean(R[M] ** 2))  # it fits them


def test_negative_ratings_in_implicit_mode_are_confident_zeros(tmp_path, capsys):
    # Closed form: with only negative values every preference is 0, so the first item solve
    # has a zero right-hand side and gives Y = 0, and then X = 0.
    users, items = np.repeat(np.arange(5), 3), np.tile(np.arange(3), 5)
    negative = pd.DataFrame({"user": users, "item": items, "rating": -1.0 - np.arange(15) % 4})
    store = blockals.ingest(negative, tmp_path / "neg.zarr", n_user_blocks=2, n_item_blocks=1)
    model = blockals.ALS(rank=2, max_iter=2, implicit=True, alpha=3.0, dtype="float64").fit(store, cluster_client(2))
    assert not model.user_factors_.any() and not model.item_factors_.any()
    # The objective is then sum c (0 - 0)^2 over all pairs plus no regularization: 0.
    assert model.history_[-1]["loss"] == 0.0
    cli_ok(capsys, "train", store.path, tmp_path / "m.zarr", "--implicit", "--rank", "2", "--max-iter", "1",
           "--scheduler", scheduler())
    assert not blockals.ALS.load(tmp_path / "m.zarr").item_factors_.any()

    # Mixed signs: the dense weighted least squares over every pair, c = 1 + alpha |r|, p = [r > 0].
    R, M = random_ratings(10, 7, 0.5, seed=8)
    R = np.where(M, np.round(R) - 3.0, 0.0)  # negative, zero and positive values
    assert (R[M] < 0).any() and (R[M] == 0).any() and (R[M] > 0).any()
    store = blockals.ingest(to_frame(R, M), tmp_path / "mixed.zarr", n_user_blocks=2, n_item_blocks=2)
    model = blockals.ALS(rank=3, max_iter=3, reg=0.1, implicit=True, alpha=2.0, seed=5, dtype="float64").fit(
        store, cluster_client(2))
    W, T = weights_and_targets(R, M, "implicit", alpha=2.0)
    X, Y = dense_weighted_als(W, T, init_factors(np.arange(10), 3, 5, "users", "float64"), 3, 0.1,
                              *reg_counts(R, M, "implicit", "count"))
    np.testing.assert_allclose(model.user_factors_, X, atol=1e-6)
    np.testing.assert_allclose(model.item_factors_, Y, atol=1e-6)


@pytest.fixture(scope="module")
def sparse_rows() -> pd.DataFrame:
    """Users 0..7 rate most of items 0..5; user 100 rates item 0 only, item 50 is rated by user 1 only."""
    R, M = random_ratings(8, 6, 0.6, seed=9)
    u, i = np.nonzero(M)
    frame = pd.DataFrame({"user": u, "item": i, "rating": R[u, i]})
    extra = pd.DataFrame({"user": [100, 1], "item": [0, 50], "rating": [4.5, 2.0]})
    return pd.concat([frame, extra], ignore_index=True)


@pytest.mark.parametrize("reg", [0.3, 0.0])
def test_rows_with_a_single_rating(reg, sparse_rows, tmp_path):
    store = blockals.ingest(sparse_rows, tmp_path / "r.zarr", n_user_blocks=2, n_item_blocks=2)
    model = blockals.ALS(rank=3, max_iter=3, reg=reg, dtype="float64").fit(store, cluster_client(2))
    assert np.isfinite(model.user_factors_).all() and np.isfinite(model.item_factors_).all()
    # Closed form of the last (user) half-step for user 100's one rating r of item 0:
    # x = argmin (r - x.y)^2 + reg |x|^2 (count scaling: weight 1) = r y / (|y|^2 + reg),
    # so the prediction is r |y|^2 / (|y|^2 + reg): exactly r when reg = 0.
    y = model.item_factors_[list(model.item_ids_).index(0)]
    expected = 4.5 * (y @ y) / (y @ y + reg)
    assert model.predict([100], [0])[0] == pytest.approx(expected, rel=1e-9)
    assert np.isfinite(model.predict([1], [50])).all()


def test_items_and_users_never_rated(sparse_rows, tmp_path, capsys):
    # A store made with like= keeps every id of the original, rated or not (as splits do).
    full = blockals.ingest(sparse_rows, tmp_path / "full.zarr", n_user_blocks=2, n_item_blocks=2)
    rated = sparse_rows[(sparse_rows["item"] != 50) & (sparse_rows["user"] != 100)]
    store = blockals.ingest(rated, tmp_path / "part.zarr", like=full)
    assert store.n_items == full.n_items and store.nnz == len(rated)
    for params in ({}, {"reg_scaling": "none"}, {"implicit": True}):
        model = blockals.ALS(rank=3, max_iter=2, reg=0.1, dtype="float64", **params).fit(store, cluster_client(2))
        # Closed form: a row without ratings minimizes reg w |y|^2 (plus, in implicit mode,
        # y' X'X y): its factors are 0, with w = 0 (count scaling) as with w = 1.
        assert not model.item_factors_[list(model.item_ids_).index(50)].any(), params
        assert not model.user_factors_[list(model.user_ids_).index(100)].any(), params
        assert np.isfinite(model.user_factors_).all() and np.isfinite(model.item_factors_).all()
        assert np.isfinite(model.history_[-1]["loss"])
    cli_ok(capsys, "train", store.path, tmp_path / "m.zarr", "--rank", "3", "--max-iter", "1", "--scheduler", scheduler())
    loaded = blockals.ALS.load(tmp_path / "m.zarr")
    assert np.isfinite(loaded.item_factors_).all() and not loaded.item_factors_[list(loaded.item_ids_).index(50)].any()


def test_more_recommendations_than_items(trained, tmp_path, capsys):
    # n beyond the number of items asks for every item: ranked all, not a huge padded array.
    root, frame, _, model = trained
    recs = model.recommend([0, 1], n=10**11, exclude_seen=False)
    U, V = model.user_factors_.astype(np.float64), model.item_factors_.astype(np.float64)
    for user in (0, 1):
        expected = model.item_ids_[np.argsort(-(V @ U[user]), kind="stable")]
        assert list(recs.loc[recs["user"] == user, "item"]) == list(expected)
    out = cli_ok(capsys, "recommend", root / "m.zarr", "--users", "0", "--n", "99999999999", "--include-seen")
    assert len(out.strip().splitlines()) == 1 + len(model.item_ids_)  # header and every item
    assert len(model.similar_items([10], n=10**11)) == len(model.item_ids_) - 1


def test_rank_larger_than_the_number_of_items(tmp_path, caplog, capsys):
    R, M = random_ratings(9, 3, 0.7, seed=6)
    store = blockals.ingest(to_frame(R, M), tmp_path / "r.zarr", n_user_blocks=2, n_item_blocks=1)
    with caplog.at_level(logging.WARNING, logger="blockals"):
        model = blockals.ALS(rank=5, max_iter=3, reg=0.1, seed=1, dtype="float64").fit(store, cluster_client(2))
    assert "rank 5 exceeds min(n_users, n_items)" in caplog.text
    X, Y = dense_explicit_als(R, M, init_factors(np.arange(9), 5, 1, "users", "float64"), 3, 0.1)
    np.testing.assert_allclose(model.user_factors_, X, atol=1e-6)
    np.testing.assert_allclose(model.item_factors_, Y, atol=1e-6)
    cli_ok(capsys, "train", store.path, tmp_path / "m.zarr", "--rank", "5", "--max-iter", "2", "--scheduler", scheduler())
    assert np.isfinite(blockals.ALS.load(tmp_path / "m.zarr").user_factors_).all()


def test_no_regularization_with_fewer_ratings_than_rank(tmp_path):
    # User u rates 1 + u % 3 of 6 items (fewer than the rank, 4), starting at item u % 6 so
    # every item is rated; with reg 0 every user's system is singular.
    M = np.zeros((12, 6), dtype=bool)
    for u in range(12):
        M[u, (u + 2 * np.arange(1 + u % 3)) % 6] = True
    R = np.where(M, np.random.default_rng(12).integers(1, 11, M.shape) / 2.0, 0.0)
    assert M.any(0).all() and (M.sum(1) < 4).all()
    store = blockals.ingest(to_frame(R, M), tmp_path / "r.zarr", n_user_blocks=3, n_item_blocks=2)
    model = blockals.ALS(rank=4, max_iter=3, reg=0.0, dtype="float64").fit(store, cluster_client(2))
    X, Y = model.user_factors_, model.item_factors_
    assert np.isfinite(X).all() and np.isfinite(Y).all() and np.isfinite(model.history_[-1]["loss"])
    # Documented: the minimum-norm solution, i.e. each user's x = pinv(Y_obs) r_obs,
    # computed here by NumPy's least squares from the model's final item factors.
    for u in range(12):
        obs = np.flatnonzero(M[u])
        expected = np.linalg.lstsq(Y[obs], R[u, obs], rcond=None)[0]
        np.testing.assert_allclose(X[u], expected, atol=1e-8 * max(1.0, np.abs(expected).max()))


# -- 7. the real command line: no traceback reaches the user ------------------------------------


def test_subprocess_cli_prints_one_sentence(trained, tmp_path):
    root, _, store, _ = trained
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "p-0.csv").write_text(HEADER + GOOD_ROWS)
    (tmp_path / "p-1.csv").write_text(HEADER + "4,12,x\n")
    runs = [
        (["ingest", tmp_path / "empty.csv", tmp_path / "a.zarr"], r"empty\.csv' is empty"),
        (["ingest", tmp_path / "p-*.csv", tmp_path / "b.zarr"], r"rating in row 3 is 'x', which is not a number\."),
        (["train", store.path, tmp_path / "m.zarr", "--reg", "-1"], r"reg must be at least 0, got -1\."),
        (["recommend", root / "m.zarr", "--users", "404"], r"the first being '404'\."),
    ]
    # Started together: each spends its few seconds importing, on its own core if there is one.
    procs = [subprocess.Popen([sys.executable, "-m", "blockals.cli", *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args, _ in runs]
    for proc, (args, match) in zip(procs, runs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (args, err)
        assert "Traceback" not in err and not work_reported(out)
        line = err.strip()
        assert line.startswith("blockals: error: ") and re.search(match, line), line
        one_sentence(line)
    assert not any((tmp_path / name).exists() for name in ("a.zarr", "b.zarr", "m.zarr"))


def test_internal_error_is_one_line_pointing_at_its_log(trained, tmp_path):
    # A bug, not bad input: a store whose recorded block statistics were cut by hand is
    # not checked by the reader (for now), so reading it fails deep inside with a KeyError.
    # The user gets one line and the path of a log holding the traceback, status 1.
    shutil.copytree(trained[2].path, tmp_path / "s.zarr")
    meta_path = tmp_path / "s.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    del meta["attributes"]["blockals"]["stats"]["users"]
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "tmp").mkdir()
    out = subprocess.run([sys.executable, "-m", "blockals.cli", "info", str(tmp_path / "s.zarr")], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    assert out.returncode == 1 and out.stdout == "", out
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    match = re.fullmatch(r"blockals: internal error \(KeyError: 'users'\), not a problem with the input; "
                         r"the details are in (\S+\.log)", out.stderr.strip())
    assert match, out.stderr
    log = Path(match[1])
    assert log.parent == tmp_path / "tmp"
    text = log.read_text()
    assert text.startswith(f"blockals info {tmp_path / 's.zarr'}") and "Traceback" in text and "KeyError: 'users'" in text


BAD_PIPELINE_RUNS = [
    # (case, pipeline arguments, sentence); {file} is a regular file, {data} the --data
    # directory, which must not come to exist: every refusal comes before any stage.
    ("scheduler-without-port", ["--scheduler", "localhost"],
     r"--scheduler must be an address of the form host:port or tcp://host:port, got 'localhost'\."),
    ("data-under-a-file", ["--data", "{file}/data"], r"--data .*/data cannot be written: .*notes\.txt is a file"),
    ("n-workers-zero", ["--n-workers", "0"], r"--n-workers must be at least 1, got 0\."),
    ("source-missing", ["--source", "{data}/none.csv"], r"source '.*none\.csv' does not exist\."),
    ("rank-beyond-memory", ["--rank", "1000000"],
     r"rank=1000000 needs at least 22,351\.7 GiB for one block's solve \(1000000x1000000 float64 systems\), "
     r"more than this machine's memory \([\d,.]+ GiB\); lower rank\."),
    # Documented: --resume continues an earlier run; with none recorded in --data it is refused.
    ("resume-with-nothing", ["--resume"],
     r"--resume: .*data holds no earlier run of this pipeline \(no pipeline\.json\); run without --resume to start\."),
    ("config-value", ["--config", "{config}"], r"c\.yaml: split\.fraction must be above 0 and below 1, got 1\.5\."),
]


def test_pipeline_refusals_come_before_any_stage(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    (tmp_path / "c.yaml").write_text("split:\n  fraction: 1.5\n")
    fill = {"file": tmp_path / "notes.txt", "data": tmp_path / "data", "config": tmp_path / "c.yaml"}
    script = Path(__file__).resolve().parents[1] / "pipelines" / "als_pipeline.py"
    procs = [subprocess.Popen([sys.executable, str(script), "--data", str(tmp_path / "data"),
                               *(arg.format(**fill) for arg in args)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _, args, _ in BAD_PIPELINE_RUNS]
    for proc, (case, _, match) in zip(procs, BAD_PIPELINE_RUNS):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (case, err)
        assert "Traceback" not in err and not work_reported(out), (case, out, err)  # no dashboard: no cluster started
        line = err.strip()
        assert line.startswith("als_pipeline: error: ") and re.search(match, line), (case, line)
        one_sentence(line)
    assert not (tmp_path / "data").exists() and (tmp_path / "notes.txt").read_text() == "precious"


# -- 8. runs that meet: a path another process reads or writes ------------------------------


@contextlib.contextmanager
def leased_by_another_process(path: Path, shared: bool) -> Iterator[int]:
    """A separate process holding the lease of ``path`` (shared, as a run reading it holds it;
    exclusive, as a run writing it), until the block ends; yields its pid."""
    code = ("import sys\nfrom blockals.lock import Lease\n"
            f"with Lease({str(path)!r}, 'another run', shared={shared}):\n"
            "    print('held', flush=True)\n    sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0


READ, WRITTEN = r"is being read by another process", r"is being written by another process"
CONCURRENT = [
    # (case, the path held: "store", "model", "out/<name>", held shared (read) or not (written),
    #  the CLI run meeting it, the sentence's essential part). {store}, {model}: copies of the
    # fixture's, which must come out unchanged; {out}: a directory where nothing may be left.
    ("ingest-over-a-store-being-read", "store", True, ["ingest", "{csv}", "{store}", "--overwrite"],
     rf"ratings store .*s\.zarr {READ} \(process {{pid}} on .*\); wait for it to finish or write to another path\."),
    ("ingest-over-a-store-being-written", "store", False, ["ingest", "{csv}", "{store}", "--overwrite"],
     rf"ratings store .*s\.zarr {WRITTEN} \(process {{pid}} on "),
    ("train-on-a-store-being-written", "store", False, ["train", "{store}", "{out}/m.zarr", "--scheduler", "{sched}"],
     rf"ratings store .*s\.zarr {WRITTEN} \(process {{pid}} on .*\); wait for it to finish\."),
    ("train-to-a-model-being-written", "model", False,
     ["train", "{store}", "{model}", "--overwrite", "--scheduler", "{sched}"], rf"model .*m\.zarr {WRITTEN}"),
    ("split-from-a-store-being-written", "store", False, ["split", "{store}", "{out}/train.zarr", "{out}/test.zarr"],
     rf"ratings store .*s\.zarr {WRITTEN}"),
    ("split-into-a-store-being-read", "out/test.zarr", True, ["split", "{store}", "{out}/train.zarr", "{out}/test.zarr"],
     rf"ratings store .*test\.zarr {READ}"),
    ("evaluate-on-a-store-being-written", "store", False, ["evaluate", "{model}", "{store}", "--scheduler", "{sched}"],
     rf"ratings store .*s\.zarr {WRITTEN}"),
    ("recommend-from-a-store-being-written", "store", False,
     ["recommend", "{model}", "--output", "{out}/r.zarr", "--scheduler", "{sched}"], rf"ratings store .*s\.zarr {WRITTEN}"),
    ("recommend-to-an-output-being-written", "out/r.zarr", False,
     ["recommend", "{model}", "--output", "{out}/r.zarr", "--scheduler", "{sched}"], rf"recommendations .*r\.zarr {WRITTEN}"),
    ("search-on-a-store-being-written", "store", False,
     ["search", "{store}", "{out}/best.zarr", "--space", '{{"rank": [2]}}', "--max-iter", "1", "--min-iter", "1",
      "--scheduler", "{sched}"], rf"ratings store .*s\.zarr {WRITTEN}"),
]


@pytest.mark.parametrize("held,shared,args,match", [pytest.param(*c[1:], id=c[0]) for c in CONCURRENT])
def test_a_path_another_run_holds(held, shared, args, match, trained, tmp_path, capsys):
    root, _, store, _ = trained
    shutil.copytree(store.path, tmp_path / "s.zarr")
    shutil.copytree(root / "m.zarr", tmp_path / "m.zarr")
    model = blockals.ALS.load(tmp_path / "m.zarr")
    model.store_path_ = str(tmp_path / "s.zarr")  # the copy is the model's training store
    model.save(tmp_path / "m.zarr", overwrite=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "r.csv").write_text(HEADER + GOOD_ROWS)
    before = tree(tmp_path / "s.zarr"), tree(tmp_path / "m.zarr")
    paths = {"store": tmp_path / "s.zarr", "model": tmp_path / "m.zarr", "out": tmp_path / "out",
             "csv": tmp_path / "r.csv", "sched": scheduler()}
    target = paths[held] if held in paths else tmp_path / held
    with leased_by_another_process(target, shared) as pid:
        line = cli_fails(capsys, *(arg.format(**paths) for arg in args))
    assert re.search(match.format(pid=pid), line), line
    assert (tree(tmp_path / "s.zarr"), tree(tmp_path / "m.zarr")) == before
    assert not any((tmp_path / "out").iterdir())


def test_two_runs_may_read_one_store_at_once(trained, tmp_path, capsys):
    # Readers share: a training and an evaluation of a store another process reads both run,
    # and the training's model is the one a training of an unshared store gives.
    root, frame, store, _ = trained
    shutil.copytree(store.path, tmp_path / "s.zarr")
    with leased_by_another_process(tmp_path / "s.zarr", shared=True):
        cli_ok(capsys, "train", tmp_path / "s.zarr", tmp_path / "m.zarr", "--rank", "2", "--max-iter", "2",
               "--dtype", "float64", "--scheduler", scheduler())
        cli_ok(capsys, "evaluate", tmp_path / "m.zarr", tmp_path / "s.zarr", "--scheduler", scheduler())
    shared = blockals.ALS.load(tmp_path / "m.zarr")
    alone = blockals.ALS(rank=2, max_iter=2, dtype="float64").fit(store, cluster_client(2))
    np.testing.assert_allclose(shared.user_factors_, alone.user_factors_, rtol=1e-10)


# -- 9. runs killed while they write, then run again ------------------------------------------


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Big enough that each run below takes seconds: a CSV of 400k ratings and its store; a
    small store; a model of the big one with its recommendations; a split of the small one."""
    root = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(7)
    n = 400_000
    frame = pd.DataFrame({"user": rng.integers(0, 20_000, n), "item": rng.integers(0, 3_000, n),
                          "rating": rng.integers(1, 6, n).astype(float)}).drop_duplicates(["user", "item"])
    frame.to_csv(root / "big.csv", index=False)
    big = blockals.ingest(frame, root / "big.zarr", n_user_blocks=4, n_item_blocks=2)
    small = blockals.ingest(frame.iloc[:300], root / "small.zarr", n_user_blocks=2, n_item_blocks=2)
    split(small, root / "tr.zarr", root / "te.zarr")
    model = blockals.ALS(rank=2, max_iter=1).fit(big, cluster_client(2))
    model.save(root / "m.zarr")
    model.recommend_all(3, root / "r.zarr", client=cluster_client(2))
    return root


KILLED = [
    # (case, copies made from the `large` fixture into the run's directory, the run (no
    #  --scheduler: its cluster dies with it), a glob of what shows it is writing, the good
    #  outputs that must survive the kill byte for byte, a check of the rerun's result)
    ("ingest-over-a-store", {"small.zarr": "s.zarr"}, ["ingest", "{root}/big.csv", "s.zarr", "--overwrite"],
     ".s.zarr.ingest-*", ["s.zarr"],
     lambda d, root: blockals.open_store(d / "s.zarr").nnz == blockals.open_store(root / "big.zarr").nnz),
    ("split-over-two-stores", {"big.zarr": "big.zarr", "tr.zarr": "tr.zarr", "te.zarr": "te.zarr"},
     ["split", "big.zarr", "tr.zarr", "te.zarr", "--overwrite"], ".tr.zarr.split-*", ["tr.zarr", "te.zarr"],
     lambda d, root: blockals.open_store(d / "tr.zarr").nnz + blockals.open_store(d / "te.zarr").nnz
     == blockals.open_store(root / "big.zarr").nnz),
    ("train-over-a-model", {"big.zarr": "big.zarr", "m.zarr": "m.zarr"},
     ["train", "big.zarr", "m.zarr", "--overwrite", "--rank", "8", "--max-iter", "40", "--checkpoint-interval", "1"],
     "big.zarr/checkpoints/*", ["m.zarr"], lambda d, root: blockals.ALS.load(d / "m.zarr").rank == 8),
    ("recommend-over-recommendations", {"big.zarr": "big.zarr", "m.zarr": "m.zarr", "r.zarr": "r.zarr"},
     ["recommend", "m.zarr", "--output", "r.zarr", "--n", "20"], ".r.zarr.*", ["r.zarr"],
     lambda d, root: (read_recommendations(d / "r.zarr").groupby("user").size() == 20).all()),
]


# Two rows run by default (a store, recommendations); the split and the training, ~40 s
# each on two cores, with the slow tests.
KILLED_SLOW = {"split-over-two-stores", "train-over-a-model"}


@pytest.mark.parametrize("copies,args,writing,survivors,done", [
    pytest.param(*c[1:], id=c[0], marks=[pytest.mark.slow] if c[0] in KILLED_SLOW else []) for c in KILLED])
def test_a_run_killed_mid_write_keeps_the_old_output_and_a_rerun_completes(copies, args, writing, survivors, done,
                                                                         large, tmp_path):
    for name, copy in copies.items():
        shutil.copytree(large / name, tmp_path / copy)
    if "m.zarr" in copies.values():  # the copied model's training store is the copied one
        model = blockals.ALS.load(tmp_path / "m.zarr")
        model.store_path_ = str(tmp_path / "big.zarr")
        model.save(tmp_path / "m.zarr", overwrite=True)
    before = {name: tree(tmp_path / name) for name in survivors}
    command = [sys.executable, "-m", "blockals.cli", *(a.format(root=large) for a in args)]
    run = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(writing)):
        assert run.poll() is None, f"the run ended before it was seen writing: {run.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    run.kill()
    run.wait()
    assert {name: tree(tmp_path / name) for name in survivors} == before

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert done(tmp_path, large)
    # Nothing of the killed run is left: no staged copy, no lease file.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.endswith(".lock")] == []
