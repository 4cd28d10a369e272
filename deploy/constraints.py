"""Write deploy/constraints.txt: the exact version of every package ``blockals[kubernetes,s3]``
needs, as pip resolves them here, keeping the versions this environment has installed
(the ones its tests ran with).

    pip install -e '.[test,kubernetes,s3]' && python deploy/constraints.py

deploy/Dockerfile installs ``.[s3]`` with these constraints; a machine that starts clusters
with ``--cluster kubernetes`` installs ``.[kubernetes,s3]`` with them, so that its client
runs the versions of Dask the image does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "deploy" / "constraints.txt"


def main() -> int:
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                            capture_output=True, text=True).stdout
    installed = [line for line in frozen.splitlines() if "==" in line and not line.startswith("blockals==")]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "installed.txt").write_text("\n".join(installed) + "\n")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--report", f"{tmp}/report.json", "-c", f"{tmp}/installed.txt", f"{ROOT}[kubernetes,s3]"],
                       check=True)
        report = json.loads((Path(tmp) / "report.json").read_text())
    pins = sorted((item["metadata"]["name"], item["metadata"]["version"]) for item in report["install"])
    lines = [f"{name}=={version}" for name, version in pins if name.lower() != "blockals"]
    python = ".".join(map(str, sys.version_info[:3]))
    OUT.write_text(f"# What blockals[kubernetes,s3] installs, resolved by pip on Python {python} ({sys.platform}).\n"
                   "# Written by deploy/constraints.py; deploy/Dockerfile installs with it.\n" + "\n".join(lines) + "\n")
    print(f"{OUT.relative_to(ROOT)}: {len(lines)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
