"""The study of ``docs/results.md``, rebuilt from the committed per-run reports alone: no weights,
no retraining, no stored probabilities.

    python scripts/study.py            # rewrite the generated tables of docs/results.md and its figures
    python scripts/study.py --check    # exit 1 if docs/results.md is not what the committed reports give

Every table lives in ``docs/results.md`` between ``<!-- study:NAME -->`` and ``<!-- /study:NAME -->``;
the prose around them is written by hand. The inputs are the folders of ``studies/results/`` written by
``scripts/results.py collect`` (per run: ``config.json``, ``data.json``, ``train_summary.json``,
``eval/report.json``, ``eval/points.csv``, ``eval/exit_layers.csv``).

Noise is given two ways: the spread over seeds (a seed changes the initialisation of the exits, the
data order and the training, dev and test subsets), and paired bootstrap intervals over test examples
(2,000 resamples, percentile 95%): two methods trained with the same seed are scored on the same
test examples, so their difference is resampled example by example.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # studylib and study_full, beside this file

from study_full import tables as full_tables
from study_recipe import tables as recipe_tables
from studylib import (
    Run,
    StudyError,
    cell_value,
    differences_table,
    envelope,
    fmt_cell,
    load_folder,
    rows_table,
    seeds_of,
    select_in_band,
    table,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "studies" / "results"
FIGURES = ROOT / "docs" / "figures"
DOC = ROOT / "docs" / "results.md"
KS = (0.0, 0.25, 0.5, 0.75)
LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.5)
SPEEDUPS = (1.2, 1.4, 1.6, 1.8, 2.0, 2.5)


@dataclass(frozen=True)
class Study:
    """One (task, backbone) of the study and the committed folders that hold its runs."""

    name: str
    task: str
    kind: str
    model: str
    folders: tuple[str, ...]


STUDIES = (
    Study(
        "tweets-binary",
        "tweets-binary",
        "binary, sentiment",
        "MiniLM-L6",
        ("tweets-binary-minilm", "tweets-binary-minilm-3seeds"),
    ),
    Study(
        "snli-binary",
        "snli-binary",
        "binary, sentence pairs",
        "MiniLM-L6",
        ("snli-binary-minilm", "snli-binary-minilm-3seeds"),
    ),
    Study("tweets", "tweets", "3 classes, sentiment", "MiniLM-L6", ("tweets-minilm", "tweets-minilm-3seeds")),
    Study("bbc", "bbc", "5 classes, topic", "MiniLM-L6", ("bbc-minilm", "bbc-minilm-3seeds")),
    Study("tweets-binary (MPNet)", "tweets-binary", "binary, sentiment", "MPNet-base", ("tweets-binary-mpnet",)),
)
LAMBDA_FOLDER = "lambda-tweets-binary-minilm"  # lam<value>/ compare folders; lambda 0.3 is the main study's run

# rows of the main table: (label, method, strategy); strategy "full" is the last exit, "static" the static model
MAIN_ROWS = (
    ("full model (fine-tuned)", "finetune", "full"),
    ("static, first 4 layers", "static:4", "static"),
    ("static, first 3 layers", "static:3", "static"),
    ("DeeBERT + entropy", "deebert", "entropy"),
    ("FastBERT + entropy", "fastbert", "entropy"),
    ("PABEE + patience", "pabee", "patience"),
    ("ours + patience", "ensemble", "patience"),
    ("ours + voting", "ensemble", "voting"),
    ("ours + entropy", "ensemble", "entropy"),
    ("ours + hybrid (vote or entropy)", "ensemble", "hybrid"),
    ("ours, full depth", "ensemble", "full"),
    ("PABEE, full depth", "pabee", "full"),
    ("ours, oracle", "ensemble", "oracle"),
    ("PABEE, oracle", "pabee", "oracle"),
)
# paired differences: (label, (method, column), (method, column)); columns are exit_layers.csv's <name>_pred
PAIRS = (
    ("ours + voting − PABEE + patience", ("ensemble", "voting"), ("pabee", "patience")),
    ("ours + patience − PABEE + patience", ("ensemble", "patience"), ("pabee", "patience")),
    ("ours + entropy − PABEE + patience", ("ensemble", "entropy"), ("pabee", "patience")),
    ("ours + voting − ours + entropy", ("ensemble", "voting"), ("ensemble", "entropy")),
    ("ours + voting − full model (fine-tuned)", ("ensemble", "voting"), ("finetune", "full")),
    ("PABEE + patience − full model (fine-tuned)", ("pabee", "patience"), ("finetune", "full")),
)


def load_study(study: Study, results: Path) -> dict[tuple[str, int], Run]:
    runs: dict[tuple[str, int], Run] = {}
    for name in study.folders:
        runs.update(load_folder(results / name))
    return runs


# ----------------------------------------------------------------------------------------- numbers


# ------------------------------------------------------------------------------------------ tables


def main_table(studies: dict[Study, dict[tuple[str, int], Run]]) -> str:
    return rows_table({f"{s.name}<br>{s.kind}": runs for s, runs in studies.items()}, MAIN_ROWS)


def pairs_table(studies: dict[Study, dict[tuple[str, int], Run]]) -> str:
    return differences_table({s.name: runs for s, runs in studies.items()}, PAIRS)


def k_table(studies: dict[Study, dict[tuple[str, int], Run]]) -> str:
    header = ["k"] + [s.name for s in studies]
    rows = []
    for k in KS:
        row = [f"voting, k = {k:g}"]
        for runs in studies.values():
            values = [
                v for seed in seeds_of(runs, "ensemble") if (v := select_in_band(runs[("ensemble", seed)], "voting", k))
            ]
            row.append(fmt_cell(values))
        rows.append(row)
    for label, strategy in (("patience", "patience"), ("entropy", "entropy")):
        row = [label]
        for runs in studies.values():
            values = [v for seed in seeds_of(runs, "ensemble") if (v := cell_value(runs[("ensemble", seed)], strategy))]
            row.append(fmt_cell(values))
        rows.append(row)
    for label, strategy in (("vote of all exits (no early exit)", "voting"), ("last exit (no early exit)", "full")):
        row = [label]
        for runs in studies.values():
            seeds = seeds_of(runs, "ensemble")
            if strategy == "full":
                values = [v for seed in seeds if (v := cell_value(runs[("ensemble", seed)], "full"))]
            else:
                # every sample at the last layer: the prediction is the vote of all exits
                values = [(all_exits_vote(runs[("ensemble", seed)]), 1.0) for seed in seeds]
            row.append(fmt_cell(values))
        rows.append(row)
    return table(header, rows)


def all_exits_vote(run: Run) -> float:
    """Voting with a threshold no sample reaches early: all exit at the last layer with the vote of all exits."""
    return max(m for s, m in run.test_points("voting") if s == 1.0)


def curves(run: Run) -> dict[str, list[tuple[float, float]]]:
    out = {"entropy": run.test_points("entropy"), "patience": run.test_points("patience")}
    out["voting"] = run.test_points("voting")
    for k in KS:
        out[f"voting k={k:g}"] = run.test_points("voting", k)
    return out


def crossover_table(studies: dict[Study, dict[tuple[str, int], Run]]) -> str:
    header = ["ours: voting − other (points)", *(f"≥ {s:g}x" for s in SPEEDUPS)]
    rows = []
    for study, runs in studies.items():
        seeds = seeds_of(runs, "ensemble")
        if not seeds:
            continue
        for other in ("entropy", "patience"):
            row = [f"{study.name}: voting − {other}"]
            for s in SPEEDUPS:
                diffs = []
                for seed in seeds:
                    c = curves(runs[("ensemble", seed)])
                    diffs.append(envelope(c["voting"], s) - envelope(c[other], s))
                finite = [d for d in diffs if not np.isnan(d)]
                row.append(f"{100 * statistics.mean(finite):+.1f}" if len(finite) == len(diffs) else "–")
            rows.append(row)
    return table(header, rows)


MATCHED = (
    ("ours + voting − PABEE + patience", ("ensemble", "voting"), ("pabee", "patience")),
    ("ours + entropy − PABEE + patience", ("ensemble", "entropy"), ("pabee", "patience")),
)


def matched_table(studies: dict[Study, dict[tuple[str, int], Run]]) -> str:
    """Two methods at matched speed-up: the best test accuracy of each among settings at least s
    times faster than the full model (the same optimistic choice for both), difference averaged over
    the seeds both have."""
    header = ["difference (points)", *(f"≥ {s:g}x" for s in SPEEDUPS)]
    rows = []
    for study, runs in studies.items():
        for label, a, b in MATCHED:
            seeds = sorted(set(seeds_of(runs, a[0])) & set(seeds_of(runs, b[0])))
            if not seeds:
                continue
            row = [f"{study.name}: {label}"]
            for s in SPEEDUPS:
                diffs = [
                    envelope(runs[(a[0], seed)].test_points(a[1]), s)
                    - envelope(runs[(b[0], seed)].test_points(b[1]), s)
                    for seed in seeds
                ]
                row.append("–" if any(np.isnan(d) for d in diffs) else f"{100 * statistics.mean(diffs):+.1f}")
            rows.append(row)
    return table(header, rows)


def lambda_runs(results: Path, main: dict[tuple[str, int], Run]) -> dict[float, Run]:
    out: dict[float, Run] = {}
    folder = results / LAMBDA_FOLDER
    for lam in LAMBDAS:
        runs = load_folder(folder / f"lam{lam:g}")
        if ("ensemble", 0) in runs:
            out[lam] = runs[("ensemble", 0)]
        elif lam == 0.3 and ("ensemble", 0) in main:
            out[lam] = main[("ensemble", 0)]
    for lam, run in out.items():
        got = float(json.loads((run.path / "config.json").read_text(encoding="utf-8"))["lam"])
        if abs(got - lam) > 1e-9:
            raise StudyError(f"{run.path}/config.json has lambda {got}, expected {lam}")
    return out


def lambda_table(runs: dict[float, Run]) -> str:
    if not runs:
        return "(no lambda runs committed)"
    layers = next(iter(runs.values())).report["num_layers"]
    header = ["lambda", *(f"exit {i}" for i in range(1, layers + 1)), "patience", "voting", "entropy", "oracle"]
    rows = []
    for lam, run in sorted(runs.items()):
        per_layer = run.report["splits"]["test"]["per_layer"][run.metric]
        row = [f"{lam:g}", *(f"{100 * v:.1f}" for v in per_layer)]
        for strategy in ("patience", "voting", "entropy", "oracle"):
            v = cell_value(run, strategy)
            row.append("–" if v is None else f"{100 * v[0]:.1f} ({v[1]:.2f}x)")
        rows.append(row)
    return table(header, rows)


def timing_table(studies: dict[Study, dict[tuple[str, int], Run]], lam: dict[float, Run]) -> str:
    header = ["study", "method", "runs", "training s (mean)", "steps", "train / dev / test examples"]
    rows = []
    total = 0.0
    for study, runs in studies.items():
        for spec in dict.fromkeys(s for s, _ in sorted(runs)):
            chosen = [runs[(spec, seed)] for seed in seeds_of(runs, spec)]
            seconds = [r.train["seconds"] for r in chosen]
            total += sum(seconds)
            steps = sum(stage["steps"] for stage in chosen[0].train["stages"])
            cfg = chosen[0].train["config"]
            sizes = json.loads((chosen[0].path / "data.json").read_text(encoding="utf-8"))["sizes"]
            rows.append(
                [
                    study.name,
                    spec,
                    str(len(chosen)),
                    f"{statistics.mean(seconds):.0f}",
                    str(steps),
                    f"{sizes['train']} / {sizes.get('dev', 0)} / {sizes.get('test', 0)}, "
                    + (f"{cfg['epochs']} epochs" if cfg["epochs"] != 1 else "1 epoch"),
                ]
            )
    extra = [r for lam_value, r in sorted(lam.items()) if lam_value != 0.3]
    if extra:
        seconds = [r.train["seconds"] for r in extra]
        total += sum(seconds)
        rows.append(
            ["tweets-binary lambda sweep", "ensemble", str(len(extra)), f"{statistics.mean(seconds):.0f}", "", ""]
        )
    rows.append(["all", "", "", f"{total / 3600:.2f} h in all", "", ""])
    return table(header, rows)


# ----------------------------------------------------------------------------------------- figures


def plot_crossover(studies: dict[Study, dict[tuple[str, int], Run]], path: Path) -> None:
    from layerexit.evaluation.analysis import pyplot, save_figure

    plt = pyplot()
    shown = [(s, r) for s, r in studies.items() if seeds_of(r, "ensemble")]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.3 * len(shown), 3.2), dpi=90, squeeze=False)
    grid = np.linspace(1.0, 3.0, 41)
    styles = {
        "entropy": ("C3", "-"),
        "patience": ("C2", "-"),
        "voting k=0": ("C0", "-"),
        "voting k=0.25": ("C0", "--"),
        "voting k=0.5": ("C0", "-."),
        "voting k=0.75": ("C0", ":"),
    }
    for ax, (study, runs) in zip(axes[0], shown, strict=True):
        per_seed = [curves(runs[("ensemble", seed)]) for seed in seeds_of(runs, "ensemble")]
        for name, (color, style) in styles.items():
            ys = np.array([[envelope(c[name], s) for s in grid] for c in per_seed])
            ax.plot(grid, 100 * ys.mean(axis=0), style, color=color, lw=1.3, label=f"ours + {name}")
        pabee = [curves(runs[("pabee", seed)])["patience"] for seed in seeds_of(runs, "pabee")]
        if pabee:
            ys = np.array([[envelope(c, s) for s in grid] for c in pabee])
            ax.plot(grid, 100 * ys.mean(axis=0), "-", color="0.5", lw=1, label="PABEE + patience")
        ax.axvspan(*runs[("ensemble", seeds_of(runs, "ensemble")[0])].report["band"], color="0.93", zorder=0)
        ax.set_title(f"{study.name} ({len(per_seed)} seed{'s' if len(per_seed) > 1 else ''})", fontsize=9)
        ax.set_xlabel("speed-up at least")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("best test accuracy (%)")
    axes[0][0].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path)


def plot_lambda(runs: dict[float, Run], path: Path) -> None:
    from layerexit.evaluation.analysis import pyplot, save_figure

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
    grid = np.linspace(1.0, 3.0, 41)
    for i, (lam, run) in enumerate(sorted(runs.items())):
        color = f"C{i}"
        per_layer = run.report["splits"]["test"]["per_layer"][run.metric]
        left.plot(
            range(1, len(per_layer) + 1), [100 * v for v in per_layer], "o-", color=color, ms=3, label=f"λ={lam:g}"
        )
        c = curves(run)
        right.plot(grid, [100 * envelope(c["voting"], s) for s in grid], "-", color=color, label=f"λ={lam:g} voting")
        right.plot(grid, [100 * envelope(c["patience"], s) for s in grid], ":", color=color)
    left.set_xlabel("exit")
    left.set_ylabel("test accuracy (%)")
    left.set_title("each exit alone", fontsize=9)
    right.set_xlabel("speed-up at least")
    right.set_title("voting (solid), patience (dotted)", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------- document


def generate(results: Path) -> tuple[dict[str, str], dict[Study, dict[tuple[str, int], Run]], dict[float, Run]]:
    studies = {s: runs for s in STUDIES if (runs := load_study(s, results))}
    if not studies:
        raise StudyError(f"no committed study under {results}")
    main_runs = studies.get(STUDIES[0], {})
    lam = lambda_runs(results, main_runs)
    tables = {
        **recipe_tables(results),
        **full_tables(results),
        "main": main_table(studies),
        "pairs": pairs_table(studies),
        "k": k_table(studies),
        "crossover": crossover_table(studies),
        "matched": matched_table(studies),
        "lambda": lambda_table(lam),
        "timing": timing_table(studies, lam),
    }
    return tables, studies, lam


BLOCK = re.compile(r"(<!-- study:(?P<name>[a-z]+) -->\n)(?P<body>.*?)(<!-- /study:(?P=name) -->)", re.S)


def fill(doc: str, tables: dict[str, str], where: Path) -> str:
    found = {m.group("name") for m in BLOCK.finditer(doc)}
    missing = sorted(set(tables) - found)
    if missing:
        raise StudyError(
            f"{where} has no block for {', '.join(missing)} (write <!-- study:NAME --> <!-- /study:NAME -->)"
        )
    unknown = sorted(found - set(tables))
    if unknown:
        raise StudyError(f"{where} has blocks no table fills: {', '.join(unknown)}")
    return BLOCK.sub(lambda m: m.group(1) + tables[m.group("name")] + "\n" + m.group(4), doc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="do not write; fail if the document differs")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        tables, studies, lam = generate(args.results)
        if not args.doc.is_file():
            raise StudyError(f"{args.doc} does not exist")
        doc = args.doc.read_text(encoding="utf-8")
        new = fill(doc, tables, args.doc)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if new != doc:
            stale = [m.group("name") for m in BLOCK.finditer(doc) if tables[m.group("name")] + "\n" != m.group("body")]
            print(f"{args.doc} is stale: tables {', '.join(stale)} differ from the committed reports", file=sys.stderr)
            print("run: python scripts/study.py", file=sys.stderr)
            return 1
        print(f"{args.doc}: {len(tables)} tables match the committed reports")
        return 0
    tmp = args.doc.with_name(args.doc.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(args.doc)
    figures = FIGURES
    figures.mkdir(exist_ok=True)
    plot_crossover(studies, figures / "crossover.png")
    if lam:
        plot_lambda(lam, figures / "lambda.png")
    print(f"wrote {args.doc} ({len(tables)} tables) and {figures}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
