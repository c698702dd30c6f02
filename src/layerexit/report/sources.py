"""What a report page is built from: the files of an evaluated run folder or of a comparison.

Everything is read from what ``evaluate``, ``calibrate``, ``bench`` and ``compare`` wrote; nothing
is recomputed here except the texts of the inputs, which the run does not store: they come from
reloading the run's task from its ``config.json`` (the dev and test subsets are deterministic).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from layerexit.atomic import read_json_object
from layerexit.errors import LayerExitError
from layerexit.run_folder import RunFolder

SERVING_WORDS = ("serve", "serving", "loadtest", "load_test", "load-test")
"""A JSON file in the run folder (or its eval folder) whose name holds one of these is a serving
or load-test measurement: rendered generically, as tables."""
KNOWN_JSON = {"report.json", "calibration.json", "bench.json", "config.json", "data.json", "layerexit.json"}


@dataclass
class RunSources:
    """The files of one evaluated run, read and checked."""

    path: Path
    report: dict[str, Any]
    points: list[dict[str, Any]]
    label_names: list[str]
    split: str
    probs: Tensor  # (L, N, C) of ``split``
    labels: Tensor  # (N,)
    config: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    bench: dict[str, Any] | None = None
    serving: dict[str, Any] = field(default_factory=dict)  # file name -> parsed JSON
    texts: list[str] | None = None
    pairs: list[str | None] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return int(self.probs.shape[0])

    @property
    def metric(self) -> str:
        return str(self.report["metric"])


@dataclass
class CompareSources:
    """A ``compare`` folder: its summary and, per method, the first seed's run report and points."""

    path: Path
    summary: dict[str, Any]
    reports: dict[str, dict[str, Any]]  # method spec -> report.json of its first seed
    points: dict[str, list[dict[str, Any]]]  # method spec -> points.csv rows of its first seed
    runs: dict[str, Path]  # method spec -> run folder of its first seed
    notes: list[str] = field(default_factory=list)


def is_compare(path: Path) -> bool:
    return (path / "compare.json").is_file()


def read_json(path: Path, what: str) -> Any:
    return read_json_object(path, f"the {what}")


def read_points(path: Path) -> list[dict[str, Any]]:
    """Rows of ``points.csv``, numbers as floats (empty cells as None)."""
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise LayerExitError(f"{path}: cannot read the strategy points ({err})") from None
    if not rows or not {"split", "strategy", "setting", "speedup"} <= set(rows[0]):
        raise LayerExitError(f"{path}: not a points file (columns split, strategy, setting, speedup expected)")
    out = []
    for row in rows:
        parsed: dict[str, Any] = {}
        for key, value in row.items():
            if key in ("split", "strategy", "setting"):
                parsed[key] = value
            else:
                try:
                    parsed[key] = float(value) if value not in ("", None) else None
                except ValueError:
                    parsed[key] = value
        out.append(parsed)
    return out


def _check_run(path: Path) -> Path:
    """The evaluation folder of a run; LayerExitError naming the first thing missing."""
    if not path.exists():
        raise LayerExitError(f"{path} does not exist")
    if not path.is_dir():
        raise LayerExitError(f"{path} is not a folder; give a run folder or a compare folder")
    if not RunFolder(path).is_run():
        raise LayerExitError(
            f"{path} is not a layerexit run or compare folder (layerexit.json and compare.json missing)"
        )
    out = RunFolder(path).eval_dir()
    for name in ("report.json", "points.csv"):
        if not (out / name).is_file():
            raise LayerExitError(
                f"{path} is not evaluated ({out.name}/{name} missing); run `layerexit evaluate {path}`"
            )
    return out


