"""The blockals pipeline: ingest -> split -> train -> evaluate -> recommend, on a Dask cluster.

Every stage reads and writes stores under ``--data`` (``ratings.zarr``, ``train.zarr``,
``test.zarr``, ``model.zarr``, ``recommendations.zarr``; a local directory or an ``s3://``
URL), so any stage can be rerun alone (``--stages train,evaluate``). The evaluate stage
writes ``metrics.json`` (the metrics, every parameter, the versions and the per-iteration
history), ``loss.png`` (with matplotlib installed) and ``report.html`` (all of it on one page).
``--resume`` continues an earlier run in ``--data``: ingest and split are skipped when
``pipeline.json`` records that they completed with the same inputs (the source's files by
path, size and modification time, and the stage's parameters) and their stores are still
the ones they wrote, and training resumes from its checkpoint, which must then be of the
same parameters. Parameters come from a YAML file (``pipelines/configs/``: explicit,
biased, implicit) and flags override them. A config whose ``search`` section has
``enabled: true`` runs the ``search`` stage instead of ``train``: :func:`blockals.search`
on ``train.zarr``, the best model saved as ``model.zarr``, every candidate in ``search.csv``.
A run holds an exclusive lease on ``--data`` (:mod:`blockals.lock`): a second pipeline on
the same directory is refused with one sentence before it reads or writes anything there.
Every value is checked before a cluster starts or a stage runs; bad input ends with one
sentence and exit status 2.

With no arguments it runs the embedded default: a synthetic MovieLens-shaped data set
(943 users x 1682 items, ~100k half-star ratings, made locally from a seed) under
``storage/data/demo/``, on a LocalCluster started for the run, with Spark's explicit
objective. It prints the dashboard link first and a summary table last; between them, each
stage's passes (training's iterations) a line each with its duration, and with
``--progress`` their partitions or blocks on stderr (a bar on a terminal, lines in a log).

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
    p.add_argument("--resume", action="store_true",
                   help="continue an earlier run in --data: skip ingest and split where unchanged, resume training "
                        "from its checkpoint")
    p.add_argument("--progress", action="store_true",
                   help="progress over the partitions or blocks of each stage's passes: a bar on a terminal, "
                        "lines in a log")
    p.add_argument("--scheduler", default=os.environ.get("DASK_SCHEDULER_ADDRESS") or None,
                   help="attach to this scheduler (default: $DASK_SCHEDULER_ADDRESS, else start a cluster)")
    p.add_argument("--cluster", choices=["local", "kubernetes"], default="local",
                   help="the cluster to start when no scheduler is given")
    p.add_argument("--n-workers", type=int, default=2, help="workers of a Kubernetes cluster started here")
    p.add_argument("--image", help="image of a Kubernetes cluster started here (default: blockals:<version>, "
                                    "as deploy/README.md builds it)")
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
        # verbose is --progress's: where the run's output goes, not what it computes.
        "data": ["source"] + keywords(blockals.ingest, "source", "path", "overwrite", "storage_options", "like",
                                      "verbose"),
        "split": keywords(split, "store", "train_path", "test_path", "overwrite", "verbose"),
        "model": [p.name for p in params.PARAMS if p.cli],
        "evaluate": keywords(evaluate, "model", "test", "train", "client", "verbose"),
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
    # Every value, refused here, before a cluster starts or a stage runs.
    try:
        parse_params(config["model"])
        check_values(config)
        plan(**search_arguments(config))
    except InputError as exc:
        raise InputError(f"{args.config}: {exc}") from None
    return config


def search_arguments(config: dict) -> dict:
    """blockals.search's keyword arguments from the search section (implicit: the model's, unless given)."""
    return {"implicit": config["model"].get("implicit", False),
            **{k: v for k, v in config["search"].items() if k != "enabled"}}


def value_checks() -> dict[str, dict]:
    """How each key's value is checked, for the sections other than ``model`` and ``split``
    (whose calls have their own validators): ``check(value, name)`` raises
    :class:`~blockals.errors.InputError` naming it."""
    from blockals.errors import InputError
    from blockals.ingest import DUPLICATE_POLICIES
    from blockals.params import parse_choice, parse_float, parse_int

    def text(value, name):
        if value is not None and not isinstance(value, str):
            raise InputError(f"{name} must be a string, got {value!r}.")

    def optional_int(value, name):
        if value is not None:
            parse_int(value, name, 1)

    return {
        "data": {"source": text, "user_col": text, "item_col": text, "rating_col": text, "timestamp_col": text,
                 "n_user_blocks": optional_int, "n_item_blocks": optional_int, "block_budget": optional_int,
                 "duplicates": lambda value, name: parse_choice(value, name, DUPLICATE_POLICIES)},
        "evaluate": {"k": lambda value, name: parse_int(value, name, 1),
                     "relevance": lambda value, name: parse_float(value, name, -float("inf"))},
        "recommend": {"n": lambda value, name: parse_int(value, name, 1)},
    }


def check_values(config: dict) -> None:
    """Check every value of the sections other than ``model`` with the validators of the
    API calls they feed, each refusal naming ``section.key``."""
    from blockals.evaluation import parse_split_params

    for section, checks in value_checks().items():
        for key, value in config[section].items():
            checks[key](value, f"{section}.{key}")
    parse_split_params(**config["split"], prefix="split.")


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
        from blockals.cluster import kubernetes_client

        return kubernetes_client(n_workers=args.n_workers, image=args.image)
    return connect(dashboard_address=args.dashboard_address, security=security)


MANIFEST = "pipeline.json"  # under --data: what each finished stage read and wrote, for --resume


def source_identity(source: str | None, seed: int) -> dict:
    """What identifies the ratings ingest reads: each file's path, size and modification
    time (an object store's ETag), or the seed of the synthetic set."""
    import fsspec

    if source is None:
        return {"synthetic": "movielens_like", "seed": seed}
    fs, path = fsspec.core.url_to_fs(source)
    files = []
    for name in sorted(fs.expand_path(path, recursive=True)):
        info = fs.info(name)
        if info["type"] == "file":
            files.append([name, info.get("size"), str(info.get("mtime") or info.get("ETag") or info.get("LastModified"))])
    return {"source": source, "files": files}


class Manifest:
    """``pipeline.json`` under --data: per stage, the inputs it ran with and the ids of the
    stores it completed, written after the stage. A stage is unchanged when its inputs
    are equal and each of its stores still opens complete with the recorded id (a store
    rewritten since, even at the same path, gets a new id)."""

    def __init__(self, data: str) -> None:
        self.path = f"{data}/{MANIFEST}"
        self.records: dict | None = None

    def read(self) -> Manifest:
        import fsspec

        from blockals.errors import InputError

        fs, path = fsspec.core.url_to_fs(self.path)
        if fs.exists(path):
            try:
                self.records = json.loads(fs.cat_file(path))
            except ValueError:
                raise InputError(f"{self.path} is not valid JSON; delete it and run without --resume.") from None
        return self

    def unchanged(self, stage: str, inputs: dict, paths: dict[str, str]) -> bool:
        record = (self.records or {}).get(stage)
        if not isinstance(record, dict) or record.get("inputs") != json.loads(json.dumps(inputs)):
            return False
        return all(store_id(paths[name]) == recorded for name, recorded in record.get("outputs", {}).items())

    def record(self, stage: str, inputs: dict, outputs: dict[str, str]) -> None:
        import fsspec

        self.records = {**(self.records or {}), stage: {"inputs": inputs, "outputs": outputs}}
        with fsspec.open(self.path, "w") as fh:
            fh.write(json.dumps(self.records, indent=2))


def main(argv: list[str] | None = None) -> int:
    import blockals
    from blockals.formats import resolve
    from blockals.lock import Lease
    from blockals.params import parse_address, parse_dashboard_address, parse_int, parse_output_path

    args = parse_args(argv)
    config = load_config(args)
    searching = config["search"].get("enabled", False) is True
    default = [s for s in STAGES if s != ("train" if searching else "search")]
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else default
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise blockals.InputError(f"--stages has {unknown[0]!r}; stages are {', '.join(STAGES)}.")
    if args.scheduler:
        parse_address(args.scheduler, "--scheduler")
    parse_dashboard_address(args.dashboard_address, "--dashboard-address")
    parse_int(args.n_workers, "--n-workers", 1)
    # Resolved here, so workers started elsewhere write where the caller meant.
    data = resolve(parse_output_path(args.data.rstrip("/"), "--data", "directory"))
    # Every store under --data is this run's: a second pipeline on the directory is
    # refused before it reads the manifest or starts a cluster.
    with Lease(data, "pipeline data directory", breakable=False):
        return run(args, config, stages, data)


def run(args: argparse.Namespace, config: dict, stages: list[str], data: str) -> int:
    """The stages, in --data, whose lease the caller holds."""
    import fsspec
    import numpy as np
    from distributed.system import MEMORY_LIMIT

    import blockals
    from blockals.evaluation import evaluate, split
    from blockals.formats import refuse_overlap
    from blockals.params import ALSConfig, check_solve_memory
    from blockals.training import preflight

    paths = {name: f"{data}/{name}" for name in ("ratings.zarr", "train.zarr", "test.zarr", "model.zarr", "recommendations.zarr")}
    local = not args.scheduler and args.cluster == "local"
    verbose = 2 if args.progress else 1  # a line per pass and iteration; with --progress, their tasks too

    # What each stage will do, decided before a cluster starts: with --resume, ingest and
    # split are skipped when their inputs and complete outputs are as recorded.
    d = dict(config["data"])
    source = d.pop("source", None)
    if "ingest" in stages and source is not None:
        from blockals.sources import read_source, source_paths

        refuse_overlap({f"--data's {name}": path for name, path in paths.items()}, {"the source": source_paths(source)})
        read_source(source, d.get("user_col", "user"), d.get("item_col", "item"), d.get("rating_col", "rating"),
                    d.get("timestamp_col"))  # a missing or unreadable source, refused before the stages
    manifest = Manifest(data).read()
    if args.resume and manifest.records is None and {"ingest", "split"} & set(stages):
        raise blockals.InputError(f"--resume: {data} holds no earlier run of this pipeline (no {MANIFEST}); "
                                  f"run without --resume to start.")
    ingest_inputs = {"source": source_identity(source, config["split"].get("seed", 0)), "data": d} if (
        "ingest" in stages) else None
    skip_ingest = args.resume and ingest_inputs is not None and manifest.unchanged("ingest", ingest_inputs, paths)
    ratings_rewritten = "ingest" in stages and not skip_ingest
    skip_split = (args.resume and "split" in stages and not ratings_rewritten
                  and manifest.unchanged("split", {"split": config["split"], "ratings": store_id(paths["ratings.zarr"])},
                                         paths))
    train_rewritten = "split" in stages and not skip_split
    resume_train = args.resume and not train_rewritten
    if "train" in stages and resume_train:
        # The training store stays: resuming is checked in full (a checkpoint of these parameters).
        preflight(blockals.ALS(**config["model"]).get_params(), blockals.open_store(paths["train.zarr"]), resume=True,
                  local=local)
    elif "train" in stages and local:  # the store is still to be written: what its size cannot change
        cfg = ALSConfig.parse(**config["model"])
        check_solve_memory(cfg.rank, cfg.objective(0.0).width, np.dtype(cfg.dtype).itemsize, 0, MEMORY_LIMIT,
                           "this machine's memory")
    if "://" not in data:
        Path(data).mkdir(parents=True, exist_ok=True)
    summary: list[tuple[str, float, str]] = []

    def timed(stage: str, fn, describe) -> object:
        t = time.perf_counter()
        out = fn()
        summary.append((stage, time.perf_counter() - t, describe(out)))
        return out

    def skipped(stage: str, why: str) -> None:
        print(f"{stage}: {why}; skipped (--resume)", flush=True)
        summary.append((stage, 0.0, "skipped: " + why))

    with connect_cluster(args) as client:
        print(f"Dask dashboard: {client.dashboard_link}", flush=True)
        if skip_ingest:
            skipped("ingest", f"{paths['ratings.zarr']} is complete and its source and parameters are unchanged")
        elif "ingest" in stages:
            if args.resume:
                print("ingest: its source, parameters or store changed since the recorded run; ingesting again",
                      flush=True)
            if source is None:
                source = blockals.datasets.movielens_like(seed=config["split"].get("seed", 0))
                print(f"synthetic MovieLens-shaped data: {len(source):,} ratings")
            store = timed("ingest", lambda: blockals.ingest(source, paths["ratings.zarr"], overwrite=True, verbose=verbose, **d),
                          lambda s: f"{s.nnz:,} ratings, {s.n_users:,} users x {s.n_items:,} items, "
                                    f"{s.n_user_blocks}x{s.n_item_blocks} blocks")
            manifest.record("ingest", ingest_inputs, {"ratings.zarr": store.store_id})
            print(store.summary(), flush=True)
        if skip_split:
            skipped("split", f"{paths['train.zarr']} and {paths['test.zarr']} are complete and unchanged")
        elif "split" in stages:
            if args.resume:
                print("split: its ratings or parameters changed since the recorded run; splitting again", flush=True)
            ratings = blockals.open_store(paths["ratings.zarr"])
            tt = timed("split", lambda: split(ratings, paths["train.zarr"], paths["test.zarr"], overwrite=True,
                                              verbose=verbose, **config["split"]),
                       lambda tt: f"{tt[0].nnz:,} train / {tt[1].nnz:,} test ratings")
            manifest.record("split", {"split": config["split"], "ratings": ratings.store_id},
                            {"train.zarr": tt[0].store_id, "test.zarr": tt[1].store_id})
        train = blockals.open_store(paths["train.zarr"]) if {"search", "train", "evaluate"} & set(stages) else None
        if "search" in stages:
            result = timed("search", lambda: blockals.search(train, client=client, **search_arguments(config)),
                           lambda r: f"{len(r.candidates)} candidates, best {r.metric} {r.best_score:.4f} on validation "
                                     f"with {', '.join(f'{k}={v}' for k, v in r.best_params.items())}")
            result.best_model.save(paths["model.zarr"], overwrite=True)
            with fsspec.open(f"{data}/search.csv", "w") as fh:
                fh.write(result.candidates.to_csv())
        if "train" in stages:
            if args.resume and not resume_train:
                print("train: the training store was written again, so training starts from iteration 1", flush=True)
            model = timed("train", lambda: blockals.ALS(**config["model"], verbose=verbose).fit(train, client, resume=resume_train),
                          lambda m: f"objective {m.history_[-1]['loss']:.6g}, train RMSE {m.history_[-1]['train_rmse']:.4f}")
            model.save(paths["model.zarr"], overwrite=True)
        model = blockals.ALS.load(paths["model.zarr"]) if {"evaluate", "recommend"} & set(stages) else None
        if "evaluate" in stages:
            test = blockals.open_store(paths["test.zarr"])
            metrics = timed("evaluate", lambda: evaluate(model, test, train, client=client, verbose=verbose,
                                                            **config["evaluate"]),
                            lambda m: ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))
            write_outputs(data, config, metrics, model.history_)
        if "recommend" in stages:
            timed("recommend", lambda: model.recommend_all(config["recommend"].get("n", 10), paths["recommendations.zarr"],
                                                           client=client, verbose=verbose),
                  lambda path: f"top {config['recommend'].get('n', 10)} for every user in {path}")
    print("\n| stage | seconds | result |\n|---|---|---|")
    for stage, seconds, text in summary:
        print(f"| {stage} | {seconds:.1f} | {text} |")
    print(f"\noutputs in {data}")
    return 0


