"""The recipe study of docs/results.md (issue 27): the plain fine-tuned model's answers, faster.

Rebuilt from ``studies/results/recipe/`` alone. Each folder there is one run of a method that keeps the
fine-tuned model as its last exit (``scripts/results.py collect-run``): its configuration, data and training
summary, its ``calibration.json``, and its per-layer dev and test probabilities in float16. Because the last
exit is the fine-tuned model, disagreement with the run's own full depth is disagreement with the fine-tuned
model, and every figure below is replayed from the probabilities with the library's own calibration:

* certified: ``for_risk`` at <= 1% disagreement, 90% confidence, on dev, the method's own strategy family
  (as ``layerexit calibrate --max-drop 0.01 --confidence 0.9 --loss disagreement`` does by default), its
  choice replayed on test;
* at a target speed-up: ``for_speedup`` on dev (the best dev accuracy among the settings at least that fast),
  replayed on test.

Test accuracy is compared with the fine-tuned model's, example by example: the mean over seeds of the
difference, with a paired bootstrap interval (the seeds share their test examples, so one draw of examples
resamples every seed).
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from studylib import StudyError, bootstrap, table

from layerexit.errors import LayerExitError
from layerexit.evaluation.agreement import fit_rows
from layerexit.evaluation.calibrate import check_on_test, default_families, for_risk, for_speedup, pick_default
from layerexit.evaluation.replay import GridReplay, replay_of
from layerexit.evaluation.risk import fixed_sequence
from layerexit.evaluation.sweep import FAMILIES, default_grid
from layerexit.strategies.learned import fit

MAX_DROP, CONFIDENCE = 0.01, 0.9
SPEEDUPS = (1.5, 2.0, 2.5, 3.0)
FOLDER = re.compile(
    r"(?P<setting>[a-z0-9-]+)-(?P<method>retrofit(?:-alltrain)?|pabee|ensemble|joint-distill(?:-alt)?)-seed(?P<seed>\d+)$"
)


@dataclass(frozen=True)
class Setting:
    """One setting of the study: a task with an encoder, and the speed-up the issue aims at there."""

    prefix: str
    task: str
    model: str
    target: float


SETTINGS = (
    Setting("tweets-binary-minilm", "tweets-binary", "MiniLM-L6", 2.5),
    Setting("snli-binary-minilm", "snli-binary", "MiniLM-L6", 2.0),
    Setting("tweets-binary-mpnet", "tweets-binary", "MPNet-base", 3.0),
)
METHODS = {
    "retrofit": "retrofit: exits distilled on the frozen fine-tuned encoder",
    "retrofit-alltrain": "retrofit, exits distilled on all 18,120 training tweets (labels unused)",
    "pabee": "PABEE, joint training (rerun with its answers kept)",
    "ensemble": "the paper's objective, joint training (rerun with its answers kept)",
    "joint-distill": "joint training from the fine-tuned model, every exit distilled towards it, gradient equilibrium",
    "joint-distill-alt": "the same with BERxiT's alternating steps (every other step trains the last exit alone)",
}
"""Methods whose last exit is the fine-tuned model (retrofit) and jointly trained ones, whose last exit is
not: those are certified against the committed fine-tuned run of the same seed (:func:`reference_answers`)."""
JOINT = {
    "pabee": ("patience", "entropy"),
    "ensemble": ("voting", "entropy"),
    "joint-distill": ("entropy",),
    "joint-distill-alt": ("entropy",),
}
"""Jointly trained methods and the strategy families each is certified with, one row per family."""
FROM_SCRATCH = ("pabee", "ensemble")
"""Methods trained from the pretrained encoder; the others start from the fine-tuned run, whose training
time is theirs too."""


def finetune_folder(results: Path, prefix: str, seed: int) -> Path:
    """The committed plain fine-tuned run of a setting and seed (``scripts/full_study.sh *-finetune*``)."""
    return results / (f"full-{prefix}-finetune" + ("" if seed == 0 else f"-seeds{seed}")) / f"finetune-seed{seed}"


def seconds(folder: Path) -> float:
    """A committed run's training wall-clock (``train_summary.json``)."""
    file = folder / "train_summary.json"
    if not file.is_file():
        raise StudyError(f"{file} is missing")
    return float(json.loads(file.read_text(encoding="utf-8"))["seconds"])


