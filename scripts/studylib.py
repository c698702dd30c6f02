"""What the study scripts share: the committed per-run reports (:class:`Run`, :func:`load_folder`), the
number of a cell (the setting chosen on dev in the band, reported on test), paired bootstrap intervals
over test examples that pool seeds, and markdown tables. Used by ``study.py`` and ``study_full.py``."""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layerexit.evaluation.sweep import best_in_band

BOOTSTRAP = 2000


class StudyError(Exception):
    pass


@dataclass
class Run:
    path: Path
    spec: str
    seed: int
    report: dict[str, Any]
    points: list[dict[str, str]]
    exits: list[dict[str, str]]
    train: dict[str, Any]

    @property
    def metric(self) -> str:
        return str(self.report["metric"])

    def test_points(self, strategy: str, k: float | None = None) -> list[tuple[float, float]]:
        rows = [r for r in self.points if r["split"] == "test" and r["strategy"] == strategy]
        if k is not None:
            rows = [r for r in rows if float(r["k"]) == k]
        return [(float(r["speedup"]), float(r[self.metric])) for r in rows]

    def correct(self, column: str) -> np.ndarray:
        if not self.exits or f"{column}_pred" not in self.exits[0]:
            raise StudyError(f"{self.path}/eval/exit_layers.csv has no {column}_pred column")
        return np.array([r[f"{column}_pred"] == r["label"] for r in self.exits], dtype=float)

    def labels(self) -> list[str]:
        return [r["label"] for r in self.exits]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def load_folder(folder: Path) -> dict[tuple[str, int], Run]:
    summary_path = folder / "compare.json"
    if not summary_path.is_file():
        return {}
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    runs = {}
    for key, where in summary["runs"].items():
        spec, seed = key.rsplit("/seed", 1)
        path = folder / Path(where).name
        report_path = path / "eval" / "report.json"
        if not report_path.is_file():
            raise StudyError(f"{folder}/compare.json names {key} but {report_path} is missing")
        exits_path = path / "eval" / "exit_layers.csv"
        runs[(spec, int(seed))] = Run(
            path=path,
            spec=spec,
            seed=int(seed),
            report=json.loads(report_path.read_text(encoding="utf-8")),
            points=_read_csv(path / "eval" / "points.csv"),
            exits=_read_csv(exits_path) if exits_path.is_file() else [],
            train=json.loads((path / "train_summary.json").read_text(encoding="utf-8")),
        )
    return runs


def seeds_of(runs: dict[tuple[str, int], Run], spec: str) -> list[int]:
    return sorted(seed for s, seed in runs if s == spec)


def cell_value(run: Run, strategy: str) -> tuple[float, float] | None:
    """(metric on test, speed-up) of one run under one strategy, the setting chosen on dev in the band."""
    rep = run.report["report_split"]
    split = run.report["splits"][rep]
    if strategy == "full":
        return split["full_model"][run.metric], 1.0
    if strategy == "oracle":
        return split["oracle"][run.metric], split["oracle"]["speedup"]
    if strategy == "static" and run.spec.startswith("static:"):
        layers = int(run.spec.split(":")[1])
        return split["per_layer"][run.metric][layers - 1], run.report["num_layers"] / layers
    chosen = run.report["selected"].get(strategy)
    if chosen is None:
        return None
    return chosen[rep][run.metric], chosen[rep]["speedup"]


def fmt_cell(values: Sequence[tuple[float, float]], digits: int = 1, seeds: bool = False) -> str:
    """Mean ± sd over seeds of a metric in points, with the mean speed-up (and, with ``seeds``, how many)."""
    if not values:
        return "–"
    acc = [100 * v for v, _ in values]
    speed = statistics.mean(s for _, s in values)
    text = f"{statistics.mean(acc):.{digits}f}"
    if len(acc) > 1:
        text += f" ± {statistics.stdev(acc):.{digits}f}"
    count = f", {len(acc)} seed{'s' if len(acc) > 1 else ''}" if seeds else ""
    return f"{text} ({speed:.2f}x{count})"


def bootstrap(
    samples: Sequence[np.ndarray], stat: Callable[[list[np.ndarray]], float], *, shared: bool = False
) -> tuple[float, float]:
    """Percentile 95% interval of ``stat`` when every array of ``samples`` is resampled by example
    (the rows of one array share their examples: they are resampled with the same indices). With
    ``shared`` every array holds the same examples (seeds scored on the same test set): one draw of
    indices resamples them all, so what the seeds have in common (the hard examples) counts once."""
    rng = np.random.default_rng(0)
    values = []
    for _ in range(BOOTSTRAP):
        picked = []
        common = rng.integers(0, samples[0].shape[-1], samples[0].shape[-1]) if shared else None
        for group in samples:
            idx = common if common is not None else rng.integers(0, group.shape[-1], group.shape[-1])
            picked.append(group[..., idx])
        values.append(stat(picked))
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def paired_difference(
    runs: dict[tuple[str, int], Run], a: tuple[str, str], b: tuple[str, str]
) -> tuple[float, float, float, int, float, float] | None:
    """Mean over the seeds both methods have of (metric of a − metric of b), its paired bootstrap
    interval, the number of seeds and the two mean speed-ups. Accuracy only (the metric of every
    built-in task)."""
    seeds = sorted(set(seeds_of(runs, a[0])) & set(seeds_of(runs, b[0])))
    if not seeds:
        return None
    groups = []
    speed_a, speed_b = [], []
    for seed in seeds:
        ra, rb = runs[(a[0], seed)], runs[(b[0], seed)]
        if ra.metric != "accuracy":
            raise StudyError(f"{ra.path}: paired intervals are computed for accuracy, not {ra.metric}")
        if ra.labels() != rb.labels():
            raise StudyError(f"{ra.path} and {rb.path} were not scored on the same test examples")
        groups.append(np.stack([ra.correct(a[1]), rb.correct(b[1])]))
        va, vb = cell_value(ra, a[1]), cell_value(rb, b[1])
        assert va is not None and vb is not None
        speed_a.append(va[1])
        speed_b.append(vb[1])

    def stat(gs: list[np.ndarray]) -> float:
        return float(np.mean([g[0].mean() - g[1].mean() for g in gs]))

    chosen = [runs[(spec, seed)] for seed in seeds for spec in (a[0], b[0])]
    lo, hi = bootstrap(groups, stat, shared=same_examples(chosen))
    return stat(groups), lo, hi, len(seeds), statistics.mean(speed_a), statistics.mean(speed_b)


