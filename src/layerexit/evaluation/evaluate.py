"""Offline evaluation: one forward pass per split, then every strategy replayed over its grid.

Outputs, in ``<run>/eval/``: ``report.json`` (per-layer scores, oracle, the paper's band
selection chosen on dev and reported on test), ``points.csv`` (every strategy setting on every
split), ``exit_layers.csv`` (per-sample exits of the selected settings), ``probs_<split>.safetensors``
(the per-layer probabilities, so anything can be replayed later without the model) and
``tradeoff.png`` (metric against speed-up for every strategy).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from layerexit import metrics
from layerexit.atomic import write_csv
from layerexit.data.encoding import Encoded, encode_split
from layerexit.errors import LayerExitError
from layerexit.evaluation.sweep import (
    FAMILIES,
    KNOWN_FAMILIES,
    Point,
    default_grid,
    evaluate_point,
    paper_band,
    select_in_band,
    sweep,
)
from layerexit.methods import METHODS
from layerexit.model import EarlyExitModel
from layerexit.run_folder import RunFolder
from layerexit.runtime import load_runtime, loop
from layerexit.runtime.base import Runtime
from layerexit.strategies import AgreementRule, Static, family_of


def metric_names(task_metric: str) -> list[str]:
    names = ["accuracy", "macro_f1"]
    return names if task_metric in names else [task_metric, *names]


def evaluate_probs(
    probs: dict[str, Tensor],
    labels: dict[str, Tensor],
    *,
    metric: str,
    num_classes: int,
    families: Sequence[str] = FAMILIES,
    select_split: str = "dev",
    report_split: str = "test",
    band: tuple[float, float] | None = None,
    references: dict[str, Tensor] | None = None,
    rule: AgreementRule | None = None,
) -> tuple[dict[str, Any], dict[str, list[Point]]]:
    """Sweep every split, select each family's best setting in the band on ``select_split`` and
    report it on ``report_split``. Returns the report and the points of every split. ``references``: per
    split, another model's classes (N,); every point and exit then also reports its agreement with them.
    ``rule``: the run's fitted learned rule, whose settings are the ``agreement`` family's grid."""
    references = references or {}
    num_layers = next(iter(probs.values())).shape[0]
    grid = default_grid(num_layers, num_classes, families, rule)
    names = metric_names(metric)
    band = band or paper_band(num_classes)
    points = {split: sweep(p, labels[split], grid, names, references.get(split)) for split, p in probs.items()}
    report: dict[str, Any] = {
        "metric": metric,
        "num_layers": num_layers,
        "band": list(band),
        "select_split": select_split,
        "report_split": report_split,
        "splits": {},
        "selected": {},
    }
    for split, p in probs.items():
        y = labels[split]
        oracle = next(pt for pt in points[split] if pt.strategy.name == "oracle")
        report["splits"][split] = {
            "size": int(y.numel()),
            "full_model": {n: round(metrics.score(n, p[-1].argmax(-1), y), 5) for n in names},
            "per_layer": {n: [round(s, 5) for s in metrics.per_layer_scores(p, y, n)] for n in names},
            "oracle": {"speedup": round(oracle.speedup, 4), **{n: round(oracle.scores[n], 5) for n in names}},
        }
        if split in references:
            agree = (p.argmax(-1) == references[split]).double().mean(1)  # (L,)
            report["splits"][split]["agreement_with_reference"] = [round(float(a), 5) for a in agree]
    if select_split in points:
        for family in families:
            chosen = select_in_band(points[select_split], family, metric, band)
            if chosen is None:
                report["selected"][family] = None
                continue
            entry: dict[str, Any] = {
                "setting": str(chosen.strategy),
                select_split: {"speedup": round(chosen.speedup, 4), metric: round(chosen.scores[metric], 5)},
            }
            if report_split in points:
                on_report = next(pt for pt in points[report_split] if pt.strategy == chosen.strategy)
                shown = [*names, *(["agreement_with_reference"] if report_split in references else [])]
                entry[report_split] = {
                    "speedup": round(on_report.speedup, 4),
                    **{n: round(on_report.scores[n], 5) for n in shown},
                }
            report["selected"][family] = entry
    return report, points


def write_points_csv(points: dict[str, list[Point]], path: Path) -> None:
    keys: list[str] = []
    rows = []
    for split, pts in points.items():
        for pt in pts:
            row = {"split": split, **pt.row()}
            rows.append(row)
            keys += [k for k in row if k not in keys]
    write_csv(path, keys, [[row.get(k, "") for k in keys] for row in rows])


def write_exit_layers_csv(
    report: dict[str, Any], points: dict[str, list[Point]], probs: Tensor, labels: Tensor, split: str, path: Path
) -> None:
    """Per-sample exit layer and prediction of each selected setting, of the oracle and of the full
    model (the last exit), on ``split``: enough for paired bootstrap intervals without the model."""
    chosen = {}
    for family, entry in report["selected"].items():
        if entry is not None:
            chosen[family] = next(pt for pt in points[split] if str(pt.strategy) == entry["setting"])
    oracle = next(pt for pt in points[split] if pt.strategy.name == "oracle")
    chosen["oracle"] = oracle
    chosen["full"] = evaluate_point(Static(layer=probs.shape[0]), probs, labels)
    header = ["index", "label"] + [f"{name}_{what}" for name in chosen for what in ("exit", "pred")]
    rows = []
    for i in range(labels.numel()):
        row: list[Any] = [i, int(labels[i])]
        for pt in chosen.values():
            row += [int(pt.exit_layer[i]), int(pt.prediction[i])]
        rows.append(row)
    write_csv(path, header, rows)


def plot_tradeoff(points: list[Point], report: dict[str, Any], split: str, path: Path, title: str) -> None:
    """Metric against speed-up: each family's Pareto front, the static models, the full model, the oracle."""
    from layerexit.evaluation.figures import pyplot, save_figure

    plt = pyplot()

    metric = report["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    fronts = [f for f in KNOWN_FAMILIES if family_of(f).style.front]
    for family in fronts:
        style = family_of(family).style
        pts = [p for p in points if p.strategy.name == family]
        if not pts:
            continue
        front = pareto_front([(p.speedup, p.scores[metric]) for p in pts])
        label = style.label or family
        ax.plot(*zip(*front, strict=True), "-", color=style.color, label=label, lw=1.6, marker=style.marker, ms=3)
    for family in (f for f in KNOWN_FAMILIES if f not in fronts):
        style = family_of(family).style
        each = sorted((p.speedup, p.scores[metric]) for p in points if p.strategy.name == family)
        if each:
            ax.plot(*zip(*each, strict=True), style.marker, color=style.color, ms=4, label=style.label or family)
    full = report["splits"][split]["full_model"][metric]
    ax.axhline(full, color="k", ls="--", lw=1, label=f"full model ({full:.3f})")
    band = report["band"]
    ax.axvspan(band[0], band[1], color="0.92", zorder=0, label="selection band")
    ax.set_xlabel("speed-up (layers: L / mean exit layer)")
    ax.set_ylabel(f"{metric} ({split})")
    ax.set_title(title, fontsize=10)
    shown = [p.scores[metric] for p in points if p.strategy.name in fronts] + [full]
    low = max(min(shown), full - 0.15)
    ax.set_ylim(max(0.0, low - 0.01), min(1.0, max(shown) + 0.01))
    ax.set_xlim(0.95, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path)


def pareto_front(xy: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten on both speed-up and metric, sorted by speed-up."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(xy, key=lambda t: (-t[0], -t[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


def evaluate_run(
    run_dir: str | Path | RunFolder,
    *,
    splits: Sequence[str] = ("dev", "test"),
    families: Sequence[str] = FAMILIES,
    batch_size: int = 64,
    progress: bool = True,
    reuse: bool = True,
    runtime: str = "torch",
    reference: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a trained run folder; writes ``<run>/eval/`` (``eval-onnx``, ``eval-onnx-int8`` for the
    exported graphs) and returns the report. ``reference``: another run folder on the same examples (a plain
    fine-tuned run, say) whose full model's answers every exit and setting is also compared with."""
    run = RunFolder(run_dir) if not isinstance(run_dir, RunFolder) else run_dir
    run.require(config=True).require_finished()
    config = run.config()
    out = run.eval_dir(runtime)
    probs: dict[str, Tensor] = {}
    labels: dict[str, Tensor] = {}
    seconds: dict[str, float] = {}
    source = SplitSource(run, runtime, batch_size=batch_size, progress=progress)
    for split in splits:
        started = time.perf_counter()
        loaded = source.probs(split, reuse=reuse, required=split != "test")
        if loaded is None:
            continue
        probs[split], labels[split] = loaded
        if not source.reused:
            seconds[split] = round(time.perf_counter() - started, 2)
    if not probs:
        raise LayerExitError(f"nothing to evaluate in {run}: none of the splits {list(splits)} exist")
    info = run.data_info()
    num_classes = len(info["label_names"])
    for split, p in probs.items():
        if p.shape[-1] != num_classes:
            raise LayerExitError(
                f"{run}: {split} probabilities have {p.shape[-1]} classes, data.json names {num_classes}"
            )
    references = (
        {split: reference_answers(run, reference, split, labels[split]) for split in probs} if reference else {}
    )
    rule = run.agreement_rule() if "agreement" in families else None
    select_split = "dev" if "dev" in probs else next(iter(probs))
    report_split = "test" if "test" in probs else select_split
    report, points = evaluate_probs(
        probs,
        labels,
        metric=info["metric"],
        num_classes=num_classes,
        families=families,
        select_split=select_split,
        report_split=report_split,
        references=references,
        rule=rule,
    )
    if rule is not None:  # the figures of the split it was fitted on include its own fit rows
        if rule.fit_split == report_split:
            print(
                f"warning: the agreement rule was fitted on {len(rule.fit_rows)} of these {report_split} rows, so "
                f"its {report_split} figures include rows it learned from; fit it on dev (layerexit fit-agreement "
                f"{run.path})",
                file=sys.stderr,
            )
        report["agreement_rule"] = {
            "rule": rule.fingerprint,
            "fit_split": rule.fit_split,
            "fit_rows": len(rule.fit_rows),
        }
    report["run"] = str(run)
    report["reference"] = str(reference) if reference else None
    report["task"] = info["task"]
    report["model"] = config.model
    report["objective"] = config.objective
    report["runtime"] = runtime
    if info.get("labels") == "reference":
        report["labels"] = "reference: the texts are unlabelled, so accuracy is agreement with the classifier"
    report["forward_seconds"] = _carried_seconds(run, runtime, seconds)
    run.write_json(run.report_file(runtime), report)
    write_points_csv(points, run.points_file(runtime))
    write_exit_layers_csv(
        report, points, probs[report_split], labels[report_split], report_split, run.exit_layers_file(runtime)
    )
    plot_tradeoff(
        points[report_split],
        report,
        report_split,
        out / "tradeoff.png",
        f"{info['task']} · {config.model} · {config.objective}{_settings(config)} · {report_split} split",
    )
    return report


def _settings(config: Any) -> str:
    """`` (λ = 0.1)``: the method's options in a title, when its registry entry shows them."""
    method = METHODS.get(config.objective)
    text = method.describe(asdict(config)) if method is not None else ""
    return f" ({text})" if text else ""


def _carried_seconds(run: RunFolder, runtime: str, seconds: dict[str, float]) -> dict[str, float]:
    """Forward-pass times of this evaluation; a split replayed from stored probabilities keeps the
    time measured when they were computed."""
    if run.report_file(runtime).is_file():
        try:
            old = run.read_json(run.report_file(runtime), "an evaluation report").get("forward_seconds", {})
        except LayerExitError:
            old = {}
        if isinstance(old, dict):
            return {**{k: v for k, v in old.items() if isinstance(v, int | float)}, **seconds}
    return seconds


class SplitSource:
    """Per-layer probabilities (L, N, C) and labels of a run's splits on one runtime: stored in the run's
    eval folder after the first forward pass and read back from there afterwards. The model, tokenizer
    and runtime are loaded once, on first need."""

    def __init__(self, run: RunFolder, runtime: str = "torch", *, batch_size: int = 64, progress: bool = False):
        self.run = run
        self.runtime_name = runtime
        self.batch_size = batch_size
        self.progress = progress
        self.reused = False
        self._model: EarlyExitModel | None = None
        self._runtime: Runtime | None = None

    @property
    def model(self) -> EarlyExitModel:
        if self._model is None:
            self._model = EarlyExitModel.from_pretrained(self.run.path)
        return self._model

    def probs(self, split: str, *, reuse: bool = True, required: bool = True) -> tuple[Tensor, Tensor] | None:
        stored = self.run.probs_file(split, self.runtime_name)
        self.reused = reuse and stored.is_file()
        if self.reused:
            return self.run.read_probs(split, self.runtime_name)
        loaded = load_run_split(self.run, split, self.model, required=required)
        if loaded is None:
            return None
        encoded, pad_id = loaded
        if self._runtime is None:
            self._runtime = load_runtime(self.run, self.runtime_name, model=self.model)
        probs = loop.collect_probs(self._runtime, encoded, self.batch_size, pad_id, progress=self.progress)
        labels = encoded.labels
        if self.run.data_info().get("labels") == "reference":  # unlabelled texts: the classifier labels them
            labels = probs[-1].argmax(-1)
        self.run.write_probs(split, probs, labels, self.runtime_name)
        return probs, labels


def reference_answers(run: RunFolder, reference: str | Path, split: str, labels: Tensor) -> Tensor:
    """The classes (N,) that ``reference`` (another run folder: a plain fine-tuned run, say) gives ``split`` of
    ``run``'s task at full depth: computed once and stored in the reference's own eval folder. Refused unless
    both runs hold the same examples in the same order, with the same label names."""
    other = RunFolder(reference).require(config=True)
    mine, theirs = run.data_info(), other.data_info()
    where = f"--reference {reference}"
    for key in ("task", "label_names"):
        if mine.get(key) != theirs.get(key):
            raise LayerExitError(f"{where}: its {key} is {theirs.get(key)!r}, this run's is {mine.get(key)!r}")
    size, other_size = mine.get("sizes", {}).get(split), theirs.get("sizes", {}).get(split)
    if size != other_size:
        raise LayerExitError(f"{where}: its {split} split has {other_size} examples, this run's has {size}")
    digest, other_digest = mine.get("digests", {}).get(split), theirs.get("digests", {}).get(split)
    if digest and other_digest and digest != other_digest:
        raise LayerExitError(f"{where}: its {split} examples differ from this run's (data.json digests)")
    loaded = SplitSource(other).probs(split)
    assert loaded is not None  # required
    probs, other_labels = loaded
    if other_labels.shape != labels.shape or not torch.equal(other_labels, labels):
        raise LayerExitError(f"{where}: its {split} labels differ from this run's, so its examples do too")
    return probs[-1].argmax(-1)


def load_run_split(
    run_dir: RunFolder | Path, split: str, model: EarlyExitModel, *, required: bool = True, limit: int = 0
) -> tuple[Encoded, int] | None:
    """A split of a run's task, tokenised as in training: (encoded, pad id). None if absent and not required."""
    run = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)

    config = run.config()
    task = config.load_task()
    if model.config.final_head == "native":  # a retrofitted classifier numbers the labels its own way
        task = task.relabelled(list(model.config.label_names))
    examples = task.splits.get(split)
    if not examples:
        if not required:
            return None
        raise LayerExitError(f"task {task.name!r} has no {split!r} split; available: {sorted(task.splits)}")
    if limit:
        examples = examples[:limit]
    tokenizer = run.tokenizer()
    encoded = encode_split(tokenizer, examples, config.max_length, model.backbone.uses_token_type_ids)
    return encoded, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def format_report(report: dict[str, Any]) -> str:
    """The table ``layerexit evaluate`` prints."""
    metric = report["metric"]
    sel, rep = report["select_split"], report["report_split"]
    lines = []
    for split, data in report["splits"].items():
        per_layer = " ".join(f"{v:.3f}" for v in data["per_layer"][metric])
        lines.append(
            f"{split:<5} n={data['size']:<6} full model {metric} {data['full_model'][metric]:.4f}   "
            f"oracle {data['oracle'][metric]:.4f} at {data['oracle']['speedup']:.2f}x"
        )
        lines.append(f"      per-exit {metric}: {per_layer}")
        if "agreement_with_reference" in data:
            agree = " ".join(f"{v:.3f}" for v in data["agreement_with_reference"])
            lines.append(f"      per-exit agreement with the reference {report['reference']}: {agree}")
    lo, hi = report["band"]
    lines.append("")
    lines.append(f"Best setting per strategy with speed-up in {lo:.1f}x-{hi:.1f}x, chosen on {sel}, reported on {rep}:")
    width = max([52, *(len(e["setting"]) for e in report["selected"].values() if e is not None)])
    lines.append(f"{'strategy':<10} {'setting':<{width}} {'speed-up':>9} {metric:>9}")
    for family, entry in report["selected"].items():
        if entry is None:
            lines.append(f"{family:<10} {'(no setting in the band)':<{width}}")
            continue
        shown = entry.get(rep, entry[sel])
        lines.append(f"{family:<10} {entry['setting']:<{width}} {shown['speedup']:>8.2f}x {shown[metric]:>9.4f}")
    full = report["splits"][rep]["full_model"][metric]
    lines.append(f"{'full':<10} {'all layers':<{width}} {1.0:>8.2f}x {full:>9.4f}")
    return "\n".join(lines)
