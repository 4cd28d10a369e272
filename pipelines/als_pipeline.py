"""The blockals pipeline: ingest -> split -> train -> evaluate -> recommend, on a Dask cluster.

Every stage reads and writes stores under ``--data`` (``ratings.zarr``, ``train.zarr``,
``test.zarr``, ``model.zarr``, ``metrics.json``, ``recommendations.zarr``; a local directory or
an ``s3://`` URL), so any stage
can be rerun alone (``--stages train,evaluate``) and training resumes from its checkpoint
(``--resume``). Parameters come from a YAML file (``pipelines/configs/``: explicit,
biased, implicit) and flags override them. A config whose ``search`` section has
``enabled: true`` runs the ``search`` stage instead of ``train``: :func:`blockals.search`
on ``train.zarr``, the best model saved as ``model.zarr``, every candidate in ``search.csv``.

With no arguments it runs the embedded default: a synthetic MovieLens-shaped data set
(943 users x 1682 items, ~100k half-star ratings, made locally from a seed) under
``storage/data/demo/``, on a LocalCluster started for the run, with Spark's explicit
objective. It prints the dashboard link first and a summary table last.

    python pipelines/als_pipeline.py
    python pipelines/als_pipeline.py --config pipelines/configs/implicit.yaml --rank 64
    python pipelines/als_pipeline.py --source ratings.csv --data out/ --scheduler tcp://10.0.0.5:8786
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "pipelines" / "configs"
DEFAULT_DATA = ROOT / "storage" / "data" / "demo"
STAGES = ("ingest", "split", "search", "train", "evaluate", "recommend")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from blockals.cli import Parser

    p = Parser(prog="als_pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(CONFIGS / "explicit.yaml"), help="YAML parameters (default: explicit.yaml)")
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="directory or fsspec URL (s3://bucket/prefix) of the stages' stores; "
                        "credentials come from the environment (AWS_* variables for S3)")
    p.add_argument("--source", help="ratings to ingest (default: the config's, else the synthetic set)")
    p.add_argument("--stages", help=f"comma-separated subset of {', '.join(STAGES)} (default: all but search, or all "
                                    f"but train when the config's search section has enabled: true)")
    p.add_argument("--rank", type=int)
    p.add_argument("--max-iter", type=int)
    p.add_argument("--reg", type=float)
    p.add_argument("--resume", action="store_true", help="continue training from its last checkpoint")
    p.add_argument("--scheduler", default=os.environ.get("DASK_SCHEDULER_ADDRESS") or None,
                   help="attach to this scheduler (default: $DASK_SCHEDULER_ADDRESS, else start a cluster)")
    p.add_argument("--cluster", choices=["local", "kubernetes"], default="local",
                   help="the cluster to start when no scheduler is given")
    p.add_argument("--n-workers", type=int, default=2, help="workers of a Kubernetes cluster started here")
    p.add_argument("--dashboard-address", default="127.0.0.1:8787",
                   help="where a started LocalCluster serves its dashboard (default: loopback only; it has no authentication)")
    p.add_argument("--tls-ca-file", help="TLS for the Dask comm: the CA certificate (PEM) that signed the cluster's certificates")
    p.add_argument("--tls-cert", help="TLS: this client's certificate (PEM), also used by a started LocalCluster")
    p.add_argument("--tls-key", help="TLS: the certificate's private key (PEM), unless --tls-cert holds it")
    return p.parse_args(argv)


def config_keys() -> dict[str, list[str]]:
    """The keys each YAML section takes: the parameters of the API call it feeds."""
    import inspect

    import blockals
    from blockals import params
    from blockals.evaluation import evaluate, split

    def keywords(fn, *skip: str) -> list[str]:
        return [name for name in inspect.signature(fn).parameters if name not in skip]

    return {
        "data": ["source"] + keywords(blockals.ingest, "source", "path", "overwrite", "storage_options", "like"),
        "split": keywords(split, "store", "train_path", "test_path", "overwrite"),
        "model": [p.name for p in params.PARAMS if p.cli],
        "evaluate": keywords(evaluate, "model", "test", "train", "client"),
        "recommend": ["n"],
        # Opt-in: with enabled: true, the search stage replaces train, saving the best model.
        "search": ["enabled"] + keywords(blockals.search, "store", "client", "verbose", "storage_options"),
    }


def load_config(args: argparse.Namespace) -> dict:
    """The YAML file's sections, flags applied, every key checked against what it feeds."""
    import yaml

    from blockals.errors import InputError
    from blockals.params import check_keys, parse_params
    from blockals.search import plan

    try:
        with open(args.config, encoding="utf-8") as fh:
            config = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise InputError(f"config file {args.config} cannot be read: {exc.strerror}.") from exc
    except yaml.YAMLError as exc:
        raise InputError(f"config file {args.config} is not valid YAML ({exc.__class__.__name__}).") from exc
    if not isinstance(config, dict):
        raise InputError(f"config file {args.config} must hold sections ({', '.join(config_keys())}).")
    keys = config_keys()
    check_keys(config, keys, f"{args.config}: unknown section {{key}}")
    for section, known in keys.items():
        config.setdefault(section, {})
        if not isinstance(config[section], dict):
            raise InputError(f"section {section!r} of {args.config} must hold keys and values.")
        check_keys(config[section], known, f"{args.config}: unknown key {{key}} in section {section!r}")
    for flag in ("rank", "max_iter", "reg"):
        if getattr(args, flag) is not None:
            config["model"][flag] = getattr(args, flag)
    if args.source:
        config["data"]["source"] = args.source
    parse_params(config["model"])  # refused here, before a cluster starts or a stage runs
    plan(**search_arguments(config))
    return config