def data_seed(run: Run) -> int:
    """The seed that drew the run's examples (``--data-seed``; runs from before it used ``--seed``)."""
    config = run.train["config"]
    value = config.get("data_seed")
    return int(config["seed"] if value is None else value)


def same_examples(runs: Sequence[Run]) -> bool:
    """Whether every run was scored on the same test examples (same data seed and task, same labels)."""
    first = runs[0]
    return all(
        data_seed(r) == data_seed(first) and r.report["task"] == first.report["task"] and r.labels() == first.labels()
        for r in runs
    )


def envelope(points: Sequence[tuple[float, float]], at: float) -> float:
    """The best metric among settings at least ``at`` times faster than the full model (NaN if none)."""
    faster = [m for s, m in points if s >= at - 1e-9]
    return max(faster) if faster else float("nan")


def select_in_band(run: Run, strategy: str, k: float) -> tuple[float, float] | None:
    """Voting with ``k`` fixed: the best dev setting in the band, reported on test (the paper's rule,
    the library's own :func:`~layerexit.evaluation.sweep.best_in_band`)."""
    dev = [r for r in run.points if r["split"] == "dev" and r["strategy"] == strategy and float(r["k"]) == k]
    best = best_in_band(dev, run.report["band"], lambda r: float(r["speedup"]), lambda r: float(r[run.metric]))
    if best is None:
        return None
    test = next(r for r in run.points if r["split"] == "test" and r["setting"] == best["setting"])
    return float(test[run.metric]), float(test["speedup"])


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def single_run_halfwidth(runs: dict[tuple[str, int], Run]) -> float | None:
    """Half-width of the bootstrap interval of the fine-tuned model's test accuracy (one run)."""
    key = next((k for k in sorted(runs) if k[0] == "finetune"), None) or next(
        (k for k in sorted(runs) if k[0] == "ensemble"), None
    )
    if key is None:
        return None
    correct = runs[key].correct("full")
    lo, hi = bootstrap([correct], lambda gs: float(gs[0].mean()))
    return (hi - lo) / 2


def rows_table(
    columns: dict[str, dict[tuple[str, int], Run]],
    specs: Sequence[tuple[str, str, str]],
    digits: int = 1,
    seeds: bool = False,
) -> str:
    """One row per ``(label, method, strategy)``, one column per study: mean ± sd over seeds (speed-up)."""
    header = ["method + strategy", *columns]
    rows = []
    for label, spec, strategy in specs:
        row = [label]
        for runs in columns.values():
            values = [v for seed in seeds_of(runs, spec) if (v := cell_value(runs[(spec, seed)], strategy)) is not None]
            row.append(fmt_cell(values, digits, seeds))
        rows.append(row)
    sizes = []
    for name, runs in columns.items():
        any_run = next(iter(runs.values()))
        sizes.append(f"{name}: n = {any_run.report['splits']['test']['size']}")
        half = single_run_halfwidth(runs)
        if half is not None:
            sizes[-1] += f", ±{100 * half:.1f}"
    rows.append(["test examples, 95% interval of one accuracy"] + [s.split(": ", 1)[1] for s in sizes])
    return table(header, rows)


def differences_table(
    columns: dict[str, dict[tuple[str, int], Run]],
    pairs: Sequence[tuple[str, tuple[str, str], tuple[str, str]]],
    digits: int = 1,
) -> str:
    """Paired differences ``a − b`` in points with their bootstrap interval (bold when it excludes 0)."""
    header = ["difference (points)", *columns]
    rows = []
    for label, a, b in pairs:
        row = [label]
        for runs in columns.values():
            got = paired_difference(runs, a, b)
            if got is None:
                row.append("–")
                continue
            diff, lo, hi, n, sa, sb = got
            text = f"{100 * diff:+.{digits}f} [{100 * lo:+.{digits}f}, {100 * hi:+.{digits}f}]"
            if lo > 0 or hi < 0:
                text = f"**{text}**"
            row.append(f"{text}<br>{n} seed{'s' if n > 1 else ''}, {sa:.2f}x vs {sb:.2f}x")
        rows.append(row)
    return table(header, rows)
