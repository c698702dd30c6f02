"""The paper's comparison on the user's model and data: several training methods, same budget and
seeds, every (method, strategy) pair evaluated, one table and one plot.

Each method trains into ``<output>/<method>-seed<seed>/``; a run that finished training and
evaluation is reused and an interrupted one is resumed from its checkpoint, so an interrupted
comparison continues where it stopped. DeeBERT and FastBERT begin with the ``finetune`` method as
their first stage: it is trained once per seed, in ``<output>/finetune-seed<seed>/`` (also when
``finetune`` is not among the methods), and they start at their second stage from it. With
``finetune_from`` they start from that comparison's finished ``finetune-seed<seed>/`` instead, so that
the baselines can run in folders of their own, side by side, from one fine-tuning.

The orchestration above training and evaluation: it imports both, neither imports it. What it knows
of each method (its label, its own strategy, its first stage) it reads from :mod:`layerexit.methods`.
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from layerexit import atomic
from layerexit.config import TrainConfig
from layerexit.errors import LayerExitError
from layerexit.evaluation.evaluate import evaluate_run, pareto_front
from layerexit.evaluation.sweep import FAMILIES
from layerexit.methods import METHODS, labels, native_strategies, parse_method
from layerexit.run_folder import RunFolder
from layerexit.strategies import Static

__all__ = ["DEFAULT_METHODS", "LABELS", "NATIVE", "compare", "format_table", "parse_method", "summarise"]

DEFAULT_METHODS = (
    "finetune",
    "static:3",
    "static:4",
    "deebert",
    "fastbert",
    "retrofit",
    "pabee",
    "righttool",
    "ensemble",
)
NATIVE = native_strategies()
"""Each training method's own strategy family (from the method registry)."""
LABELS = labels()
"""Each training method's row label (from the method registry)."""


def compare(
    base: TrainConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    output: Path,
    *,
    progress: bool = True,
    finetune_from: Path | None = None,
) -> dict[str, Any]:
    """Train (or reuse) every (method, seed), evaluate, and write ``compare.{json,csv,md,png}``.
    ``finetune_from``: the comparison folder whose finished ``finetune-seed<seed>`` runs DeeBERT and
    FastBERT start from (default: ``output``'s own, trained there when missing)."""
    from layerexit.training.loop import train

    parsed = [(spec, *parse_method(spec)) for spec in methods]
    output.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, int], Path] = {}
    for spec, name, layers in parsed:
        for seed in seeds:
            run = output / f"{spec.replace(':', '')}-seed{seed}"
            runs[(spec, seed)] = run
            if RunFolder(run).is_complete():
                _say(f"{run.name}: done, reusing", progress)
                continue
            config = replace(base, objective=name, static_layers=layers, seed=seed, output=str(run))
            if RunFolder(run).training_finished():
                _say(f"{run.name}: trained, evaluating", progress)
            elif run.exists():
                _say(f"{run.name}: interrupted, resuming", progress)
                train(config, progress=progress, resume=True)
            elif (first := METHODS[name].first_stage) is not None:
                source = _fine_tuned(first, replace(base, seed=seed), output, progress, finetune_from)
                _say(f"{run.name}: training its second stage, from {source.name}", progress)
                train(config, progress=progress, first_stage_from=source)
            else:
                _say(f"{run.name}: training", progress)
                train(config, progress=progress)
            evaluate_run(run, progress=progress)
    reports = {key: RunFolder(run).report() for key, run in runs.items()}
    summary = summarise(reports, [p[0] for p in parsed], list(seeds))
    summary["config"] = asdict(base)
    summary["runs"] = {f"{spec}/seed{seed}": str(run) for (spec, seed), run in runs.items()}
    atomic.write_json(output / "compare.json", summary)
    atomic.write_text(output / "compare.md", format_table(summary) + "\n")
    write_csv(summary, output / "compare.csv")
    plot_compare(reports, summary, output / "compare.png")
    return summary


