"""The learned agreement rule of a run (:mod:`layerexit.strategies.learned`): ``layerexit fit-agreement`` fits it
on a random part of a split, and calibration tests its settings on the rest of that split only.

    layerexit fit-agreement RUN                      # half of dev, seed 0 -> RUN/agreement.safetensors
    layerexit calibrate RUN --max-drop 0.01 --strategies agreement   # on the other half of dev
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from layerexit.config import add_arguments, from_namespace
from layerexit.errors import LayerExitError
from layerexit.evaluation.sweep import default_grid
from layerexit.options import option
from layerexit.run_folder import RunFolder
from layerexit.strategies import Strategy
from layerexit.strategies.learned import AgreementRule, fit


@dataclass
class FitAgreementOptions:
    run: str = option("", "run folder written by `layerexit train` or `layerexit retrofit`", positional=True)
    split: str = option("dev", "split whose rows fit the rule; calibration on this split then uses the other rows")
    fraction: float = option(0.5, "share of the split's rows that fit the rule, drawn at random (the rest calibrate)")
    seed: int = option(0, "seed of the random draw of rows")
    reference: str = option(
        "",
        "another run folder on the same examples whose full model the exits should agree with (a plain fine-tuned "
        "run, for a jointly trained one) (default: this run's own last exit)",
        metavar="RUN",
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise LayerExitError(
                f"--fraction must be between 0 and 1 (the rest of the rows calibrate), got {self.fraction}"
            )


def fit_rows(num_rows: int, fraction: float, seed: int) -> Tensor:
    """The rows (sorted indices) that fit the rule: a random ``fraction`` of ``num_rows``, at least one left over."""
    count = min(max(1, round(fraction * num_rows)), num_rows - 1)
    if count < 1:
        raise LayerExitError(f"a split of {num_rows} rows cannot be divided into rows to fit and rows to calibrate")
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    return order[:count].sort().values


def fit_for_run(run: RunFolder, o: FitAgreementOptions, progress: bool = False) -> tuple[AgreementRule, float]:
    """Fit and write the run's rule; returns it with its log-loss on the split's other rows."""
    from layerexit.evaluation.evaluate import SplitSource, reference_answers

    loaded = SplitSource(run, progress=progress).probs(o.split)
    assert loaded is not None  # required
    probs, labels = loaded
    probs = probs.float()
    answers = reference_answers(run, o.reference, o.split, labels) if o.reference else probs[-1].argmax(-1)
    rows = fit_rows(probs.shape[1], o.fraction, o.seed)
    rule = fit(probs, answers, rows, o.split)
    run.write_agreement_rule(rule)
    rest = torch.ones(probs.shape[1], dtype=torch.bool)
    rest[rows] = False
    return rule, held_out_log_loss(rule, probs[:, rest], answers[rest])


def held_out_log_loss(rule: AgreementRule, probs: Tensor, answers: Tensor) -> float:
    """Mean log-loss of the rule's agreement predictions over every internal exit of rows (L, N, C)."""
    from layerexit.strategies.learned import internal_exits

    bce = torch.nn.functional.binary_cross_entropy
    losses = [
        bce(rule.score(stats, layer).clamp(1e-12, 1 - 1e-12), y) for layer, stats, y in internal_exits(probs, answers)
    ]
    return float(torch.stack(losses).mean())


def calibration_grid(
    run: RunFolder, families: Sequence[str], split: str, num_layers: int, num_classes: int, num_rows: int
) -> tuple[list[Strategy], Tensor | None, str | None]:
    """The settings ``calibrate`` tests for ``families`` on ``split`` and the rows it may use: ``(grid, rows, why)``.
    With ``agreement`` among the families, the fitted rule's settings join the grid, and when the rule was fitted
    on rows of this split those rows are left out for every family (``rows``: the others, sorted; ``why``: a
    sentence for the record); otherwise ``rows`` is None (all)."""
    if "agreement" not in families:
        return default_grid(num_layers, num_classes, families), None, None
    rule = run.agreement_rule()
    if (rule.num_layers, rule.num_classes) != (num_layers, num_classes):
        raise LayerExitError(
            f"{run.agreement_file} was fitted for {rule.num_layers} layers and {rule.num_classes} classes, the run's "
            f"probabilities have {num_layers} and {num_classes}: fit the rule again"
        )
    grid = default_grid(num_layers, num_classes, families, rule)
    if rule.fit_split != split:
        return grid, None, None
    if int(rule.fit_rows.max()) >= num_rows:
        raise LayerExitError(f"{run.agreement_file} was fitted on rows beyond the {num_rows} of {split}: fit it again")
    keep = torch.ones(num_rows, dtype=torch.bool)
    keep[rule.fit_rows] = False
    why = f"{len(rule.fit_rows)} of the {num_rows} {split} rows fitted the agreement rule and are left out"
    return grid, keep.nonzero().squeeze(1), why


def cmd_fit_agreement(args: argparse.Namespace) -> int:
    o = from_namespace(FitAgreementOptions, args)
    run = RunFolder(o.run).require(config=True)
    rule, loss = fit_for_run(run, o, progress=not args.quiet)
    if o.split == "test":
        print(
            f"warning: the rule learned from {len(rule.fit_rows)} test rows; `calibrate` then checks its setting on "
            "test rows the rule has seen and `evaluate` reports them, so both look better than they are: fit it "
            "on dev (the default)",
            file=sys.stderr,
        )
    print(
        f"fitted agreement rule {rule.fingerprint} on {len(rule.fit_rows)} {o.split} rows (seed {o.seed}); log-loss "
        f"on the other rows {loss:.4f}\nwrote {run.agreement_file}\nnext: layerexit calibrate {o.run} --max-drop 0.01 "
        f"--strategies agreement  (calibrates on the {o.split} rows the rule did not see)"
    )
    return 0


def add_command(command: Callable[[str, Callable[[argparse.Namespace], int], str], Any]) -> None:
    parser = command(
        "fit-agreement",
        cmd_fit_agreement,
        "Fit the learned exit rule (does exit l already give the final answer?) on part of a split; "
        "`calibrate --strategies agreement` then sets its threshold on the rest",
    )
    add_arguments(parser, FitAgreementOptions)