def search_arguments(config: dict) -> dict:
    """blockals.search's keyword arguments from the search section (implicit: the model's, unless given)."""
    return {"implicit": config["model"].get("implicit", False),
            **{k: v for k, v in config["search"].items() if k != "enabled"}}


def connect_cluster(args: argparse.Namespace):
    """A context giving the client: an existing scheduler, Kubernetes, or a LocalCluster."""
    from blockals.cluster import connect
    from blockals.errors import InputError
    from blockals.tls import TLSFiles

    tls = TLSFiles.parse(args.tls_ca_file, args.tls_cert, args.tls_key)
    security = tls.security() if tls else None
    if args.scheduler:
        return connect(scheduler=args.scheduler, security=security)
    if args.cluster == "kubernetes":
        if tls:
            raise InputError("--tls-* options apply to --scheduler and local clusters; the Kubernetes operator "
                             "configures a cluster's TLS in its manifests.")
        try:
            from dask_kubernetes.operator import KubeCluster
        except ImportError as exc:
            raise InputError("--cluster kubernetes needs dask-kubernetes: pip install 'blockals[kubernetes]'.") from exc
        from distributed import Client

        cluster = KubeCluster(name="blockals", n_workers=args.n_workers)
        return connect(Client(cluster))
    return connect(dashboard_address=args.dashboard_address, security=security)


def main(argv: list[str] | None = None) -> int:
    import fsspec

    import blockals
    from blockals.evaluation import evaluate, split

    args = parse_args(argv)
    config = load_config(args)
    searching = config["search"].get("enabled", False) is True
    default = [s for s in STAGES if s != ("train" if searching else "search")]
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else default
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise blockals.InputError(f"--stages has {unknown[0]!r}; stages are {', '.join(STAGES)}.")
    data = args.data.rstrip("/")
    if "://" not in data:
        Path(data).mkdir(parents=True, exist_ok=True)
    paths = {name: f"{data}/{name}" for name in ("ratings.zarr", "train.zarr", "test.zarr", "model.zarr", "recommendations.zarr")}
    summary: list[tuple[str, float, str]] = []

    def timed(stage: str, fn, describe) -> object:
        t = time.perf_counter()
        out = fn()
        summary.append((stage, time.perf_counter() - t, describe(out)))
        return out

    with connect_cluster(args) as client:
        print(f"Dask dashboard: {client.dashboard_link}", flush=True)
        if "ingest" in stages:
            d = dict(config["data"])
            source = d.pop("source", None)
            if source is None:
                source = blockals.datasets.movielens_like(seed=config["split"].get("seed", 0))
                print(f"synthetic MovieLens-shaped data: {len(source):,} ratings")
            store = timed("ingest", lambda: blockals.ingest(source, paths["ratings.zarr"], overwrite=True, **d),
                          lambda s: f"{s.nnz:,} ratings, {s.n_users:,} users x {s.n_items:,} items, "
                                    f"{s.n_user_blocks}x{s.n_item_blocks} blocks")
            print(store.summary(), flush=True)
        if "split" in stages:
            timed("split", lambda: split(blockals.open_store(paths["ratings.zarr"]), paths["train.zarr"],
                                         paths["test.zarr"], overwrite=True, **config["split"]),
                  lambda tt: f"{tt[0].nnz:,} train / {tt[1].nnz:,} test ratings")
        train = blockals.open_store(paths["train.zarr"]) if {"search", "train", "evaluate"} & set(stages) else None
        if "search" in stages:
            result = timed("search", lambda: blockals.search(train, client=client, **search_arguments(config)),
                           lambda r: f"{len(r.candidates)} candidates, best {r.metric} {r.best_score:.4f} on validation "
                                     f"with {', '.join(f'{k}={v}' for k, v in r.best_params.items())}")
            result.best_model.save(paths["model.zarr"])
            with fsspec.open(f"{data}/search.csv", "w") as fh:
                fh.write(result.candidates.to_csv())
        if "train" in stages:
            model = timed("train", lambda: blockals.ALS(**config["model"], verbose=True).fit(train, client, resume=args.resume),
                          lambda m: f"objective {m.history_[-1]['loss']:.6g}, train RMSE {m.history_[-1]['train_rmse']:.4f}")
            model.save(paths["model.zarr"])
        model = blockals.ALS.load(paths["model.zarr"]) if {"evaluate", "recommend"} & set(stages) else None
        if "evaluate" in stages:
            test = blockals.open_store(paths["test.zarr"])
            metrics = timed("evaluate", lambda: evaluate(model, test, train, client=client, **config["evaluate"]),
                            lambda m: ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))
            with fsspec.open(f"{data}/metrics.json", "w") as fh:
                fh.write(json.dumps(metrics, indent=2))
        if "recommend" in stages:
            timed("recommend", lambda: model.recommend_all(config["recommend"].get("n", 10), paths["recommendations.zarr"], client=client),
                  lambda path: f"top {config['recommend'].get('n', 10)} for every user in {path}")
    print("\n| stage | seconds | result |\n|---|---|---|")
    for stage, seconds, text in summary:
        print(f"| {stage} | {seconds:.1f} | {text} |")
    print(f"\noutputs in {data}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # one sentence for known bad input, as the CLI does
        from blockals.errors import BlockalsError

        if isinstance(exc, BlockalsError):
            print(f"als_pipeline: error: {exc}", file=sys.stderr)
            sys.exit(2)
        raise
