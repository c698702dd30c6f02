"""Offline evaluation: one forward pass per split, then every strategy replayed over its grid.

Outputs, in ``<run>/eval/``: ``report.json`` (per-layer scores, oracle, the paper's band
selection chosen on dev and reported on test), ``points.csv`` (every strategy setting on every
split), ``exit_layers.csv`` (per-sample exits of the selected settings), ``probs_<split>.safetensors``
(the per-layer probabilities, so anything can be replayed later without the model) and
``tradeoff.png`` (metric against speed-up for every strategy).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from layerexit import metrics
from layerexit.atomic import replacing, save_safetensors, write_json
from layerexit.data.encoding import Encoded, batches
from layerexit.errors import LayerExitError
from layerexit.evaluation.sweep import FAMILIES, Point, default_grid, evaluate_point, paper_band, select_in_band, sweep
from layerexit.model import EarlyExitModel
from layerexit.strategies import Static, family_of

EVAL_DIR = "eval"


@torch.inference_mode()
def collect_probs(
    model: EarlyExitModel,
    data: Encoded,
    batch_size: int,
    pad_id: int,
    *,
    progress: bool = False,
    depth: int | None = None,
) -> Tensor:
    """Every exit's probabilities for every example, in input order: (L, N, C)."""
    was_training = model.training
    model.eval()
    depth = depth or model.num_layers
    out = torch.zeros(depth, len(data), model.num_labels)
    device = next(model.parameters()).device
    bar = tqdm(total=len(data), desc="evaluating", disable=not progress, leave=False)
    for batch in batches(data, batch_size, pad_id, by_length=True):
        inputs = {k: v.to(device) for k, v in batch.items() if k != "index"}
        logits = model(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"), depth=depth).logits
        out[:, batch["index"]] = logits.float().softmax(-1).cpu()  # (depth, b, C)
        bar.update(len(batch["index"]))
    bar.close()
    model.train(was_training)
    return out


def per_layer_scores(probs: Tensor, labels: Tensor, metric: str) -> list[float]:
    """The metric of each exit used alone: [score of exit 1, ..., exit L]."""
    return [metrics.score(metric, p.argmax(-1), labels) for p in probs]


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
) -> tuple[dict[str, Any], dict[str, list[Point]]]:
    """Sweep every split, select each family's best setting in the band on ``select_split`` and
    report it on ``report_split``. Returns the report and the points of every split."""
    num_layers = next(iter(probs.values())).shape[0]
    grid = default_grid(num_layers, num_classes, families)
    names = metric_names(metric)
    band = band or paper_band(num_classes)
    points = {split: sweep(p, labels[split], grid, names) for split, p in probs.items()}
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
            "per_layer": {n: [round(s, 5) for s in per_layer_scores(p, y, n)] for n in names},
            "oracle": {"speedup": round(oracle.speedup, 4), **{n: round(oracle.scores[n], 5) for n in names}},
        }
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
                entry[report_split] = {
                    "speedup": round(on_report.speedup, 4),
                    **{n: round(on_report.scores[n], 5) for n in names},
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
    with replacing(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


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
    with replacing(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "label"] + [f"{name}_{what}" for name in chosen for what in ("exit", "pred")])
        for i in range(labels.numel()):
            row: list[Any] = [i, int(labels[i])]
            for pt in chosen.values():
                row += [int(pt.exit_layer[i]), int(pt.prediction[i])]
            writer.writerow(row)


def plot_tradeoff(points: list[Point], report: dict[str, Any], split: str, path: Path, title: str) -> None:
    """Metric against speed-up: each family's Pareto front, the static models, the full model, the oracle."""
    from layerexit.evaluation.analysis import pyplot, save_figure

    plt = pyplot()

    metric = report["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    fronts = [f for f in FAMILIES if family_of(f).style.front]
    for family in fronts:
        style = family_of(family).style
        pts = [p for p in points if p.strategy.name == family]
        if not pts:
            continue
        front = pareto_front([(p.speedup, p.scores[metric]) for p in pts])
        label = style.label or family
        ax.plot(*zip(*front, strict=True), "-", color=style.color, label=label, lw=1.6, marker=style.marker, ms=3)
    for family in (f for f in FAMILIES if f not in fronts):
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


def save_probs(path: Path, probs: Tensor, labels: Tensor) -> None:
    with replacing(path) as tmp:
        save_safetensors({"probs": probs.contiguous(), "labels": labels.contiguous()}, tmp)


def load_probs(path: Path) -> tuple[Tensor, Tensor]:
    try:
        data = load_file(str(path))
        probs, labels = data["probs"], data["labels"]
    except Exception as err:  # safetensors and KeyError both mean a damaged file
        raise LayerExitError(f"{path}: cannot read stored probabilities ({err})") from None
    if (
        probs.dim() != 3
        or not probs.is_floating_point()
        or labels.dim() != 1
        or labels.is_floating_point()
        or labels.numel() != probs.shape[1]
    ):
        raise LayerExitError(
            f"{path}: stored probabilities have the wrong shapes ({tuple(probs.shape)}, {tuple(labels.shape)}); "
            "evaluate with --fresh"
        )
    return probs, labels


def evaluate_run(
    run_dir: str | Path,
    *,
    splits: Sequence[str] = ("dev", "test"),
    families: Sequence[str] = FAMILIES,
    batch_size: int = 64,
    progress: bool = True,
    reuse: bool = True,
    runtime: str = "torch",
) -> dict[str, Any]:
    """Evaluate a trained run folder; writes ``<run>/eval/`` (``eval-onnx``, ``eval-onnx-int8`` for the
    exported graphs) and returns the report."""
    from layerexit.config import load_train_config
    from layerexit.training.loop import DATA_INFO

    run = Path(run_dir)
    if not (run / "config.json").is_file() or not (run / "layerexit.json").is_file():
        raise LayerExitError(f"{run} is not a layerexit run folder (config.json or layerexit.json missing)")
    check_finished(run)
    config = load_train_config(run / "config.json")
    out = run / eval_dir(runtime)
    out.mkdir(exist_ok=True)
    probs: dict[str, Tensor] = {}
    labels: dict[str, Tensor] = {}
    seconds: dict[str, float] = {}
    cache: dict[str, Any] = {}
    for split in splits:
        started = time.perf_counter()
        loaded = split_probs(
            run,
            split,
            batch_size=batch_size,
            progress=progress,
            reuse=reuse,
            required=split != "test",
            cache=cache,
            runtime=runtime,
        )
        if loaded is None:
            continue
        probs[split], labels[split] = loaded
        if cache:
            seconds[split] = round(time.perf_counter() - started, 2)
    if not probs:
        raise LayerExitError(f"nothing to evaluate in {run}: none of the splits {list(splits)} exist")
    info = _read_data_info(run / DATA_INFO)
    num_classes = len(info["label_names"])
    for split, p in probs.items():
        if p.shape[-1] != num_classes:
            raise LayerExitError(
                f"{run}: {split} probabilities have {p.shape[-1]} classes, data.json names {num_classes}"
            )
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
    )
    report["run"] = str(run)
    report["task"] = info["task"]
    report["model"] = config.model
    report["objective"] = config.objective
    report["runtime"] = runtime
    report["forward_seconds"] = _carried_seconds(out / "report.json", seconds)
    _write_json(out / "report.json", report)
    write_points_csv(points, out / "points.csv")
    write_exit_layers_csv(
        report, points, probs[report_split], labels[report_split], report_split, out / "exit_layers.csv"
    )
    plot_tradeoff(
        points[report_split],
        report,
        report_split,
        out / "tradeoff.png",
        f"{info['task']} · {config.model} · {config.objective}"
        + (f" (lambda={config.lam:g})" if config.objective == "ensemble" else "")
        + f" · {report_split} split",
    )
    return report


def _carried_seconds(previous: Path, seconds: dict[str, float]) -> dict[str, float]:
    """Forward-pass times of this evaluation; a split replayed from stored probabilities keeps the
    time measured when they were computed."""
    if previous.is_file():
        try:
            old = json.loads(previous.read_text(encoding="utf-8")).get("forward_seconds", {})
        except (OSError, ValueError):
            old = {}
        if isinstance(old, dict):
            return {**{k: v for k, v in old.items() if isinstance(v, int | float)}, **seconds}
    return seconds


def eval_dir(runtime: str) -> str:
    """Where a runtime's evaluation goes inside a run folder."""
    if runtime not in ("torch", "onnx", "onnx-int8"):
        raise LayerExitError(f"unknown runtime {runtime!r}; expected torch, onnx or onnx-int8")
    return EVAL_DIR if runtime == "torch" else f"{EVAL_DIR}-{runtime}"


def split_probs(
    run: Path,
    split: str,
    *,
    batch_size: int = 64,
    progress: bool = False,
    reuse: bool = True,
    required: bool = True,
    cache: dict[str, Any] | None = None,
    runtime: str = "torch",
) -> tuple[Tensor, Tensor] | None:
    """Per-layer probabilities (L, N, C) and labels of a run's split: stored in ``<run>/eval/`` (or
    ``eval-onnx``, ``eval-onnx-int8`` for the exported graphs) after the first forward pass and read back
    from there afterwards. ``cache`` keeps the loaded model between calls."""
    stored = run / eval_dir(runtime) / f"probs_{split}.safetensors"
    if reuse and stored.is_file():
        return load_probs(stored)
    cache = {} if cache is None else cache
    if "model" not in cache:
        cache["model"] = EarlyExitModel.from_pretrained(run)
    model = cache["model"]
    loaded = load_run_split(run, split, model, required=required)
    if loaded is None:
        return None
    encoded, pad_id = loaded
    if runtime == "torch":
        probs = collect_probs(model, encoded, batch_size, pad_id, progress=progress)
    else:
        if "onnx" not in cache:
            from layerexit.runtime.onnx_runtime import OnnxEarlyExitModel, export_dir_for

            folder = export_dir_for(run, quantize=runtime == "onnx-int8")
            if not folder.is_dir():
                raise LayerExitError(f"{folder} does not exist; run `layerexit export {run}` first")
            cache["onnx"] = OnnxEarlyExitModel.load(folder)
        probs = torch.zeros(model.num_layers, len(encoded), model.num_labels)
        for batch in batches(encoded, batch_size, pad_id, by_length=True):
            probs[:, batch["index"]] = cache["onnx"].forward_all(
                batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
            )  # (L, b, C)
    stored.parent.mkdir(exist_ok=True)
    save_probs(stored, probs, encoded.labels)
    return probs, encoded.labels


def load_run_split(
    run: Path, split: str, model: EarlyExitModel, *, required: bool = True, limit: int = 0
) -> tuple[Encoded, int] | None:
    """A split of a run's task, tokenised as in training: (encoded, pad id). None if absent and not required."""
    from layerexit.config import load_train_config
    from layerexit.data.encoding import load_tokenizer
    from layerexit.training.loop import encode_split

    config = load_train_config(run / "config.json")
    task = config.load_task()
    examples = task.splits.get(split)
    if not examples:
        if not required:
            return None
        raise LayerExitError(f"task {task.name!r} has no {split!r} split; available: {sorted(task.splits)}")
    if limit:
        examples = examples[:limit]
    tokenizer = load_tokenizer(run / "backbone")
    encoded = encode_split(tokenizer, examples, config.max_length, model.backbone.uses_token_type_ids)
    return encoded, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def check_finished(run: Path) -> None:
    """Refuse a run whose training was interrupted: its weights are not the final ones."""
    from layerexit.training.checkpoint import CHECKPOINT_DIR
    from layerexit.training.loop import SUMMARY

    if not (run / SUMMARY).is_file() and any((run / (CHECKPOINT_DIR + s)).exists() for s in ("", ".old")):
        raise LayerExitError(
            f"training of {run} did not finish ({SUMMARY} missing); finish it with "
            f"`layerexit train --resume --output {run}`"
        )


def _read_data_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LayerExitError(f"{path}: cannot read the run's data description ({err})") from None
    if not isinstance(info, dict) or not all(k in info for k in ("label_names", "metric", "task")):
        raise LayerExitError(f"{path}: not a run's data description (label_names, metric, task expected)")
    return info


def _write_json(path: Path, data: Any) -> None:
    write_json(path, data)


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
    lo, hi = report["band"]
    lines.append("")
    lines.append(f"Best setting per strategy with speed-up in {lo:.1f}x-{hi:.1f}x, chosen on {sel}, reported on {rep}:")
    lines.append(f"{'strategy':<10} {'setting':<52} {'speed-up':>9} {metric:>9}")
    for family, entry in report["selected"].items():
        if entry is None:
            lines.append(f"{family:<10} {'(no setting in the band)':<52}")
            continue
        shown = entry.get(rep, entry[sel])
        lines.append(f"{family:<10} {entry['setting']:<52} {shown['speedup']:>8.2f}x {shown[metric]:>9.4f}")
    full = report["splits"][rep]["full_model"][metric]
    lines.append(f"{'full':<10} {'all layers':<52} {1.0:>8.2f}x {full:>9.4f}")
    return "\n".join(lines)