def reference_answers(results: Path, prefix: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The committed fine-tuned run's answers (dev, test) for a setting and seed: the model a jointly
    trained run is measured against (as ``layerexit calibrate --reference RUN`` does)."""
    folder = finetune_folder(results, prefix, seed)
    answers = []
    for split in ("dev", "test"):
        file = folder / "eval" / f"probs_{split}.safetensors"
        if not file.is_file():
            raise StudyError(f"{file} is missing: the fine-tuned reference of seed {seed} has no committed answers")
        answers.append(load_file(str(file))["probs"].float()[-1].argmax(-1))
    return answers[0], answers[1]


@dataclass
class RecipeRun:
    path: Path
    seed: int
    dev: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    reference: tuple[torch.Tensor, torch.Tensor] | None = None
    """The fine-tuned model's answers on (dev, test) where the run's own last exit is not that model."""
    dev_replay: GridReplay | None = None

    @classmethod
    def load(cls, path: Path, seed: int, reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> RecipeRun:
        splits = []
        for split in ("dev", "test"):
            file = path / "eval" / f"probs_{split}.safetensors"
            if not file.is_file():
                raise StudyError(f"{file} is missing (collect the run with scripts/results.py collect-run)")
            data = load_file(str(file))
            splits.append((data["probs"].float(), data["labels"].long()))
        if reference is not None and any(r.shape != s[1].shape for r, s in zip(reference, splits, strict=True)):
            raise StudyError(f"{path}: the fine-tuned reference was scored on other examples")
        return cls(path, seed, splits[0], splits[1], reference)

    def own_full_disagreement(self) -> float:
        """How often the run's own last exit disagrees with the fine-tuned model on dev (0 without a reference)."""
        if self.reference is None:
            return 0.0
        return float((self.dev[0][-1].argmax(-1) != self.reference[0]).double().mean())

    def full_correct(self) -> np.ndarray:
        """Test correctness of the fine-tuned model: the run's own last exit, or the reference's answers."""
        probs, labels = self.test
        answers = probs[-1].argmax(-1) if self.reference is None else self.reference[1]
        return (answers == labels).numpy()

    def certified(self, family: str | None = None) -> tuple[str, float, float, float, np.ndarray]:
        """(setting, dev speed-up, test speed-up, test disagreement with the fine-tuned model, test correctness
        of the setting). ``family``: the one strategy family tested; default the retrofit's own."""
        families = [family] if family else default_families("retrofit", risk=True)
        dev_reference, test_reference = self.reference if self.reference is not None else (None, None)
        replay = replay_of(self.dev[0], families, dev_reference)
        choice = pick_default(for_risk(replay, self.dev[1], MAX_DROP, CONFIDENCE, families, loss="disagreement"))
        check = check_on_test(choice, *self.test, reference=test_reference)
        _, prediction = choice.strategy.replay(self.test[0])
        return str(choice.strategy), choice.speedup, check.speedup, check.disagreement, self.correct(prediction)

    def certified_half(self, family: str) -> tuple[str, float, float, float, np.ndarray]:
        """:meth:`certified` on half of dev only, the other half having fitted the learned agreement rule (as
        ``layerexit fit-agreement RUN`` draws it: seed 0); ``family`` ``agreement`` tests that rule's settings."""
        num_layers, num_rows, _ = self.dev[0].shape
        rows = fit_rows(num_rows, 0.5, seed=0)
        rest = torch.ones(num_rows, dtype=torch.bool)
        rest[rows] = False
        probs, labels = self.dev[0][:, rest], self.dev[1][rest]
        rule = fit(self.dev[0], self.dev[0][-1].argmax(-1), rows, "dev") if family == "agreement" else None
        grid = default_grid(num_layers, probs.shape[2], [family], rule)
        choice = pick_default(for_risk(GridReplay.of(probs, grid), labels, MAX_DROP, CONFIDENCE, [family]))
        check = check_on_test(choice, *self.test)
        _, prediction = choice.strategy.replay(self.test[0])
        return str(choice.strategy), choice.speedup, check.speedup, check.disagreement, self.correct(prediction)

    def at_speedup(self, target: float) -> tuple[float, np.ndarray] | None:
        """(test speed-up, test correctness) of the best dev setting at least ``target`` fast; None if none is."""
        if self.dev_replay is None:  # every family's grid replayed over dev once, for every target
            self.dev_replay = replay_of(self.dev[0], FAMILIES)
        try:
            choice = pick_default(for_speedup(self.dev_replay, self.dev[1], target, FAMILIES))
        except LayerExitError:
            return None
        exit_layer, prediction = choice.strategy.replay(self.test[0])
        return self.test[0].shape[0] / float(exit_layer.double().mean()), self.correct(prediction)

    def correct(self, prediction: torch.Tensor) -> np.ndarray:
        return (prediction == self.test[1]).numpy()


@dataclass(frozen=True)
class Baseline:
    """A two-stage run of the full-scale study (DeeBERT, FastBERT): its last exit is the fine-tuned model of
    the same seed, so its own disagreement is disagreement with the fine-tuned model. Only its report is
    committed (``points.csv``: every setting's dev and test rates), so it is certified from counts."""

    path: Path
    method: str
    seed: int

    def certified(self) -> tuple[str, float, float, float, float, float]:
        """(setting, dev speed-up, test speed-up, test disagreement, test accuracy, the fine-tuned model's)."""
        report = json.loads((self.path / "eval" / "report.json").read_text(encoding="utf-8"))
        with (self.path / "eval" / "points.csv").open(encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        by_split = {split: {r["setting"]: r for r in rows if r["split"] == split} for split in ("dev", "test")}
        n = int(report["splits"]["dev"]["size"])
        classes = len(json.loads((self.path / "data.json").read_text(encoding="utf-8"))["label_names"])
        grid = default_grid(int(report["num_layers"]), classes, FAMILIES)
        missing = [str(s) for s in grid if str(s) not in by_split["dev"] or str(s) not in by_split["test"]]
        if missing:
            raise StudyError(f"{self.path}/eval/points.csv lacks settings of the calibration grid: {missing[:3]}")
        dev = [by_split["dev"][str(s)] for s in grid]
        counts = [round((1 - float(r["agreement_with_full"])) * n) for r in dev]
        speed = [float(r["speedup"]) for r in dev]
        tests = fixed_sequence(grid, default_families(self.method, risk=True), counts, n, MAX_DROP, CONFIDENCE)
        accepted = [s for test in tests.values() for s in test.accepted]
        full = float(report["splits"]["test"]["full_model"]["accuracy"])
        if not accepted:
            return "full model", 1.0, 1.0, 0.0, full, full
        best = max(accepted, key=lambda s: (speed[s], -counts[s]))
        test = by_split["test"][str(grid[best])]
        return (
            str(grid[best]),
            speed[best],
            float(test["speedup"]),
            1 - float(test["agreement_with_full"]),
            float(test["accuracy"]),
            full,
        )


BASELINES = {"deebert": "DeeBERT (entropy exits on the frozen encoder)", "fastbert": "FastBERT (self-distilled exits)"}


def load_baselines(results: Path) -> dict[tuple[str, str], list[Baseline]]:
    """(setting prefix, method) -> the committed full-scale runs of DeeBERT and FastBERT."""
    found: dict[tuple[str, str], list[Baseline]] = {}
    for setting in SETTINGS:
        for method in BASELINES:
            folder = results / f"full-{setting.prefix}-{method}"
            runs = sorted(folder.glob(f"{method}-seed*")) if folder.is_dir() else []
            found[(setting.prefix, method)] = [Baseline(p, method, int(p.name.rsplit("seed", 1)[1])) for p in runs]
    return found


def load_recipe(results: Path) -> dict[tuple[str, str], list[RecipeRun]]:
    """(setting prefix, method) -> its runs, by seed."""
    found: dict[tuple[str, str], list[RecipeRun]] = {}
    folder = results / "recipe"
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = FOLDER.match(path.name)
        if match is None or not path.is_dir():
            continue
        key, seed = (match["setting"], match["method"]), int(match["seed"])
        reference = reference_answers(results, key[0], seed) if key[1] in JOINT else None
        found.setdefault(key, []).append(RecipeRun.load(path, seed, reference))
    for runs in found.values():
        runs.sort(key=lambda r: r.seed)
        labels = runs[0].test[1]
        for run in runs[1:]:
            if not torch.equal(run.test[1], labels):
                raise StudyError(f"{run.path} and {runs[0].path} were not scored on the same test examples")
    return found


def difference(pairs: list[tuple[np.ndarray, np.ndarray]]) -> str:
    """Mean over seeds of (accuracy of the early exit - the fine-tuned model's), in points, with its paired
    bootstrap interval; bold when the interval lies below 0."""
    groups = [np.stack([a, b]).astype(np.float64) for a, b in pairs]

    def stat(gs: list[np.ndarray]) -> float:
        return float(np.mean([g[0].mean() - g[1].mean() for g in gs]))

    value, (lo, hi) = stat(groups), bootstrap(groups, stat, shared=True)
    text = f"{100 * value:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"
    return f"**{text}**" if hi < 0 else text


def certified_table(
    found: dict[tuple[str, str], list[RecipeRun]], baselines: dict[tuple[str, str], list[Baseline]], results_dir: Path
) -> str:
    rows = []
    for setting in SETTINGS:
        for method, label in BASELINES.items():
            done = baselines.get((setting.prefix, method))
            if not done:
                continue
            results = [b.certified() for b in done]
            rows.append(
                [
                    f"{setting.task}, {setting.model}",
                    label,
                    ", ".join(str(b.seed) for b in done),
                    " / ".join(f"{r[1]:.2f}x" for r in results),
                    f"{setting.target:.1f}x",
                    " / ".join(f"{r[2]:.2f}x" for r in results),
                    " / ".join(f"{100 * r[3]:.2f}%" for r in results),
                    f"{100 * statistics.mean(r[5] for r in results):.2f}",
                    f"{100 * statistics.mean(r[4] - r[5] for r in results):+.2f} (no interval: answers not kept)",
                    " / ".join(f"{seconds(b.path) / 60:.0f}" for b in done),
                ]
            )
        for method, label in METHODS.items():
            runs = found.get((setting.prefix, method))
            for family in JOINT.get(method, (None,)) if runs else ():
                results = [run.certified(family) for run in runs]
                dev = [r[1] for r in results]
                test = [r[2] for r in results]
                reached = min(dev) >= setting.target
                # a jointly trained run whose own full model already disagrees too often certifies nothing
                certified = [
                    f"none: its full model disagrees on {100 * run.own_full_disagreement():.2f}% of dev"
                    if r[0] == f"static(layer={run.dev[0].shape[0]})" and run.reference is not None
                    else f"{r[1]:.2f}x"
                    for r, run in zip(results, runs, strict=True)
                ]
                full = statistics.mean(float(run.full_correct().mean()) for run in runs)
                rows.append(
                    [
                        f"{setting.task}, {setting.model}",
                        f"{label} + {family}" if family else label,
                        ", ".join(str(run.seed) for run in runs),
                        " / ".join(certified) + (" (target met)" if reached else ""),
                        f"{setting.target:.1f}x",
                        " / ".join(f"{s:.2f}x" for s in test),
                        " / ".join(f"{100 * r[3]:.2f}%" for r in results),
                        f"{100 * full:.2f}",
                        difference([(r[4], run.full_correct()) for r, run in zip(results, runs, strict=True)]),
                        " / ".join(
                            f"{training_seconds(results_dir, setting.prefix, method, run) / 60:.0f}" for run in runs
                        ),
                    ]
                )
    header = [
        "task, encoder",
        "method",
        "seeds",
        "certified speed-up on dev, per seed",
        "target",
        "test speed-up",
        "test disagreement with the fine-tuned model",
        "fine-tuned model, test accuracy",
        "test accuracy − fine-tuned, points [95%]",
        "training, minutes (fine-tuning included; shared machine)",
    ]
    return table(header, rows)


def training_seconds(results: Path, prefix: str, method: str, run: RecipeRun) -> float:
    """Wall-clock of everything the method trains: its own run, plus the fine-tuning it starts from (a retrofit,
    joint-distill); a run trained from the pretrained encoder is its own training alone."""
    own = seconds(run.path)
    return own if method in FROM_SCRATCH else own + seconds(finetune_folder(results, prefix, run.seed))


def speedups_table(found: dict[tuple[str, str], list[RecipeRun]]) -> str:
    rows = []
    for setting in SETTINGS:
        for method, label in METHODS.items():
            runs = found.get((setting.prefix, method))
            if not runs:
                continue
            cells = []
            for target in SPEEDUPS:
                chosen = [(run.at_speedup(target), run) for run in runs]
                if any(c is None for c, _ in chosen):
                    cells.append("no setting that fast on dev")
                    continue
                pairs = [(c[1], run.full_correct()) for c, run in chosen if c is not None]
                speed = statistics.mean(c[0] for c, _ in chosen if c is not None)
                cells.append(f"{difference(pairs)} at {speed:.2f}x")
            rows.append([f"{setting.task}, {setting.model}", label, str(len(runs)), *cells])
    header = ["task, encoder", "method", "seeds", *(f"chosen on dev at {s:g}x" for s in SPEEDUPS)]
    return table(header, rows)


RULES = {
    "entropy": "entropy (DeeBERT)",
    "maxprob": "max-probability (RightTool)",
    "pcee-2": "PCEE, patience 2",
    "pcee-3": "PCEE, patience 3",
    "learned": "learned agreement (CATs-style, probabilities only)",
}


CERTIFIED_RULES = {
    "entropy": "entropy (DeeBERT; the default)",
    "maxprob": "max-probability (RightTool)",
    "pcee": "PCEE (patience 2 or 3 over confident exits)",
    "half:entropy": "entropy, certified on half of dev",
    "half:agreement": "learned agreement, fitted on the other half of dev",
}
"""The library's exit rule families certified on the retrofit runs, one row each (``--strategies FAMILY``); a
``half:`` row is certified on the half of dev that ``layerexit fit-agreement`` leaves for calibration, as
``layerexit calibrate --strategies agreement`` does after it."""


def certified_rules_table(found: dict[tuple[str, str], list[RecipeRun]]) -> str:
    """Per retrofit setting and rule family: what ``layerexit calibrate --max-drop 0.01 --confidence 0.9 --loss
    disagreement --strategies FAMILY`` certifies on dev, and the chosen setting on test."""
    rows = []
    for setting in SETTINGS:
        for method in ("retrofit", "retrofit-alltrain"):
            runs = found.get((setting.prefix, method))
            for family, label in CERTIFIED_RULES.items() if runs else ():
                half, _, name = family.rpartition(":")
                results = [run.certified_half(name) if half else run.certified(name) for run in runs]
                where = f"{setting.task}, {setting.model}" + (
                    ", exits on every training tweet" if "all" in method else ""
                )
                rows.append(
                    [
                        where,
                        label,
                        ", ".join(str(run.seed) for run in runs),
                        " / ".join(f"{r[1]:.2f}x" for r in results),
                        " / ".join(f"{r[2]:.2f}x" for r in results),
                        " / ".join(f"{100 * r[3]:.2f}%" for r in results),
                        difference([(r[4], run.full_correct()) for r, run in zip(results, runs, strict=True)]),
                        " / ".join(r[0] for r in results),
                    ]
                )
    header = [
        "retrofit runs",
        "rule",
        "seeds",
        "certified speed-up on dev, per seed",
        "test speed-up",
        "test disagreement",
        "test accuracy − fine-tuned, points [95%]",
        "setting",
    ]
    return table(header, rows)


def rules_table(results: Path) -> str:
    """``benchmarks/exit_rules_offline.py``'s committed output: per rule and run, the speed-up at <= 1%
    disagreement on half of dev (uncertified), and on test."""
    path = results / "recipe" / "exit_rules_offline.json"
    if not path.is_file():
        raise StudyError(f"{path} is missing (python benchmarks/exit_rules_offline.py ... --json {path})")
    found = json.loads(path.read_text(encoding="utf-8"))
    runs = sorted(found)
    rows = []
    for rule, label in RULES.items():
        cells = []
        for run in runs:
            entry = found[run].get(rule)
            cells.append(
                "no setting" if entry is None else f"{entry['dev']['speedup']:.2f}x → {entry['test']['speedup']:.2f}x"
            )
        rows.append([label, *cells])
    return table(["rule: speed-up at <= 1% disagreement on half of dev → on test", *runs], rows)


def tables(results: Path) -> dict[str, str]:
    found = load_recipe(results)
    if not found:
        raise StudyError(f"no recipe runs under {results / 'recipe'} (scripts/full_study.sh recipe)")
    return {
        "recipe": certified_table(found, load_baselines(results), results),
        "recipespeed": speedups_table(found),
        "exitrules": rules_table(results),
        "rulescertified": certified_rules_table(found),
    }
