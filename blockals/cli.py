"""The ``blockals`` command line: ingest, split, train, search, evaluate, recommend, info.

Every subcommand wraps the Python API with the same parameter names (dashes for
underscores). Bad input ends with one sentence on stderr and exit status 2, never a
traceback, and is refused before any work starts (:func:`check_arguments`); an unexpected
error is reported in one line naming the log file that holds its traceback, status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from blockals import params
from blockals.errors import InputError

__all__ = ["main", "build_parser", "check_arguments", "internal_error"]


def _client(args: argparse.Namespace, ratings: int | None = None):
    from blockals.cluster import connect
    from blockals.tls import TLSFiles

    tls = TLSFiles.parse(args.tls_ca_file, args.tls_cert, args.tls_key)
    return connect(scheduler=args.scheduler, ratings=ratings, dashboard_address=args.dashboard_address,
                   security=tls.security() if tls else None)


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", help="address of a running Dask scheduler, tcp:// or tls:// (default: start a LocalCluster)")
    p.add_argument("--dashboard-address", default="127.0.0.1:8787",
                   help="where a started LocalCluster serves its dashboard (default: 127.0.0.1:8787, loopback only; "
                        "the dashboard has no authentication)")
    p.add_argument("--tls-ca-file", help="TLS for the Dask comm: the CA certificate (PEM) that signed the cluster's certificates")
    p.add_argument("--tls-cert", help="TLS: this client's certificate (PEM), also used by a started LocalCluster")
    p.add_argument("--tls-key", help="TLS: the certificate's private key (PEM), unless --tls-cert holds it")


def _add_progress_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--progress", action="store_true", help=f"progress over {what}: a bar on a terminal, lines in a log")


def _verbose(args: argparse.Namespace) -> int:
    """A line per pass (or iteration) with its duration by default; with --progress, also its tasks on stderr."""
    return 2 if args.progress else 1


def _ingest(args: argparse.Namespace) -> int:
    import blockals

    store = blockals.ingest(
        args.source, args.store, user_col=args.user_col, item_col=args.item_col, rating_col=args.rating_col,
        n_user_blocks=args.n_user_blocks, n_item_blocks=args.n_item_blocks, duplicates=args.duplicates,
        overwrite=args.overwrite, timestamp_col=args.timestamp_col, verbose=_verbose(args),
    )
    print(store.summary())
    return 0


def _split(args: argparse.Namespace) -> int:
    import blockals
    from blockals.evaluation import split

    train, test = split(blockals.open_store(args.store), args.train, args.test, method=args.method,
                        fraction=args.fraction, k=args.k, seed=args.seed, overwrite=args.overwrite,
                        verbose=_verbose(args))
    print(f"{train.nnz:,} ratings in {args.train}, {test.nnz:,} in {args.test}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import blockals
    from blockals.lock import Lease
    from blockals.modelio import check_model_path
    from blockals.training import check_worker_memory, preflight

    model = blockals.ALS(**params.from_arguments(args), verbose=_verbose(args))
    params.parse_params(model.get_params())  # a bad parameter is refused before a cluster starts
    if args.plot:
        _pyplot()  # refused before the training, not after it, as everything below
    store = blockals.open_store(args.store)
    check_model_path(args.model, overwrite=args.overwrite)
    run = preflight(model.get_params(), store, resume=args.resume, local=args.scheduler is None)[0]
    # Held from start to save: a second training of this model path, or an ingest over the
    # store, is refused before it starts a cluster, not after it has trained.
    with Lease(args.model, "model", break_lease=args.break_lease), store.reading():
        with _client(args, store.nnz) as client:
            check_worker_memory(client, run, store)
            print(f"dashboard: {client.dashboard_link}", flush=True)
            report = contextlib.nullcontext()
            if args.report:
                from distributed import performance_report

                report = performance_report(filename=args.report)
            with report:
                model.fit(store, client, resume=args.resume, break_lease=args.break_lease)
        model.save(args.model, overwrite=args.overwrite)
    last = model.history_[-1]
    print(f"final objective {last['loss']:.6g}, train RMSE {last['train_rmse']:.4f}; model written to {args.model}")
    if args.plot:
        _plot(model.history_, args.plot)
    return 0


def _pyplot():
    """matplotlib's pyplot, drawing to files."""
    from blockals.errors import InputError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InputError("--plot needs matplotlib: pip install 'blockals[plot]'.") from exc
    return plt


