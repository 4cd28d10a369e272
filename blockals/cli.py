"""The ``blockals`` command line: ingest, train, info.

Every subcommand wraps the Python API with the same parameter names (dashes for
underscores). Bad input ends with one sentence on stderr and exit status 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def _ingest(args: argparse.Namespace) -> int:
    import blockals

    store = blockals.ingest(
        args.source,
        args.store,
        user_col=args.user_col,
        item_col=args.item_col,
        rating_col=args.rating_col,
        n_user_blocks=args.n_user_blocks,
        n_item_blocks=args.n_item_blocks,
        duplicates=args.duplicates,
        overwrite=args.overwrite,
    )
    print(store.summary())
    return 0


def _train(args: argparse.Namespace) -> int:
    import blockals
    from blockals.engine import connect

    store = blockals.open_store(args.store)
    model = blockals.ALS(
        rank=args.rank,
        max_iter=args.max_iter,
        reg=args.reg,
        reg_scaling=args.reg_scaling,
        seed=args.seed,
        dtype=args.dtype,
        checkpoint_interval=args.checkpoint_interval,
        verbose=True,
    )
    client = None
    if args.scheduler:
        from distributed import Client

        client = Client(args.scheduler)
    with connect(client) as c:
        print(f"dashboard: {c.dashboard_link}", flush=True)
        model.fit(store, c, resume=args.resume)
    model.save(args.model)
    last = model.history_[-1]
    print(f"final objective {last['loss']:.6g}, train RMSE {last['train_rmse']:.4f}; model written to {args.model}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import blockals

    print(blockals.open_store(args.store).summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockals",
        description="Train alternating least squares recommenders out-of-core on Dask.",
        epilog="Typical use: blockals ingest ratings.csv ratings.zarr && blockals train ratings.zarr model.zarr",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="partition a ratings source into a blocked Zarr store")
    p.add_argument("source", help="CSV/Parquet file, directory or glob, or a MovieLens file (u.data, ratings.dat, ratings.csv)")
    p.add_argument("store", help="path of the ratings store to write")
    p.add_argument("--user-col", default="user", help="user id column (default: user)")
    p.add_argument("--item-col", default="item", help="item id column (default: item)")
    p.add_argument("--rating-col", default="rating", help="rating column (default: rating)")
    p.add_argument("--n-user-blocks", type=int, help="user blocks (default: from the data size)")
    p.add_argument("--n-item-blocks", type=int, help="item blocks (default: from the data size)")
    p.add_argument("--duplicates", default="error", choices=["error", "sum", "last", "mean"],
                   help="what repeated (user, item) pairs mean (default: error)")
    p.add_argument("--overwrite", action="store_true", help="replace a complete store at STORE")
    p.set_defaults(run=_ingest)

    p = sub.add_parser("train", help="fit an ALS model on a ratings store")
    p.add_argument("store", help="ratings store written by 'blockals ingest'")
    p.add_argument("model", help="path of the model to write")
    p.add_argument("--rank", type=int, default=10, help="latent factors (default: 10)")
    p.add_argument("--max-iter", type=int, default=10, help="iterations (default: 10)")
    p.add_argument("--reg", type=float, default=0.1, help="regularization λ (default: 0.1)")
    p.add_argument("--reg-scaling", default="count", choices=["count", "none"],
                   help="multiply λ by each row's rating count, as Spark does (default: count)")
    p.add_argument("--seed", type=int, default=0, help="initialization seed (default: 0)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="factor precision")
    p.add_argument("--checkpoint-interval", type=int, default=1, help="checkpoint every N iterations; 0 disables")
    p.add_argument("--resume", action="store_true", help="continue from the last committed checkpoint")
    p.add_argument("--scheduler", help="address of a running Dask scheduler (default: start a LocalCluster)")
    p.set_defaults(run=_train)

    p = sub.add_parser("info", help="describe a ratings store: sizes, block balance, format, completeness")
    p.add_argument("store")
    p.set_defaults(run=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from blockals.errors import BlockalsError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s")
    try:
        return args.run(args)
    except BlockalsError as exc:
        print(f"blockals: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blockals: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
