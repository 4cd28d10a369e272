"""Progress of the long stages: a bar on a terminal, plain lines in a log.

Every long call (ingest, split, training, evaluation, recommendations for all) runs in
passes of Dask tasks and takes a ``verbose`` level: 0 says nothing (the API's default);
1 prints a line per finished pass with its duration on standard output, as training
prints a line per iteration; 2 also reports each pass's tasks as they finish on standard
error (:func:`print_progress`).

Tasks are counted as they finish, wherever they run: futures of a distributed client
through ``as_completed`` (:func:`wait`), and graphs computed by Dask's local threaded
scheduler through a scheduler callback (:func:`compute`), since ``blockals ingest`` and
``blockals split`` run there, with no cluster.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = ["Progress", "Report", "print_progress", "compute", "wait"]

# Called as ``report(done, total)`` each time one of a pass's ``total`` tasks finishes.
Report = Callable[[int, int], None]


def print_progress(label: str, done: int, total: int, unit: str) -> None:
    """``done`` of ``total`` ``unit`` finished: a bar redrawn in place on a terminal; in a
    log (standard error redirected), a plain line at each quarter, so no carriage returns
    land there."""
    if sys.stderr.isatty():
        bar = "#" * (30 * done // total)
        end = "\n" if done == total else ""
        print(f"\r{label} [{bar:<30}] {done}/{total} {unit}", end=end, file=sys.stderr, flush=True)
    elif done == total or 4 * done // total > 4 * (done - 1) // total:
        print(f"{label}: {done}/{total} {unit}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Progress:
    """What a long call reports (see the module docstring); ``name`` starts its lines."""

    verbose: int = 0
    name: str = ""

    @classmethod
    def of(cls, verbose: int | bool | Progress, name: str) -> Progress:
        """``verbose`` as given to a public call, checked; a :class:`Progress` (how a call
        that runs others, as split runs ingest, names their lines) is kept as it is."""
        from blockals.params import parse_verbose

        return verbose if isinstance(verbose, Progress) else cls(parse_verbose(verbose, "verbose"), name)

    def within(self, name: str) -> Progress:
        """The same level, for a call made inside this one: its lines start with both names."""
        return Progress(self.verbose, f"{self.name} {name}".strip())

    @contextlib.contextmanager
    def step(self, label: str, total: int, unit: str) -> Iterator[Report | None]:
        """A pass of ``total`` tasks: gives the :data:`Report` its tasks are counted by
        (None below level 2) and, at level 1 and above, prints its duration once it ends."""
        label = f"{self.name} {label}".strip()
        start = time.perf_counter()
        shown = 0

        def report(done: int, of: int) -> None:
            nonlocal shown
            shown = done
            print_progress(label, done, of, unit)

        try:
            yield report if self.verbose >= 2 and total else None
        except BaseException:
            if 0 < shown < total and sys.stderr.isatty():
                print(file=sys.stderr, flush=True)  # end the bar, so the error starts a line of its own
            raise
        if self.verbose:
            print(f"{label}: {total} {unit} in {time.perf_counter() - start:.2f} s", flush=True)


def wait(futures: Sequence[Any], report: Report | None = None) -> None:
    """Return once every future of a distributed client has ended (finished or failed),
    reporting each as it does."""
    from distributed import as_completed

    if not futures:
        return
    # The futures' own client's loop: it need not be the current client.
    for done, _ in enumerate(as_completed(futures, loop=futures[0].client.loop), start=1):
        if report is not None:
            report(done, len(futures))


def compute(tasks: Sequence[Any], report: Report | None = None) -> tuple[Any, ...]:
    """``dask.compute(*tasks)``, reporting each task as it finishes, and returning or
    raising only once every task has ended.

    A pass that fails is followed by the removal of what its tasks write; a task still
    running would write into it as it goes, or leave files behind. On the current
    distributed client the futures are waited for; otherwise the threaded scheduler runs
    on a pool whose closing waits for its threads.
    """
    import dask
    from dask.base import get_scheduler
    from dask.system import cpu_count
    from distributed import Client

    client = getattr(get_scheduler(), "__self__", None)  # the client dask.compute would use
    if not isinstance(client, Client):
        # The CPU affinity and a container's CPU quota.
        with ThreadPoolExecutor(cpu_count()) as pool, _counting(tasks, report):
            return dask.compute(*tasks, scheduler="threads", pool=pool)
    futures = client.compute(list(tasks))
    wait(futures, report)
    return tuple(client.gather(futures))


@contextlib.contextmanager
def _counting(tasks: Sequence[Any], report: Report | None) -> Iterator[None]:
    """Report ``tasks`` as Dask's local scheduler finishes them: its callbacks run in the
    thread that computes, and see every key of the graph, of which only ours count."""
    if report is None:
        yield
        return
    from dask.callbacks import Callback

    keys = {task.key for task in tasks}
    done = 0

    def finished(key: Any, *_: Any) -> None:
        nonlocal done
        if key in keys:
            done += 1
            report(done, len(keys))

    with Callback(posttask=finished):
        yield
