"""The full-scale study of ``docs/results.md`` (issue 12): its tables, from the committed ``full-*`` folders.

Every step of ``scripts/full_study.sh`` writes one compare folder, collected as ``studies/results/full-<name>``
by ``scripts/results.py collect``. The folders of one study share a prefix (``full-tweets-binary-minilm``)
and their suffix says what they hold:

    (none), -seeds12, -finetune, -baselines,   the runs as they are (PABEE, the fine-tuned model, ...),
    -deebert, -fastbert, -finetune-seeds1      a -seeds<N> tail for seeds run in a folder of their own
    -lam<λ>, -lam<λ>-seeds12                    ours (linear weights) at λ; seed 0 of each λ picks λ
    -uniform-lam<λ>                             ours with uniform weights at the chosen λ (ablation)

λ is chosen on dev, never on test: the λ whose seed-0 run has the highest dev accuracy with voting at the
setting chosen on dev in the band (ties to the smaller λ). A study may take its λ from another (MPNet
uses the MiniLM choice on the same task).
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from studylib import (
    Run,
    StudyError,
    cell_value,
    differences_table,
    load_folder,
    paired_difference,
    rows_table,
    seeds_of,
    table,
)


@dataclass(frozen=True)
class FullStudy:
    name: str
    kind: str
    prefix: str  # folders studies/results/<prefix>[suffix]
    lambda_from: str | None = None  # the prefix whose dev choice of lambda this study uses


FULL_STUDIES = (
    FullStudy("tweets-binary", "binary, sentiment, MiniLM-L6", "full-tweets-binary-minilm"),
    FullStudy("snli-binary", "binary, sentence pairs, MiniLM-L6", "full-snli-binary-minilm"),
    FullStudy(
        "tweets-binary (MPNet)",
        "binary, sentiment, MPNet-base",
        "full-tweets-binary-mpnet",
        "full-tweets-binary-minilm",
    ),
)
SUFFIX = re.compile(
    r"^(?:-(?P<uniform>uniform-)?lam(?P<lam>\d+(?:\.\d+)?))?(?:-(?:finetune|baselines|deebert|fastbert))?(?:-seeds\d+)?$"
)

FULL_ROWS = (
    ("full model (fine-tuned)", "finetune", "full"),
    ("DeeBERT + entropy", "deebert", "entropy"),
    ("FastBERT + entropy", "fastbert", "entropy"),
    ("PABEE + patience", "pabee", "patience"),
    ("PABEE + entropy", "pabee", "entropy"),
    ("ours + voting", "ensemble", "voting"),
    ("ours + patience", "ensemble", "patience"),
    ("ours + entropy", "ensemble", "entropy"),
    ("ours + hybrid (vote or entropy)", "ensemble", "hybrid"),
    ("ours, uniform weights + voting (ablation)", "ensemble-uniform", "voting"),
    ("ours, full depth", "ensemble", "full"),
    ("PABEE, full depth", "pabee", "full"),
    ("ours, oracle", "ensemble", "oracle"),
    ("PABEE, oracle", "pabee", "oracle"),
)
FULL_PAIRS = (
    ("ours + voting − PABEE + patience", ("ensemble", "voting"), ("pabee", "patience")),
    ("ours + patience − PABEE + patience", ("ensemble", "patience"), ("pabee", "patience")),
    ("ours + entropy − PABEE + entropy", ("ensemble", "entropy"), ("pabee", "entropy")),
    ("ours + voting − ours, full depth (same models)", ("ensemble", "voting"), ("ensemble", "full")),
    ("PABEE + patience − PABEE, full depth (same models)", ("pabee", "patience"), ("pabee", "full")),
    ("ours + voting − full model (fine-tuned)", ("ensemble", "voting"), ("finetune", "full")),
    ("PABEE + patience − full model (fine-tuned)", ("pabee", "patience"), ("finetune", "full")),
    ("ours + voting − ours uniform + voting", ("ensemble", "voting"), ("ensemble-uniform", "voting")),
    ("ours + voting − DeeBERT + entropy", ("ensemble", "voting"), ("deebert", "entropy")),
    ("ours + voting − FastBERT + entropy", ("ensemble", "voting"), ("fastbert", "entropy")),
)


@dataclass
class Loaded:
    runs: dict[tuple[str, int], Run]  # what the tables show, ours at the chosen lambda
    lambdas: dict[float, Run]  # seed 0 of ours at each lambda tried
    chosen: float | None


def dev_voting(run: Run) -> float:
    chosen = run.report["selected"].get("voting")
    if chosen is None:
        raise StudyError(f"{run.path}/eval/report.json has no voting setting selected")
    return float(chosen[run.report["select_split"]][run.metric])


def choose_lambda(lambdas: dict[float, Run]) -> float | None:
    if not lambdas:
        return None
    return max(sorted(lambdas), key=lambda lam: dev_voting(lambdas[lam]))  # max keeps the first (smaller) on ties


def load(results: Path, study: FullStudy, choices: dict[str, float | None]) -> Loaded:
    parsed = []
    for folder in sorted(results.glob(f"{study.prefix}*")):
        match = SUFFIX.match(folder.name[len(study.prefix) :])
        if match is None or not (folder / "compare.json").is_file():
            continue
        parsed.append((folder, match.group("lam"), bool(match.group("uniform")), load_folder(folder)))
    lambdas: dict[float, Run] = {}
    for _, lam, uniform, runs in parsed:
        if lam is not None and not uniform and ("ensemble", 0) in runs:
            lambdas[float(lam)] = runs[("ensemble", 0)]
    chosen = choices[study.lambda_from] if study.lambda_from else choose_lambda(lambdas)
    shown: dict[tuple[str, int], Run] = {}
    for _, lam, uniform, runs in parsed:
        if lam is not None and (chosen is None or abs(float(lam) - chosen) > 1e-9):
            continue
        for (spec, seed), run in runs.items():
            key = ("ensemble-uniform" if uniform else spec, seed)
            if key in shown:
                raise StudyError(f"{run.path} and {shown[key].path} are both {key[0]} seed {key[1]}")
            shown[key] = run
    for (spec, _), run in shown.items():
        weighting = run.train["config"].get("weighting")
        want = "uniform" if spec == "ensemble-uniform" else "linear" if spec == "ensemble" else None
        if want is not None and weighting != want:
            raise StudyError(f"{run.path}: {spec} should have {want} weights, its config says {weighting}")
    return Loaded(shown, lambdas, chosen)


def load_all(results: Path) -> dict[FullStudy, Loaded]:
    choices: dict[str, float | None] = {}
    out = {}
    for study in FULL_STUDIES:  # a study that takes its lambda from another comes after it
        loaded = load(results, study, choices)
        choices[study.prefix] = loaded.chosen
        if loaded.runs or loaded.lambdas:
            out[study] = loaded
    return out


def lambda_table(studies: dict[FullStudy, Loaded]) -> str:
    header = ["study", "λ", "dev: voting (chosen on dev)", "test: voting", "test: last exit", "training"]
    rows = []
    names = {s.prefix: s.name for s in studies}
    for study, loaded in studies.items():
        for lam, run in sorted(loaded.lambdas.items()):
            test = cell_value(run, "voting")
            last = cell_value(run, "full")
            assert last is not None
            dev = run.report["selected"]["voting"][run.report["select_split"]]
            # bold: chosen by this study's dev; a study that takes its lambda from another says whose it is
            mark = "**" if lam == loaded.chosen and study.lambda_from is None else ""
            taken = f" (from the {names.get(study.lambda_from, study.lambda_from)} study)" if study.lambda_from else ""
            rows.append(
                [
                    study.name,
                    f"{mark}{lam:g}{mark}{taken}",
                    f"{mark}{100 * dev_voting(run):.2f}{mark} ({dev['speedup']:.2f}x)",
                    "–" if test is None else f"{100 * test[0]:.2f} ({test[1]:.2f}x)",
                    f"{100 * last[0]:.2f}",
                    f"{run.train['seconds'] / 60:.0f} min",
                ]
            )
    return table(header, rows) if rows else "(no lambda runs committed yet)"


def timing_table(studies: dict[FullStudy, Loaded]) -> str:
    header = ["study", "method", "seeds", "training min (mean)", "optimizer steps", "train / dev / test examples"]
    rows = []
    total = 0.0
    for study, loaded in studies.items():
        shown = {r.path for r in loaded.runs.values()}
        groups = {spec: [loaded.runs[(spec, s)] for s in seeds_of(loaded.runs, spec)] for spec, _ in loaded.runs}
        others = [r for _, r in sorted(loaded.lambdas.items()) if r.path not in shown]
        if others:
            groups["ensemble, other λ"] = others
        for spec, chosen in groups.items():
            seconds = [r.train["seconds"] for r in chosen]
            total += sum(seconds)
            sizes = json.loads((chosen[0].path / "data.json").read_text(encoding="utf-8"))["sizes"]
            cfg = chosen[0].train["config"]
            # a run started from another's first stage (compare --finetune-from) timed its own stages only
            reused = any("trained_in" in stage for r in chosen for stage in r.train["stages"])
            note = " (its second stage; finetune's first)" if reused else ""
            rows.append(
                [
                    study.name,
                    spec,
                    ", ".join(str(r.seed) for r in chosen),
                    f"{statistics.mean(seconds) / 60:.0f}{note}",
                    str(sum(stage["steps"] for stage in chosen[0].train["stages"])),
                    f"{sizes['train']} / {sizes.get('dev', 0)} / {sizes.get('test', 0)}, {cfg['epochs']} epochs",
                ]
            )
    rows.append(["all", "", "", f"{total / 3600:.1f} h of training", "", ""])
    return table(header, rows)


# the measurements behind the --head-lr and --epochs defaults: ours at the chosen lambda, seed 0, one
# option changed per folder <prefix>-lam<λ><suffix> (scripts/full_study.sh tb-onelr, tb-epochs3)
DEFAULT_VARIANTS = ("-onelr", "-epochs3")


def defaults_table(results: Path, studies: dict[FullStudy, Loaded]) -> str:
    header = [
        "study",
        "encoder lr, exits lr, epochs",
        "dev: voting (chosen on dev)",
        "dev: last exit",
        "test: voting",
        "test: last exit",
        "test: voting − defaults",
        "best epoch",
        "training",
    ]
    rows = []
    for study, loaded in studies.items():
        if loaded.chosen is None or study.lambda_from is not None or loaded.chosen not in loaded.lambdas:
            continue
        base = loaded.lambdas[loaded.chosen]
        variants = []
        for suffix in DEFAULT_VARIANTS:
            folder = results / f"{study.prefix}-lam{loaded.chosen:g}{suffix}"
            run = load_folder(folder).get(("ensemble", 0))
            if run is not None:
                variants.append(run)
        if not variants:
            continue
        for run in (base, *variants):
            cfg = run.train["config"]
            split = run.report["select_split"]
            dev = run.report["splits"][split]
            test, last = cell_value(run, "voting"), cell_value(run, "full")
            assert test is not None and last is not None
            if run is base:
                against = "(the defaults)"
            else:
                got = paired_difference({("a", 0): run, ("b", 0): base}, ("a", "voting"), ("b", "voting"))
                assert got is not None
                diff, lo, hi, *_ = got
                against = f"{100 * diff:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"
            stage = run.train["stages"][-1]
            rows.append(
                [
                    f"{study.name}, λ = {loaded.chosen:g}, seed {run.seed}",
                    f"{cfg['lr']:g}, {cfg['head_lr']:g}, {cfg['epochs']}",
                    f"{100 * dev_voting(run):.2f} ({run.report['selected']['voting'][split]['speedup']:.2f}x)",
                    f"{100 * dev['full_model'][run.metric]:.2f}",
                    f"{100 * test[0]:.2f} ({test[1]:.2f}x)",
                    f"{100 * last[0]:.2f}",
                    against,
                    f"{stage['best_epoch']} of {cfg['epochs']}",
                    f"{run.train['seconds'] / 60:.0f} min",
                ]
            )
    return table(header, rows) if rows else "(no runs of other defaults committed yet)"


def tables(results: Path) -> dict[str, str]:
    studies = load_all(results)
    if not studies:
        raise StudyError(f"no full-scale study under {results} (folders {', '.join(s.prefix for s in FULL_STUDIES)})")
    columns = {f"{s.name}<br>{s.kind}": loaded.runs for s, loaded in studies.items() if loaded.runs}
    return {
        "fullmain": rows_table(columns, FULL_ROWS, digits=2, seeds=True),
        "fullpairs": differences_table({s.name: lo.runs for s, lo in studies.items() if lo.runs}, FULL_PAIRS, 2),
        "fulllambda": lambda_table(studies),
        "fulltiming": timing_table(studies),
        "fulldefaults": defaults_table(results, studies),
    }