def write_outputs(data: str, config: dict, metrics: dict, history: list[dict]) -> None:
    """metrics.json (the metrics, every parameter of every stage, the versions and the
    history), loss.png (when matplotlib is installed) and report.html (all of it on one
    page, the plot inline) in ``data``."""
    import base64
    import html
    import io

    import fsspec

    from blockals.cli import _plot, versions
    from blockals.errors import InputError

    record = {**metrics, "parameters": config, "versions": versions(), "history": history}
    with fsspec.open(f"{data}/metrics.json", "w") as fh:
        fh.write(json.dumps(record, indent=2, default=str))
    png = io.BytesIO()
    try:
        _plot(history, png)
    except InputError:  # matplotlib is optional
        print("loss.png and the report's plot need matplotlib: pip install 'blockals[plot]'", flush=True)
        png = None
    if png is not None:
        with fsspec.open(f"{data}/loss.png", "wb") as fh:
            fh.write(png.getvalue())

    def table(rows: list[tuple]) -> str:
        return "<table>" + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                                   for r in rows) + "</table>"

    columns = list(history[0]) if history else []
    parts = [
        "<!doctype html><meta charset='utf-8'><title>blockals pipeline report</title>",
        "<style>body{font-family:sans-serif;margin:2em}td{padding:2px 10px;border-bottom:1px solid #ddd}</style>",
        "<h1>blockals pipeline report</h1>",
        f"<p>{html.escape(time.strftime('%Y-%m-%d %H:%M:%S'))}, "
        + html.escape(", ".join(f"{k} {v}" for k, v in record["versions"].items())) + "</p>",
        "<h2>Metrics</h2>", table([(k, f"{v:.6g}" if isinstance(v, float) else v) for k, v in metrics.items()]),
        "<h2>Parameters</h2>",
        table([(f"{section}.{key}", value) for section, values in config.items() for key, value in values.items()]),
        "<h2>Iterations</h2>", table([tuple(columns)] + [tuple(h[c] for c in columns) for h in history]),
    ]
    if png is not None:
        parts.insert(5, "<img alt='objective and training RMSE per iteration' src='data:image/png;base64,"
                        + base64.b64encode(png.getvalue()).decode() + "'>")
    with fsspec.open(f"{data}/report.html", "w") as fh:
        fh.write("\n".join(parts))


def store_id(path: str) -> str | None:
    """The id of the complete ratings store at ``path``, or None."""
    import blockals

    try:
        return blockals.open_store(path).store_id
    except blockals.StoreError:
        return None


if __name__ == "__main__":
    from blockals.cli import internal_error
    from blockals.errors import BlockalsError

    try:
        sys.exit(main())
    except BlockalsError as exc:  # one sentence for known bad input, as the CLI does
        print(f"als_pipeline: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("als_pipeline: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:  # a bug: one line here, the traceback in a file
        sys.exit(internal_error("als_pipeline"))
