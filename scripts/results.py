"""Committed study results: copy the small files of a comparison, and rebuild its table from them.

    python scripts/results.py collect runs/compare-tweets-binary docs/results/tweets-binary-minilm
    python scripts/results.py build docs/results/tweets-binary-minilm      # prints the markdown table

`collect` keeps, per run, config.json, data.json, train_summary.json, eval/report.json and
eval/points.csv and eval/exit_layers.csv (never weights or stored probabilities), plus the comparison's compare.* files.
`build` recomputes the table from the per-run reports alone, with `layerexit.compare.summarise`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from layerexit.compare import format_table, summarise

RUN_FILES = (
    "config.json",
    "data.json",
    "train_summary.json",
    "eval/report.json",
    "eval/points.csv",
    "eval/exit_layers.csv",
)
COMPARE_FILES = ("compare.json", "compare.md", "compare.csv", "compare.png")


def collect(source: Path, dest: Path) -> None:
    summary = json.loads((source / "compare.json").read_text(encoding="utf-8"))
    dest.mkdir(parents=True, exist_ok=True)
    for name in COMPARE_FILES:
        shutil.copy2(source / name, dest / name)
    for key, run in summary["runs"].items():
        run_dir = Path(run)
        target = dest / run_dir.name
        for name in RUN_FILES:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run_dir / name, target / name)
        print(f"{key}: {target}")


def build(folder: Path) -> str:
    summary = json.loads((folder / "compare.json").read_text(encoding="utf-8"))
    reports = {}
    for key, run in summary["runs"].items():
        spec, seed = key.rsplit("/seed", 1)
        report = json.loads((folder / Path(run).name / "eval" / "report.json").read_text(encoding="utf-8"))
        report["run"] = str(folder / Path(run).name)
        reports[(spec, int(seed))] = report
    rebuilt = summarise(reports, summary["methods"], summary["seeds"])
    return format_table(rebuilt)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("source", type=Path)
    c.add_argument("dest", type=Path)
    b = sub.add_parser("build")
    b.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.command == "collect":
        collect(args.source, args.dest)
    else:
        print(build(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
