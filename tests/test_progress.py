"""Progress reporting: a bar on a terminal, plain lines in a log, tasks counted as they finish."""

from __future__ import annotations

import os
import pty
import sys
import time
import tty

import dask
import pytest

import blockals
from blockals.progress import Progress, compute, print_progress, wait


def test_a_log_gets_a_line_per_quarter_and_no_carriage_return(capsys):
    for done in range(1, 9):
        print_progress("ingest users", done, 8, "blocks")
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "".join(f"ingest users: {d}/8 blocks\n" for d in (2, 4, 6, 8))
    for done in range(1, 4):  # fewer tasks than quarters: every one, and the last
        print_progress("evaluate", done, 3, "blocks")
    assert capsys.readouterr().err == "".join(f"evaluate: {d}/3 blocks\n" for d in (1, 2, 3))


def test_a_terminal_gets_a_bar_redrawn_in_place(monkeypatch):
    master, slave = pty.openpty()
    tty.setraw(slave)  # the bytes as written, without the terminal turning \n into \r\n
    with os.fdopen(slave, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        for done in range(1, 5):
            print_progress("scan", done, 4, "partitions")
        monkeypatch.undo()
    written = os.read(master, 4096).decode()
    os.close(master)
    bars = ["#" * (30 * d // 4) for d in range(1, 5)]
    assert written == "".join(f"\rscan [{bar:<30}] {d}/4 partitions" for d, bar in zip(range(1, 5), bars)) + "\n"


def test_a_failed_pass_ends_its_bar_on_a_terminal(monkeypatch):
    master, slave = pty.openpty()
    tty.setraw(slave)
    with os.fdopen(slave, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        with pytest.raises(OSError), Progress(2, "ingest").step("scan", 4, "partitions") as report:
            report(1, 4)
            raise OSError("partition 1 is unreadable")
        monkeypatch.undo()
    assert os.read(master, 4096).decode() == f"\ringest scan [{'#' * 7:<30}] 1/4 partitions\n"
    os.close(master)


def test_levels_say_nothing_a_line_per_pass_or_also_its_tasks(capsys):
    for verbose in (0, 1, 2):
        with Progress(verbose, "ingest").step("users", 2, "blocks") as report:
            assert (report is None) == (verbose < 2)
            if report:
                report(1, 2)
                report(2, 2)
        out, err = capsys.readouterr()
        assert out.startswith("ingest users: 2 blocks in ") if verbose else out == ""
        assert err == ("ingest users: 1/2 blocks\ningest users: 2/2 blocks\n" if verbose == 2 else "")
    with Progress(1, "split").within("train").step("scan", 3, "partitions"):
        pass
    assert capsys.readouterr().out.startswith("split train scan: 3 partitions in ")


def test_a_failed_pass_prints_no_duration(capsys):
    with pytest.raises(ZeroDivisionError), Progress(1, "evaluate").step("", 1, "blocks"):
        1 / 0
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("verbose", [-1, "2", 1.5])
def test_a_bad_level_is_refused_naming_verbose(verbose):
    with pytest.raises(blockals.InputError, match=r"^verbose must be"):
        Progress.of(verbose, "ingest")


def squares(n):
    return [dask.delayed(lambda x: x * x)(i) for i in range(n)]


def test_compute_counts_its_tasks_on_the_local_scheduler():
    seen = []
    # The graph also holds the tasks the counted ones read: only the counted ones report.
    tasks = [dask.delayed(sum)(squares(3)) for _ in range(5)]
    assert compute(tasks, lambda done, total: seen.append((done, total))) == (5,) * 5
    assert seen == [(d, 5) for d in range(1, 6)]


def test_compute_and_wait_count_a_clients_futures(client2):
    seen = []
    with client2.as_current():
        assert compute(squares(6), lambda done, total: seen.append((done, total))) == tuple(i * i for i in range(6))
    assert seen == [(d, 6) for d in range(1, 7)]
    futures = client2.map(lambda x: -x, range(4))
    seen.clear()
    wait(futures, lambda done, total: seen.append((done, total)))
    assert seen == [(d, 4) for d in range(1, 5)] and all(f.done() for f in futures)


def test_wait_returns_only_once_every_future_has_ended(client2):

    def slow_or_failing(x):
        if x == 0:
            raise ValueError("bad partition")
        time.sleep(0.5)
        return x

    seen = []
    for report in (None, lambda done, total: seen.append(done)):
        futures = client2.map(slow_or_failing, range(3), pure=False)
        wait(futures, report)
        assert [f.status for f in futures] == ["error", "finished", "finished"]
    assert seen == [1, 2, 3]