def load_run(path: Path, split: str | None = None, *, texts: bool = True) -> RunSources:
    """Read an evaluated run. ``split``: the split whose inputs the explorer shows (default: the
    report split, test). ``texts``: reload the task to show the inputs' texts."""
    run = RunFolder(path)
    out = _check_run(path)
    report = read_json(out / "report.json", "evaluation report")
    if not isinstance(report, dict) or not {"metric", "splits", "selected", "report_split"} <= set(report):
        raise LayerExitError(f"{out / 'report.json'}: not an evaluation report (metric, splits, selected expected)")
    split = split or str(report["report_split"])
    stored = run.probs_file(split)
    if not stored.is_file():
        raise LayerExitError(
            f"{path} has no stored probabilities of split {split!r} ({stored.parent.name}/{stored.name} missing); "
            f"run `layerexit evaluate {path} --splits {split}`"
        )
    probs, labels = run.read_probs(split)
    data = read_json(run.data_file, "data description") if run.data_file.is_file() else {}
    label_names = [str(n) for n in data.get("label_names", [])] if isinstance(data, dict) else []
    if len(label_names) != probs.shape[-1]:
        label_names = [str(c) for c in range(probs.shape[-1])]
    config = read_json(run.config_file, "configuration") if run.config_file.is_file() else {}
    sources = RunSources(
        path=path,
        report=report,
        points=read_points(out / "points.csv"),
        label_names=label_names,
        split=split,
        probs=probs,
        labels=labels,
        config=config if isinstance(config, dict) else {},
    )
    if run.calibration_file.is_file():
        sources.calibration = read_json(run.calibration_file, "calibration")
    if run.bench_file.is_file():
        sources.bench = read_json(run.bench_file, "benchmark")
    sources.serving = find_serving(path)
    if texts:
        load_texts(sources)
    else:
        sources.notes.append("Texts not loaded (--no-texts): the explorer shows inputs by number.")
    return sources


def find_serving(path: Path) -> dict[str, Any]:
    """Serving or load-test measurements (``serve_bench.json``, ``loadtest*.json``, ...), by file name."""
    found: dict[str, Any] = {}
    eval_dir = RunFolder(path).eval_dir()
    for folder in (path, eval_dir):
        for file in sorted(folder.glob("*.json")):
            name = file.name.lower()
            if name in KNOWN_JSON or not any(word in name for word in SERVING_WORDS):
                continue
            key = file.name if folder == path else f"{eval_dir.name}/{file.name}"
            found[key] = read_json(file, "serving measurement")
    return found


def load_texts(sources: RunSources) -> None:
    """Fill in the texts of the explorer's split by reloading the run's task; on any failure the
    page goes without texts and says why."""
    from layerexit.config import load_train_config

    config_path = RunFolder(sources.path).config_file
    if not config_path.is_file():
        sources.notes.append("Texts unavailable: the run has no config.json to reload its task from.")
        return
    try:
        task = load_train_config(config_path).load_task()
        examples = task.splits.get(sources.split) or []
    except Exception as err:  # any failure to reload the data leaves the page without texts
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        sources.notes.append(f"Texts unavailable: the task could not be reloaded ({reason}).")
        return
    if len(examples) != sources.labels.numel() or any(
        e.label != int(y) for e, y in zip(examples, sources.labels.tolist(), strict=False)
    ):
        sources.notes.append(
            f"Texts unavailable: the reloaded {sources.split} split ({len(examples)} inputs) does not match "
            f"the stored evaluation ({sources.labels.numel()} inputs); the data changed since the run was evaluated."
        )
        return
    sources.texts = [e.text for e in examples]
    if any(e.text_pair for e in examples):
        sources.pairs = [e.text_pair for e in examples]


def load_compare(path: Path) -> CompareSources:
    """Read a ``compare`` folder: ``compare.json`` and the first seed's run of every method."""
    summary = read_json(path / "compare.json", "comparison")
    if not isinstance(summary, dict) or not {"methods", "seeds", "cells", "metric"} <= set(summary):
        raise LayerExitError(f"{path / 'compare.json'}: not a comparison summary (methods, seeds, cells expected)")
    seed = summary["seeds"][0]
    recorded = summary.get("runs", {})
    reports: dict[str, dict[str, Any]] = {}
    points: dict[str, list[dict[str, Any]]] = {}
    runs: dict[str, Path] = {}
    notes: list[str] = []
    for spec in summary["methods"]:
        run = path / f"{spec.replace(':', '')}-seed{seed}"
        if not run.is_dir() and f"{spec}/seed{seed}" in recorded:
            run = Path(recorded[f"{spec}/seed{seed}"])
        folder = RunFolder(run)
        if not folder.report_file().is_file() or not folder.points_file().is_file():
            notes.append(f"{spec}: no evaluated run at {run}; its curve is left out.")
            continue
        runs[spec] = run
        reports[spec] = folder.report()
        points[spec] = read_points(folder.points_file())
    return CompareSources(path=path, summary=summary, reports=reports, points=points, runs=runs, notes=notes)
