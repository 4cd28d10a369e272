"""The parameter table and every face derived from it: signature, docstring, validation,
scikit-learn's estimator contract, the command line and the pipeline's YAML keys."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import blockals
from blockals import params
from blockals.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
# Written out here, independently of the table: what users and scripts rely on.
EXPECTED_DEFAULTS = {
    "rank": 10, "max_iter": 10, "reg": 0.1, "reg_scaling": "count", "implicit": False, "alpha": 1.0,
    "biases": False, "nonnegative": False, "solver": "cholesky", "seed": 0, "bias_reg": None, "weighting": "none",
    "unobserved_weight": 0.1, "row_weights": "counts", "col_weights": "counts", "cg_steps": 3, "init": "normal",
    "dtype": "float32", "checkpoint_interval": None, "checkpoint_seconds": 60.0, "verbose": 0,
}
POSITIONAL = ["rank", "max_iter", "reg", "reg_scaling", "implicit", "alpha", "biases", "nonnegative", "solver", "seed"]


def test_signature_is_the_documented_contract():
    sig = inspect.signature(blockals.ALS)
    assert {name: p.default for name, p in sig.parameters.items()} == EXPECTED_DEFAULTS
    positional = [n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == POSITIONAL
    model = blockals.ALS(32, 5, 0.05)
    assert (model.rank, model.max_iter, model.reg) == (32, 5, 0.05)
    with pytest.raises(TypeError):
        blockals.ALS(1, 2, 3, "count", False, 1.0, False, False, "cg", 0, 3)  # the rest are keyword-only


def test_init_only_stores_and_fit_validates():
    # Nonsense is stored as given (scikit-learn's contract) and refused by fit, naming the parameter.
    model = blockals.ALS(rank="many", dtype="float16")
    assert model.rank == "many"
    with pytest.raises(blockals.InputError, match=r"^rank must be an integer, got 'many'\.$"):
        model.fit((np.array([1]), np.array([1]), np.array([1.0])))


def test_docstring_documents_every_parameter_once():
    doc = blockals.ALS.__doc__
    for name in EXPECTED_DEFAULTS:
        assert doc.count(f"\n{name} : ") == 1, name
    assert "user_factors_" in doc and "history_" in doc


def test_get_set_params_repr_and_sklearn_clone():
    sklearn_base = pytest.importorskip("sklearn.base")
    weights = np.arange(3.0)
    model = blockals.ALS(rank=7, implicit=True, row_weights=weights)
    got = model.get_params(deep=True)
    assert set(got) == set(EXPECTED_DEFAULTS) and got["rank"] == 7 and got["row_weights"] is weights
    assert model.get_params(deep=False) == got
    assert model.set_params(alpha=40.0, solver="cg") is model
    assert (model.alpha, model.solver) == (40.0, "cg")
    with pytest.raises(blockals.InputError, match=r"unknown parameter 'rnak'; did you mean 'rank'\?"):
        model.set_params(rnak=3)
    clone = sklearn_base.clone(model)
    assert clone is not model and clone.get_params()["alpha"] == 40.0 and clone.rank == 7
    assert repr(blockals.ALS()) == "ALS()"
    assert repr(blockals.ALS(rank=3, solver="cg")) == "ALS(rank=3, solver='cg')"


@pytest.mark.parametrize(
    "given,match",
    [
        ({"rank": 0}, r"^rank must be at least 1, got 0\.$"),
        ({"rank": True}, r"^rank must be an integer, got True\.$"),
        ({"reg": "0.1"}, r"^reg must be a finite number, got '0\.1'\.$"),
        ({"alpha": float("inf")}, r"^alpha must be a finite number, got inf\.$"),
        ({"implicit": 1}, r"^implicit must be True or False, got 1\.$"),
        ({"solver": "lu"}, r"^solver must be one of 'cholesky', 'cg'; got 'lu'\.$"),
        ({"bias_reg": -1.0}, r"^bias_reg must be at least 0, got -1\.$"),
        ({"row_weights": "rows"}, r"^row_weights must be 'counts', a number or an array"),
        ({"col_weights": [1.0, -2.0]}, r"^col_weights must hold one finite nonnegative weight per row\.$"),
        ({"init": "zeros"}, r"^init must be one of 'normal', 'uniform'; got 'zeros'\.$"),
        ({"checkpoint_interval": -1}, r"^checkpoint_interval must be at least 0, got -1\.$"),
        ({"checkpoint_interval": 2.0}, r"^checkpoint_interval must be an integer, got 2\.0\.$"),
        ({"checkpoint_seconds": 0}, r"^checkpoint_seconds must be greater than 0, got 0\.$"),
        ({"checkpoint_seconds": float("inf")}, r"^checkpoint_seconds must be a finite number, got inf\.$"),
        ({"verbose": -1}, r"^verbose must be at least 0, got -1\.$"),
        ({"biases": True, "implicit": True}, r"cannot be combined with implicit=True"),
        ({"weighting": "wals", "biases": True}, r"cannot be combined with implicit or biases"),
        ({"nonnegative": True, "solver": "cg"}, r"use solver='cholesky' with it"),
        ({"rankk": 3}, r"^unknown parameter 'rankk'; did you mean 'rank'\?$"),
    ],
)
def test_each_refusal_is_one_sentence_naming_the_parameter(given, match):
    with pytest.raises(blockals.InputError, match=match):
        params.parse_params(given)


def test_config_holds_what_determines_the_factors():
    run = params.parse_params({"rank": 4, "max_iter": 3, "verbose": True, "bias_reg": None, "reg": 0.5})
    config = run.config
    assert (run.max_iter, run.checkpoint_interval, run.checkpoint_seconds, run.verbose) == (3, None, 60.0, 1)
    assert config.rank == 4 and config.bias_reg == 0.5  # bias_reg None means reg
    assert not hasattr(config, "max_iter") and not hasattr(config, "verbose")
    with pytest.raises(AttributeError):
        config.rank = 5  # frozen
    # Iterations and checkpointing do not change the factors, so they do not change the fingerprint.
    assert params.parse_params({"rank": 4, "max_iter": 9, "reg": 0.5}).config.fingerprint() == config.fingerprint()
    assert params.parse_params({"rank": 5, "reg": 0.5}).config.fingerprint() != config.fingerprint()
    arrays = {"row_weights": np.ones(3)}
    with_array = params.parse_params({"rank": 4, "reg": 0.5, "weighting": "wals", "row_weights": np.ones(3)}, arrays)
    assert with_array.config.row_weights == "array" and with_array.config.arrays_digest


def test_command_line_offers_every_parameter_with_the_table_defaults():
    parser = build_parser()
    args = parser.parse_args(["train", "r.zarr", "m.zarr"])
    cli = params.from_arguments(args)
    assert set(cli) == set(EXPECTED_DEFAULTS) - {"verbose"}
    assert cli == {name: EXPECTED_DEFAULTS[name] for name in cli}
    args = parser.parse_args(["train", "r.zarr", "m.zarr", "--rank", "8", "--implicit", "--bias-reg", "0.5",
                              "--row-weights", "2.5", "--col-weights", "counts", "--solver", "cg"])
    got = params.from_arguments(args)
    assert (got["rank"], got["implicit"], got["bias_reg"], got["row_weights"], got["col_weights"], got["solver"]) == (
        8, True, 0.5, 2.5, "counts", "cg")


def test_command_line_refuses_a_bad_weight_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["train", "r.zarr", "m.zarr", "--row-weights", "abc"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "blockals train: error: argument --row-weights: must be 'counts' or a number, got 'abc'; "
        "see 'blockals train --help'.")


def test_command_line_help_carries_the_table_help():
    out = subprocess.run([sys.executable, "-m", "blockals.cli", "train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for p in params.PARAMS:
        if p.cli:
            assert "--" + p.name.replace("_", "-") in text
            assert " ".join(p.help.split())[:40] in text, p.name


@pytest.mark.parametrize(
    "yaml_text,match",
    [
        ("model:\n  rnak: 3\n", r"c\.yaml: unknown key 'rnak' in section 'model'; did you mean 'rank'\?$"),
        ("modle:\n  rank: 3\n", r"c\.yaml: unknown section 'modle'; did you mean 'model'\?$"),
        ("split:\n  fractoin: 0.1\n", r"'fractoin' in section 'split'; did you mean 'fraction'\?"),
        ("data:\n  n_user_block: 2\n", r"'n_user_block' in section 'data'; did you mean 'n_user_blocks'\?"),
        ("model:\n  rank: 0\n", r"rank must be at least 1, got 0\."),
        ("model: 3\n", r"section 'model' of .* must hold keys and values\."),
        ("- 1\n- 2\n", r"must hold sections"),
        # Values of every section, refused before ingest and split run rather than when their stage comes.
        ("split:\n  method: randm\n",
         r"c\.yaml: split\.method must be one of 'random', 'leave_k_out', 'ratio', 'temporal'; got 'randm'\.$"),
        ("evaluate:\n  k: 0\n", r"c\.yaml: evaluate\.k must be at least 1, got 0\.$"),
        ("data:\n  n_user_blocks: two\n", r"c\.yaml: data\.n_user_blocks must be an integer, got 'two'\.$"),
        ("recommend:\n  n: 2.5\n", r"c\.yaml: recommend\.n must be an integer, got 2\.5\.$"),
    ],
)
def test_pipeline_yaml_keys_come_from_the_api(yaml_text, match, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    out = subprocess.run([sys.executable, str(ROOT / "pipelines" / "als_pipeline.py"), "--config", str(config),
                          "--data", str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert re.search(match, lines[0]), lines[0]
    assert not (tmp_path / "data" / "ratings.zarr").exists()  # refused before any stage ran


@pytest.mark.parametrize("config", sorted((ROOT / "pipelines" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_pipeline_configs_pass_the_table(config):
    import importlib.util

    spec = importlib.util.spec_from_file_location("als_pipeline", ROOT / "pipelines" / "als_pipeline.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    loaded = pipeline.load_config(pipeline.parse_args(["--config", str(config)]))
    assert set(loaded) == {"data", "split", "model", "evaluate", "recommend", "search"}
    assert params.parse_params(loaded["model"]).config.rank >= 1


def test_pipeline_checks_the_value_of_every_key():
    import importlib.util

    from blockals.evaluation import parse_split_params

    spec = importlib.util.spec_from_file_location("als_pipeline", ROOT / "pipelines" / "als_pipeline.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    keys, checks = pipeline.config_keys(), pipeline.value_checks()
    for section in ("data", "evaluate", "recommend"):
        assert set(checks[section]) == set(keys[section]), section
    assert set(keys["split"]) == set(inspect.signature(parse_split_params).parameters) - {"prefix"}