def _fine_tuned(first: str, base: TrainConfig, output: Path, progress: bool, elsewhere: Path | None = None) -> Path:
    """``<output>/<first>-seed<seed>/``, trained (or resumed) to the end: the run of method ``first``
    (``finetune``) that is DeeBERT's and FastBERT's first stage; or ``<elsewhere>/<first>-seed<seed>/``,
    which another comparison must have trained."""
    from layerexit.training.loop import train

    if elsewhere is not None:
        run = elsewhere / f"{first}-seed{base.seed}"
        if not RunFolder(run).training_finished():
            raise LayerExitError(
                f"{run}: no finished {first} run of seed {base.seed} to start DeeBERT and FastBERT from "
                f"(train it first: layerexit compare --methods {first} --seeds {base.seed} --output {elsewhere})"
            )
        return run
    run = output / f"{first}-seed{base.seed}"
    config = replace(base, objective=first, static_layers=0, output=str(run))
    if not RunFolder(run).training_finished():
        resuming = run.exists()
        doing = "resuming" if resuming else "training"
        _say(f"{run.name}: {doing} (the first stage of DeeBERT and FastBERT)", progress)
        train(config, progress=progress, resume=resuming)
    return run


def summarise(reports: dict[tuple[str, int], dict[str, Any]], methods: list[str], seeds: list[int]) -> dict[str, Any]:
    """Per (method, strategy): the metric of the setting selected in the band on dev, reported on test,
    as mean and standard deviation over seeds."""
    first = next(iter(reports.values()))
    metric, rep = first["metric"], first["report_split"]
    num_layers = first["num_layers"]
    cells: dict[str, dict[str, Any]] = {}
    for spec in methods:
        name, layers = parse_method(spec)
        per_seed = [reports[(spec, seed)] for seed in seeds]
        row: dict[str, Any] = {}
        if METHODS[name].takes_layers:
            values = [r["splits"][rep]["per_layer"][metric][layers - 1] for r in per_seed]
            row["static"] = _cell(values, [num_layers / layers] * len(values), f"static(layer={layers})")
        else:
            full = [r["splits"][rep]["full_model"][metric] for r in per_seed]
            row["full"] = _cell(full, [1.0] * len(full), "all layers")
            if METHODS[name].trains_internal_exits:
                for family in FAMILIES:
                    if family == "static":
                        continue
                    picked = [r["selected"].get(family) for r in per_seed]
                    if any(p is None for p in picked):
                        row[family] = None
                        continue
                    row[family] = _cell(
                        [p[rep][metric] for p in picked],
                        [p[rep]["speedup"] for p in picked],
                        "; ".join(p["setting"] for p in picked),
                    )
            if METHODS[name].trains_internal_exits:  # else an oracle over untrained exits means nothing
                oracle = [r["splits"][rep]["oracle"] for r in per_seed]
                row["oracle"] = _cell([o[metric] for o in oracle], [o["speedup"] for o in oracle], "oracle")
        cells[spec] = row
    return {
        "metric": metric,
        "report_split": rep,
        "select_split": first["select_split"],
        "band": first["band"],
        "num_layers": num_layers,
        "seeds": seeds,
        "methods": methods,
        "native_strategy": {m: NATIVE.get(parse_method(m)[0]) for m in methods},
        "cells": cells,
    }


def _cell(values: list[float], speedups: list[float], settings: str) -> dict[str, Any]:
    return {
        "mean": round(statistics.mean(values), 5),
        "std": round(statistics.stdev(values), 5) if len(values) > 1 else 0.0,
        "values": values,
        "speedup": round(statistics.mean(speedups), 3),
        "settings": settings,
    }