def _plot(history: list[dict], path: Any) -> None:
    """The objective and training RMSE per iteration, as a PNG at ``path`` (or a binary file object)."""
    plt = _pyplot()
    it = [h["iteration"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(it, [h["loss"] for h in history], marker="o")
    left.set(xlabel="iteration", ylabel="objective", title="objective", yscale="log")
    right.plot(it, [h["train_rmse"] for h in history], marker="o", color="tab:orange")
    right.set(xlabel="iteration", ylabel="RMSE", title="training RMSE")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def _space(text: str | None) -> object:
    """``--space``: JSON text, or the path of a JSON or YAML file holding the space."""
    from blockals.errors import InputError

    if text is None:
        return None
    if text.endswith((".json", ".yaml", ".yml")):
        import yaml

        try:
            with open(text, encoding="utf-8") as fh:
                return yaml.safe_load(fh)  # YAML reads JSON too
        except OSError as exc:
            raise InputError(f"--space file {text} cannot be read: {exc.strerror}.") from None
        except yaml.YAMLError as exc:
            raise InputError(f"--space file {text} is not valid YAML or JSON ({exc.__class__.__name__}).") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--space is not valid JSON ({exc.msg} at character {exc.pos}) nor a .json/.yaml file.") from None


def _search(args: argparse.Namespace) -> int:
    import os

    import blockals
    from blockals.lock import Lease
    from blockals.modelio import check_model_path
    from blockals.search import plan

    kwargs = dict(implicit=args.implicit, metric=args.metric, validation=args.validation, min_iter=args.min_iter,
                  max_iter=args.max_iter, factor=args.factor, budget=args.budget, seed=args.seed)
    space = _space(args.space)
    plan(space, **kwargs)  # refused before the store is read or a cluster starts
    store = blockals.open_store(args.store)
    check_model_path(args.model)
    # The store's lease, which search takes, taken before the cluster starts.
    with Lease(args.model, "model", break_lease=args.break_lease), store.reading():
        with _client(args, store.nnz) as client:
            print(f"dashboard: {client.dashboard_link}", flush=True)
            result = blockals.search(store, space, client=client, **kwargs)
        result.best_model.save(args.model)
    if args.candidates:  # written whole, then renamed: never a half-written table
        partial = f"{args.candidates}.partial"
        result.candidates.to_csv(partial)
        os.replace(partial, args.candidates)
    print(f"best {result.metric} {result.best_score:.4f} on validation; model written to {args.model}")
    if args.plot:
        result.plot(args.plot)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import blockals
    from blockals.evaluation import evaluate
    from blockals.lock import holding

    model = blockals.ALS.load(args.model)
    train = blockals.open_store(args.train) if args.train else None
    test = blockals.open_store(args.test)
    # The leases evaluate takes, taken before the cluster starts.
    with holding(test.reading(), train.reading() if train else None), \
            _client(args, test.nnz + (train.nnz if train else 0)) as client:
        metrics = evaluate(model, test, train, k=args.k, relevance=args.relevance, client=client,
                           verbose=_verbose(args))
    for name, value in metrics.items():
        print(f"{name:>16} {value:.6g}" if isinstance(value, float) else f"{name:>16} {value}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(metrics, fh, indent=2)
    return 0


def _recommend(args: argparse.Namespace) -> int:
    import blockals

    model = blockals.ALS.load(args.model)
    if args.output:
        from blockals.formats import refuse_overlap
        from blockals.lock import Lease

        refuse_overlap({"--output": args.output}, {"the model's ratings store": model.store_path_})  # before a cluster
        # The output's lease (recommend_all takes it again), refused before the cluster starts.
        with Lease(args.output, "recommendations", breakable=False), _client(args) as client:
            model.recommend_all(args.n, args.output, exclude_seen=not args.include_seen, client=client,
                                side=args.side, format=args.format, verbose=_verbose(args))
        what = "items for every user" if args.side == "users" else "users for every item"
        print(f"top {args.n} {what} written to {args.output}")
        return 0
    if not args.users:
        raise blockals.InputError("recommend needs --users ID [ID ...] or --output PATH.")
    from blockals.factors import Factors

    # Command-line ids are text; the model reads them as its own id type.
    unknown = [user for user, row in zip(args.users, Factors.of(model).index(args.users, "users")) if row < 0]
    if unknown:
        raise blockals.InputError(
            f"--users: {len(unknown)} of the {len(args.users)} ids are not users of the model {args.model}, "
            f"the first being {unknown[0]!r}."
        )
    print(model.recommend(args.users, n=args.n, exclude_seen=not args.include_seen).to_string(index=False))
    return 0


def _info(args: argparse.Namespace) -> int:
    import blockals
    from blockals.formats import blockals_meta

    try:
        print(blockals.open_store(args.store).summary())
        return 0
    except blockals.StoreError as exc:
        if "incomplete" not in str(exc):
            raise
    meta = blockals_meta(args.store) or {}
    print(f"blockals ratings store {args.store}\n  format version {meta.get('format_version')}, INCOMPLETE: "
          f"its ingest did not finish, so it cannot be used; ingest again.")
    return 1


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the sentence naming the argument, and where
    the usage is) instead of the whole usage text followed by the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'.\n")


class _Version(argparse.Action):
    """``--version``: this version and those of the libraries that decide its results and
    speed, on one line (argparse's own action would wrap it to the terminal)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        found = versions()
        libs = ", ".join(f"{name} {v}" for name, v in found.items() if name != "blockals")
        print(f"blockals {found['blockals']} ({libs})")
        parser.exit()


# The libraries whose versions decide blockals' results and speed.
ENGINE = ("dask", "distributed", "zarr", "numba", "numpy")


def versions() -> dict[str, str]:
    """The versions of blockals and of the :data:`ENGINE` libraries."""
    from importlib.metadata import version

    import blockals

    return {"blockals": blockals.__version__, **{name: version(name) for name in ENGINE}}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="blockals",
        description="Train alternating least squares recommenders out-of-core on Dask.",
        epilog="Typical use: blockals ingest ratings.csv ratings.zarr && blockals split ratings.zarr train.zarr test.zarr "
               "&& blockals train train.zarr model.zarr && blockals evaluate model.zarr test.zarr --train train.zarr",
    )
    parser.add_argument("--log-level", default="WARNING",
                        help=f"logging level: {', '.join(params.LOG_LEVELS)} (default: WARNING)")
    parser.add_argument("--version", action=_Version, help="print the versions of blockals and its engine, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="partition a ratings source into a blocked Zarr store")
    p.add_argument("source", help="CSV/Parquet file, directory or glob, or a MovieLens file (u.data, ratings.dat, ratings.csv)")
    p.add_argument("store", help="path of the ratings store to write")
    p.add_argument("--user-col", default="user", help="user id column (default: user)")
    p.add_argument("--item-col", default="item", help="item id column (default: item)")
    p.add_argument("--rating-col", default="rating", help="rating column (default: rating)")
    p.add_argument("--timestamp-col", help="timestamp column to keep, for temporal splits")
    p.add_argument("--n-user-blocks", type=int, help="user blocks (default: from the data size)")
    p.add_argument("--n-item-blocks", type=int, help="item blocks (default: from the data size)")
    p.add_argument("--duplicates", default="error", choices=["error", "sum", "last", "mean"],
                   help="what repeated (user, item) pairs mean (default: error)")
    p.add_argument("--overwrite", action="store_true", help="replace a complete store at STORE")
    _add_progress_option(p, "the partitions or blocks of each pass")
    p.set_defaults(run=_ingest)

    p = sub.add_parser("split", help="split a store into train and test stores")
    p.add_argument("store")
    p.add_argument("train")
    p.add_argument("test")
    p.add_argument("--method", default="random", choices=["random", "leave_k_out", "ratio", "temporal"])
    p.add_argument("--fraction", type=float, default=0.2, help="test fraction (random, ratio, temporal)")
    p.add_argument("--k", type=int, default=1, help="ratings per user held out (leave_k_out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    _add_progress_option(p, "the partitions or blocks of each pass")
    p.set_defaults(run=_split)

    p = sub.add_parser("train", help="fit an ALS model on a ratings store")
    p.add_argument("store", help="ratings store written by 'blockals ingest'")
    p.add_argument("model", help="path of the model to write")
    params.add_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue from the last committed checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a complete model at MODEL")
    _add_progress_option(p, "the blocks of each iteration")
    p.add_argument("--report", help="write Dask's performance report (HTML) of the training here")
    p.add_argument("--plot", help="write the objective and RMSE curves (PNG) here; needs matplotlib")
    p.add_argument("--break-lease", action="store_true",
                   help="take over the model's and checkpoint's leases left on an object store by a training that "
                        "died (local leases of dead processes free themselves)")
    _add_cluster_options(p)
    p.set_defaults(run=_train)

    p = sub.add_parser("search", help="choose parameters on a validation split by successive halving; save the best model")
    p.add_argument("store", help="training ratings store (the test set stays out of it)")
    p.add_argument("model", help="path of the best model, refitted on every rating of STORE")
    p.add_argument("--space", help='parameter values to try, as JSON (\'{"rank": [8, 16], "reg": [0.05, 0.1]}\') or '
                                   "a .json/.yaml file (default: blockals.search.DEFAULT_SPACES)")
    p.add_argument("--implicit", action="store_true", help="search implicit-feedback models")
    p.add_argument("--metric", help="rmse, mae, auc, precision@k, recall@k, ndcg@k or map@k (default: rmse; ndcg@10 implicit)")
    p.add_argument("--validation", type=float, default=0.1, help="fraction of ratings held out to score candidates (default: 0.1)")
    p.add_argument("--min-iter", type=int, default=3, help="iterations of every candidate before the first cut (default: 3)")
    p.add_argument("--max-iter", type=int, default=20, help="iterations the best candidate reaches (default: 20)")
    p.add_argument("--factor", type=int, default=3, help="keep the best 1/FACTOR of each rung (default: 3)")
    p.add_argument("--budget", type=int, help="at most this many iterations, summed over candidates (default: no cap)")
    p.add_argument("--seed", type=int, default=0, help="seeds the validation split and the candidates (default: 0)")
    p.add_argument("--candidates", help="write every candidate's parameters and scores here (CSV)")
    p.add_argument("--plot", help="write the validation metric against iterations (PNG) here; needs matplotlib")
    p.add_argument("--break-lease", action="store_true", help="take over the model's lease left on an object store by a dead search")
    _add_cluster_options(p)
    p.set_defaults(run=_search)

    p = sub.add_parser("evaluate", help="rating and ranking metrics of a model on a test store")
    p.add_argument("model")
    p.add_argument("test", help="test store (from 'blockals split')")
    p.add_argument("--train", help="training store: its items are not ranking candidates")
    p.add_argument("--k", type=int, default=10, help="cut-off of the ranking metrics (default: 10)")
    p.add_argument("--relevance", type=float, default=0.0, help="test ratings above this are relevant (default: 0)")
    p.add_argument("--json", help="also write the metrics as JSON here")
    _add_progress_option(p, "the blocks of the test store")
    _add_cluster_options(p)
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("recommend", help="top-n items for some users, or for every user into a store")
    p.add_argument("model")
    p.add_argument("--users", nargs="+", help="user ids to print recommendations for")
    p.add_argument("--output", help="write recommendations for every user to this Zarr store, or Parquet "
                   "dataset when it ends in .parquet")
    p.add_argument("--format", choices=("zarr", "parquet"), help="the --output format (default: by its suffix)")
    p.add_argument("--side", choices=("users", "items"), default="users",
                   help="with --output: items for every user (default), or users for every item")
    p.add_argument("--n", type=int, default=10, help="items per user (default: 10)")
    p.add_argument("--include-seen", action="store_true", help="do not exclude items rated in training")
    _add_progress_option(p, "the blocks, with --output")
    _add_cluster_options(p)
    p.set_defaults(run=_recommend)

    p = sub.add_parser("info", help="describe a ratings store: sizes, block balance, format, completeness")
    p.add_argument("store")
    p.set_defaults(run=_info)
    return parser


# What each command writes, as (argument, how refusals name it, "file" or "directory" for a
# store): checked writable before the command reads or trains anything.
OUTPUTS = {
    "ingest": (("store", "store path", "directory"),),
    "split": (("train", "train store path", "directory"), ("test", "test store path", "directory")),
    "train": (("model", "model path", "directory"), ("report", "--report", "file"), ("plot", "--plot", "file")),
    "evaluate": (("json", "--json", "file"),),
    "recommend": (("output", "--output", "directory"),),
    "search": (("model", "model path", "directory"),),
}
# What each command reads that its outputs must stay apart from, as (argument, how
# refusals name it); the recommendations' ratings store is checked once the model names it.
INPUTS = {
    "ingest": (("source", "the source"),),
    "split": (("store", "the input store"),),
    "train": (("store", "the ratings store"),),
    "recommend": (("model", "the model"),),
    "search": (("store", "the ratings store"),),
}


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse what argparse lets through and a command would trip on late: the log level,
    the scheduler's address, paths that cannot be written and numbers out of range."""
    level = params.parse_log_level(args.log_level, "--log-level")
    logging.basicConfig(level=level, format="%(message)s")
    if getattr(args, "scheduler", None):
        params.parse_address(args.scheduler, "--scheduler")
    if getattr(args, "dashboard_address", None) is not None:
        params.parse_dashboard_address(args.dashboard_address, "--dashboard-address")
    outputs = {}
    for dest, name, kind in OUTPUTS.get(args.command, ()):
        if getattr(args, dest):
            params.parse_output_path(getattr(args, dest), name, kind)
            outputs[name if name.startswith("--") else f"the {name}"] = getattr(args, dest)
    if outputs:
        from blockals.formats import refuse_overlap
        from blockals.sources import source_paths

        refuse_overlap(outputs, {name: source_paths(getattr(args, dest)) for dest, name in INPUTS.get(args.command, ())})
    # Checked again by the calls they feed, but only once a store is read or a cluster started.
    if args.command == "split":
        from blockals.evaluation import parse_split_params

        parse_split_params(args.method, args.fraction, args.k, args.seed, prefix="--")
    elif args.command == "evaluate":
        params.parse_int(args.k, "--k", 1)
        params.parse_float(args.relevance, "--relevance", float("-inf"))
    elif args.command == "recommend":
        params.parse_int(args.n, "--n", 1)
        if args.users and args.output:  # one would be ignored
            raise InputError("recommend takes --users (print those users' items) or --output (write every "
                             "user's), not both.")
        if args.output:
            from blockals.recommend import parse_format

            parse_format(args.output, args.format)


def internal_error(prog: str, argv: Sequence[str] | None = None) -> int:
    """Report the exception being handled as a bug, in one line on stderr, with its traceback
    written to a log file whose path that line gives; returns the exit status, 1."""
    import tempfile
    import traceback

    exc = sys.exc_info()[1]
    fd, path = tempfile.mkstemp(prefix=f"{prog}-error-", suffix=".log")
    with open(fd, "w", encoding="utf-8") as fh:
        fh.write(f"{prog} {' '.join(sys.argv[1:] if argv is None else argv)}\n\n{traceback.format_exc()}")
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0]}" if str(exc) else type(exc).__name__
    print(f"{prog}: internal error ({reason}), not a problem with the input; the details are in {path}",
          file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    from blockals.errors import BlockalsError

    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        return args.run(args)
    except BlockalsError as exc:
        print(f"blockals: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blockals: interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug: one line here, the traceback in a file
        return internal_error("blockals", argv)


if __name__ == "__main__":
    sys.exit(main())
