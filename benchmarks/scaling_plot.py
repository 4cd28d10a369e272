"""Seconds per iteration and peak RSS against ratings, from benchmarks/outofcore.py reports.

Each line of ``benchmarks/scaling.jsonl`` is the last JSON line ``outofcore.py`` printed
for one run. Runs are grouped by catalogue size (one line per shape); a dotted line from
each shape's smallest run shows where time linear in the ratings would be.

    python benchmarks/scaling_plot.py                       # writes docs/images/scaling.png
    python benchmarks/outofcore.py ... | tail -1 >> benchmarks/scaling.jsonl

Needs matplotlib (``pip install -e ".[plot]"``).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path) -> dict[int, list[dict]]:
    """Reports by number of items, each shape's sorted by ratings (the last run of a size
    in the file wins)."""
    by_shape: dict[int, dict[int, dict]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        if line.strip():
            report = json.loads(line)
            by_shape[report["items"]][report["ratings"]] = report
    return {items: [runs[n] for n in sorted(runs)] for items, runs in sorted(by_shape.items())}


def main(argv: list[str] | None = None) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('scaling_plot.py needs matplotlib: pip install -e ".[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reports", type=Path, default=ROOT / "benchmarks" / "scaling.jsonl")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "scaling.png")
    args = p.parse_args(argv)

    shapes = load(args.reports)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (items, runs), color in zip(shapes.items(), ("tab:blue", "tab:orange", "tab:green")):
        ratings = [r["ratings"] for r in runs]
        label = f"{items // 1000}k items"
        ax_t.plot(ratings, [r["per_iter"] for r in runs], "o-", color=color, label=label)
        first = runs[0]
        ax_t.plot([ratings[0], ratings[-1]], [first["per_iter"], first["per_iter"] * ratings[-1] / ratings[0]],
                  ":", color=color, label=f"{label}, linear from {ratings[0] / 1e6:.0f}M")
        ax_m.plot(ratings, [r["train_rss_gib"] for r in runs], "o-", color=color, label=f"{label}, train")
        ingest = [(r["ratings"], r["ingest_rss_gib"]) for r in runs if "ingest_rss_gib" in r]
        if ingest:
            ax_m.plot(*zip(*ingest), "s--", color=color, alpha=0.6, label=f"{label}, ingest")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log")
        ax.set_xlabel("ratings")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("seconds per iteration (rank 10)")
    ax_m.set_ylabel("peak RSS of all processes (GiB)")
    ax_m.set_ylim(bottom=0)
    runs = [r for shape in shapes.values() for r in shape]
    limits = sorted({f"{r['workers']} x {r['memory_limit']}" for r in runs})
    fig.suptitle(f"blockals out of core, rank {runs[0]['rank']}, single-threaded workers ({', '.join(limits)}); "
                 f"{runs[0]['machine']}, {max(r['date'] for r in runs)}", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