def format_table(summary: dict[str, Any]) -> str:
    """Markdown: one row per method, one column per strategy (metric on the report split, mean ± std)."""
    metric, rep, sel = summary["metric"], summary["report_split"], summary["select_split"]
    lo, hi = summary["band"]
    columns = ["full", *[f for f in FAMILIES if f != "static"], "static", "oracle"]
    lines = [
        f"{metric} on {rep} ({len(summary['seeds'])} seed(s): {summary['seeds']}); each strategy's setting is the best "
        f"on {sel} with speed-up in {lo:.1f}x-{hi:.1f}x; cells are mean ± std (mean speed-up); "
        "**bold**: the method's own strategy.",
        "",
        "| method | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for spec in summary["methods"]:
        row = summary["cells"][spec]
        native = summary["native_strategy"].get(spec)
        name = LABELS.get(spec, spec)
        cells = []
        for column in columns:
            cell = row.get(column)
            if cell is None:
                cells.append("–" if column in row else "")
                continue
            text = f"{100 * cell['mean']:.2f}" + (f" ± {100 * cell['std']:.2f}" if cell["std"] else "")
            text += f" ({cell['speedup']:.2f}x)"
            cells.append(f"**{text}**" if column == native else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(summary: dict[str, Any], path: Path) -> None:
    rows = [
        [spec, strategy, cell["mean"], cell["std"], cell["speedup"], len(cell["values"]), cell["settings"]]
        for spec, row in summary["cells"].items()
        for strategy, cell in row.items()
        if cell is not None
    ]
    atomic.write_csv(path, ["method", "strategy", "mean", "std", "speedup", "n_seeds", "settings"], rows)


def plot_compare(reports: dict[tuple[str, int], dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Metric against speed-up on the report split: each method's own strategy (plus ours with
    patience), static models as squares, the fine-tuned full model as a dashed line. First seed."""
    from layerexit.evaluation.figures import pyplot, save_figure

    plt = pyplot()

    metric, rep = summary["metric"], summary["report_split"]
    seed = summary["seeds"][0]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    colors = iter(["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9", "C0", "C1", "C2"])  # grey is for static
    for spec in summary["methods"]:
        name = parse_method(spec)[0]
        run = Path(summary_run(reports, spec, seed))
        if not METHODS[name].trains_internal_exits:
            full = summary["cells"][spec]["full"]["mean"]
            ax.axhline(full, color="k", ls="--", lw=1, label=f"{METHODS[name].display} {100 * full:.1f}")
            continue
        if METHODS[name].takes_layers:
            cell = summary["cells"][spec]["static"]
            ax.plot(
                cell["speedup"],
                cell["mean"],
                Static.family.style.marker,
                color="0.35",
                ms=5,
                label="static (first n layers)" if "static (first n layers)" not in _labels(ax) else None,
            )
            continue
        families = [NATIVE[name], *METHODS[name].also_plotted]
        color = next(colors)
        for family in families:
            xy = _family_points(run, family, metric, rep)
            if xy:
                front = pareto_front(xy)
                style = "-" if family == NATIVE[name] else ":"
                ax.plot(
                    *zip(*front, strict=True),
                    style,
                    color=color,
                    lw=1.6,
                    marker=".",
                    ms=3,
                    label=f"{METHODS[name].display} + {family}",
                )
    lo, hi = summary["band"]
    ax.axvspan(lo, hi, color="0.93", zorder=0)
    ax.set_xlabel("speed-up (L / mean exit layer)")
    ax.set_ylabel(f"{metric} ({rep})")
    ax.set_xlim(0.95, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path)


def summary_run(reports: dict[tuple[str, int], dict[str, Any]], spec: str, seed: int) -> str:
    return str(reports[(spec, seed)]["run"])


def _labels(ax: Any) -> list[str]:
    return [line.get_label() for line in ax.get_lines()]


def _family_points(run: Path, family: str, metric: str, split: str) -> list[tuple[float, float]]:
    points = []
    with RunFolder(run).points_file().open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["split"] == split and row["strategy"] == family:
                points.append((float(row["speedup"]), float(row[metric])))
    return points


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr)
