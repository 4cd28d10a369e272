"""The module structure docs/architecture.md describes, held to the code.

Imports are read from the source (function-level ones included), so a cycle or an
upward import fails here even when it happens only at run time.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "blockals"
FORBIDDEN = {"Dask": {"dask", "distributed"}, "Zarr": {"zarr"}}
STORAGE = ("formats", "lock", "store", "checkpoint", "modelio", "recstore")


def table() -> list[tuple[str, str]]:
    """``(module, must not import)`` rows of docs/architecture.md, in their order."""
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]*) \|$", (ROOT / "docs" / "architecture.md").read_text(), re.M)
    return [(module, rule.strip()) for module, rule in rows]


def imports(module: str) -> tuple[set[str], set[str]]:
    """``(blockals modules, other top-level packages)`` that ``module`` imports anywhere."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    ours, others = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "blockals" else [f"blockals.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "blockals" and len(parts) > 1:
                ours.add(parts[1])
            elif parts[0] != "blockals":
                others.add(parts[0])
    ours.discard(module)
    return ours, others


def test_every_module_has_one_row():
    listed = [module for module, _ in table()]
    assert len(listed) == len(set(listed))
    assert set(listed) == {p.stem for p in PACKAGE.glob("*.py")}


@pytest.mark.parametrize("position,row", list(enumerate(table())), ids=lambda r: r[0] if isinstance(r, tuple) else "")
def test_a_module_imports_only_modules_above_it(position, row):
    module, rule = row
    above = {m for m, _ in table()[:position]}
    ours, others = imports(module)
    assert ours <= above, f"{module} imports {sorted(ours - above)}, listed below it"
    if rule == "anything":
        assert not ours
    for word, packages in FORBIDDEN.items():
        if word in rule:
            assert not others & packages, f"{module} imports {sorted(others & packages)}"


def test_only_storage_modules_open_zarr_groups_or_import_zarr():
    for path in PACKAGE.glob("*.py"):
        if path.stem in STORAGE:
            continue
        ours, others = imports(path.stem)
        assert "zarr" not in others, path.stem
        assert "open_group" not in path.read_text(), f"{path.stem} opens Zarr groups"


def test_storage_modules_load_without_dask():
    code = ("import sys\nimport " + ", ".join(f"blockals.{m}" for m in STORAGE)
            + "\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))")
    # blockals/__init__ imports the whole API; load the storage modules without it.
    stub = "import types, sys; sys.modules['blockals'] = types.ModuleType('blockals'); sys.modules['blockals'].__path__ = ['blockals']\n"
    out = subprocess.run([sys.executable, "-c", stub + code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_only_the_half_step_builds_or_solves_systems():
    solvers = {"solve", "solve_cholesky", "solve_cg", "solve_nnls"}
    for path in PACKAGE.glob("*.py"):
        if path.stem in ("halfstep", "kernels"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", None))
                assert name != "systems", f"{path.stem} builds row systems"
                assert name not in solvers or path.stem == "objectives", f"{path.stem} calls {name}"
