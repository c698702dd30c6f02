"""Threshold calibration: pick an exit strategy's setting for the user from a calibration split.

Two modes, both working from per-layer probabilities (L, N, C) of a calibration split:

* :func:`for_speedup` - per strategy family, the setting with the best metric among those whose
  calibration speed-up reaches a target. An estimate, with no guarantee; needs labels.
* :func:`for_risk` - per family, the fastest setting whose risk (disagreement with the full model,
  or loss of accuracy) is at most ``max_drop`` with probability at least ``confidence``, by
  Learn-then-Test (Angelopoulos et al., 2021) with fixed-sequence testing and the exact binomial
  tail bound. The guarantee and its assumptions are spelled out in ``docs/calibration.md``.

Each family's settings are replayed once (:class:`GridReplay`); both modes accept such a replay in
place of the probabilities, so many calibration splits can reuse one replay of a whole pool.
The result is a list of :class:`Choice`; :func:`save_choice` writes it to ``calibration.json`` in
a run folder and :func:`load_choice` reads back the default strategy.

This module holds the target-speed-up mode, the checks on a test split, the repeated random
splits and the calibration file; the rest lives beside it and is re-exported here, so every
``calibrate.X`` keeps working: :mod:`~layerexit.evaluation.replay` (:class:`GridReplay`, the
per-sample losses, the input checks), :mod:`~layerexit.evaluation.choice` (:class:`Choice`,
:func:`pick_default`) and :mod:`~layerexit.evaluation.risk` (the binomial tail bound, the chains
and :func:`for_risk`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from layerexit import metrics, strategies
from layerexit.atomic import read_json_object, write_json
from layerexit.errors import LayerExitError
from layerexit.evaluation.choice import Choice, Mode, pick_default
from layerexit.evaluation.replay import (
    CALIBRATABLE,
    LOSSES,
    GridReplay,
    Loss,
    check_labels,
    check_probs,
    check_reference,
    families_in,
    per_sample_loss,
    replay_of,
)
from layerexit.evaluation.risk import binomial_cdf, chains, for_risk, p_value, required_samples
from layerexit.evaluation.sweep import FAMILIES
from layerexit.methods import METHODS
from layerexit.run_folder import CALIBRATION, RunFolder
from layerexit.strategies import Static, Strategy

__all__ = [
    "CALIBRATABLE",
    "FILENAME",
    "FORMAT_VERSION",
    "LOSSES",
    "RELATIVE_TOLERANCE",
    "Check",
    "Choice",
    "GridReplay",
    "Loss",
    "Mode",
    "Validation",
    "binomial_cdf",
    "chains",
    "check_on_test",
    "default_families",
    "for_risk",
    "for_speedup",
    "load_choice",
    "load_choices",
    "p_value",
    "per_sample_loss",
    "pick_default",
    "random_split",
    "required_samples",
    "save_choice",
    "validate",
]

FILENAME = CALIBRATION
FORMAT_VERSION = 1
RELATIVE_TOLERANCE = 1e-9
"""A speed-up "reaches" a target when speed-up >= target * (1 - RELATIVE_TOLERANCE): float rounding
of L / mean(exit layer) must not make an exact hit (e.g. 6 / 4.0 against 1.5) miss."""


# ----------------------------------------------------------------------------------------------
# Mode 1: a target speed-up


def for_speedup(
    probs: Tensor | GridReplay,
    labels: Tensor,
    target: float,
    families: Sequence[str] = FAMILIES,
    metric: str = "accuracy",
) -> list[Choice]:
    """Per family, the setting with the best ``metric`` among those that reach ``target`` speed-up.

    ``probs`` (L, N, C) of the calibration split, or a :class:`GridReplay` of it (its grid is then
    used, restricted to ``families``). A setting reaches the target when its speed-up on the
    calibration split, L / mean exit layer, is at least ``target`` (up to float rounding, see
    :data:`RELATIVE_TOLERANCE`); ties in the metric go to the faster setting. Families none of
    whose settings reach the target are left out; LayerExitError if no family reaches it. This is
    an estimate: the speed-up and metric on new data will differ; no guarantee is claimed.
    """
    if labels is None:
        raise LayerExitError("calibrating for a target speed-up ranks settings by a metric, so it needs labels")
    if metric not in metrics.METRICS:
        raise LayerExitError(f"unknown metric {metric!r}; known: {', '.join(metrics.METRICS)}")
    if isinstance(probs, Tensor):
        check_probs(probs)
    num_layers = probs.num_layers if isinstance(probs, GridReplay) else probs.shape[0]
    if not (isinstance(target, int | float) and 1.0 <= target <= num_layers):
        raise LayerExitError(
            f"target speed-up must be between 1 and the number of layers ({num_layers}), got {target!r}"
        )
    replay = replay_of(probs, families)
    check_labels(labels, replay.num_samples)
    speedups = replay.speedups().tolist()
    disagreement = replay.losses("disagreement").double().mean(1).tolist()
    reach = target * (1 - RELATIVE_TOLERANCE)
    choices: list[Choice] = []
    fastest: dict[str, float] = {}
    for family in families_in(replay, families):
        members = [s for s, strategy in enumerate(replay.grid) if strategy.name == family]
        fastest[family] = max(speedups[s] for s in members)
        candidates = [s for s in members if speedups[s] >= reach]
        if not candidates:
            continue
        scored = [(metrics.score(metric, replay.prediction[s], labels), speedups[s], s) for s in candidates]
        value, speed, best = max(scored, key=lambda t: (t[0], t[1]))
        choices.append(
            Choice(
                family=family,
                strategy=replay.grid[best],
                mode="speedup",
                speedup=speed,
                disagreement=disagreement[best],
                n_calibration=replay.num_samples,
                method=(
                    f"best {metric} among the {len(candidates)} of {len(members)} {family} settings whose "
                    f"calibration speed-up is at least {target:g}x"
                ),
                metric=metric,
                metric_value=value,
                target_speedup=float(target),
            )
        )
    if not choices:
        reached = ", ".join(f"{f} {s:.2f}x" for f, s in fastest.items())
        raise LayerExitError(
            f"no setting reaches a speed-up of {target:g}x on the calibration split (fastest: {reached})"
        )
    return choices


# ----------------------------------------------------------------------------------------------
# Checking a choice on the test split


@dataclass(frozen=True)
class Check:
    """A choice replayed on a held-out split: the realised numbers for the report.

    ``meets`` says whether the realised speed-up reaches the target (speed-up mode) or the
    realised risk stays within ``max_drop`` (risk mode). In risk mode the guarantee is about the
    risk on the distribution; on a finite test split the realised risk also carries sampling
    noise, so a ``meets=False`` on one split is not by itself a broken guarantee.
    """

    family: str
    strategy: str
    n: int
    speedup: float
    disagreement: float
    metric: str | None
    metric_value: float | None
    full_metric_value: float | None
    accuracy_drop: float | None
    risk: float | None
    meets: bool

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def default_families(objective: str, *, risk: bool) -> list[str]:
    """The families ``calibrate`` tests when none are named. With a bound (``risk``), the run's own family, the
    one its training method was made for: the confidence 1 - delta is split over the families tested, so every
    family that cannot win costs the one that can a share of delta. The family depends on the method alone,
    never on the calibration data, so the guarantee holds as for any family named in advance. Without a bound
    (a target speed-up), and for a method without a family of its own, every family."""
    method = METHODS.get(objective)
    if risk and method is not None and method.native_strategy in CALIBRATABLE:
        return [method.native_strategy]
    return list(FAMILIES)


def check_on_test(
    choice: Choice, probs: Tensor, labels: Tensor | None = None, reference: Tensor | None = None
) -> Check:
    """Replay ``choice`` on held-out probabilities (L, N, C) (and labels, when known). ``reference`` (N,): the
    classes of the model the choice was calibrated against, when not this run's own full depth; disagreement,
    accuracy drop and ``full_metric_value`` are then the reference's."""
    check_probs(probs)
    if reference is not None:
        check_reference(reference, probs)
    if labels is not None:
        check_labels(labels, probs.shape[1])
    if choice.mode == "risk" and choice.loss == "accuracy_drop" and labels is None:
        raise LayerExitError("this choice bounds the loss of accuracy; checking it needs the test labels")
    exit_layer, prediction = choice.strategy.replay(probs)  # (N,), (N,)
    full = probs[-1].argmax(-1) if reference is None else reference  # (N,)
    speedup = metrics.speedup(exit_layer, probs.shape[0])
    disagreement = float(per_sample_loss(prediction, full, "disagreement").double().mean())
    accuracy_drop = (
        float(per_sample_loss(prediction, full, "accuracy_drop", labels).double().mean())
        if labels is not None
        else None
    )
    metric = choice.metric if labels is not None else None
    risk: float | None = None
    if choice.mode == "risk" and choice.max_drop is not None:
        risk = accuracy_drop if choice.loss == "accuracy_drop" else disagreement
        meets = risk is not None and risk <= choice.max_drop
    elif choice.mode == "speedup" and choice.target_speedup is not None:
        meets = speedup >= choice.target_speedup * (1 - RELATIVE_TOLERANCE)
    else:
        raise LayerExitError(f"the {choice.mode} choice for {choice.family!r} lacks its target or bound")
    return Check(
        family=choice.family,
        strategy=str(choice.strategy),
        n=int(probs.shape[1]),
        speedup=speedup,
        disagreement=disagreement,
        metric=metric,
        metric_value=metrics.score(metric, prediction, labels) if metric and labels is not None else None,
        full_metric_value=metrics.score(metric, full, labels) if metric and labels is not None else None,
        accuracy_drop=accuracy_drop,
        risk=risk,
        meets=meets,
    )


# ----------------------------------------------------------------------------------------------
# Splits


def random_split(n: int, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A random calibration/test split of n samples: sorted index tensors, ``fraction`` of n
    (rounded, at least 1) for calibration and the rest (at least 1) for test."""
    if not (isinstance(n, int) and n >= 2):
        raise LayerExitError(f"a calibration/test split needs at least 2 samples, got {n!r}")
    if not (isinstance(fraction, int | float) and 0.0 < fraction < 1.0):
        raise LayerExitError(f"the calibration fraction must be strictly between 0 and 1, got {fraction!r}")
    size = min(n - 1, max(1, round(n * fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:size].sort().values, order[size:].sort().values


@dataclass(frozen=True)
class Validation:
    """Risk-mode calibration repeated over random calibration/test splits of one labelled set.

    ``violation_rate`` is the share of splits where the default choice's realised risk on the test
    part exceeds ``max_drop``; the guarantee makes it at most ``allowed`` = 1 - confidence, up to
    the test part's own sampling noise. ``faster_fraction`` is the share of splits whose choice is
    faster than the full model on the test part: it shows the guarantee is not met by never
    exiting early.
    """

    trials: int
    n_calibration: int
    n_test: int
    max_drop: float
    confidence: float
    loss: str
    allowed: float
    violations: int
    violation_rate: float
    mean_speedup: float
    faster_fraction: float
    mean_test_risk: float
    max_test_risk: float
    chosen_families: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def validate(
    probs: Tensor | GridReplay,
    labels: Tensor | None,
    max_drop: float,
    confidence: float,
    families: Sequence[str] = FAMILIES,
    loss: Loss = "disagreement",
    fraction: float = 0.5,
    trials: int = 200,
    seed: int = 0,
) -> Validation:
    """Run :func:`for_risk` on ``trials`` random calibration/test splits (split ``seed``,
    ``seed + 1``, ...) of probabilities (L, N, C) and score the default choice on each test part.

    The grid is replayed once over all N samples and each split reuses that replay.
    """
    if not (isinstance(trials, int) and trials >= 1):
        raise LayerExitError(f"trials must be a positive integer, got {trials!r}")
    replay = replay_of(probs, families)
    if labels is not None:
        check_labels(labels, replay.num_samples)
    grid_index = {strategy: s for s, strategy in enumerate(replay.grid)}
    violations, speedups, risks = 0, [], []
    chosen: dict[str, int] = {}
    n_cal = n_test = 0
    for trial in range(trials):
        cal, test = random_split(replay.num_samples, fraction, seed + trial)
        n_cal, n_test = len(cal), len(test)
        choice = pick_default(
            for_risk(replay.subset(cal), None if labels is None else labels[cal], max_drop, confidence, families, loss)
        )
        name = "full model" if choice.full_model else choice.family
        chosen[name] = chosen.get(name, 0) + 1
        if choice.full_model:
            speedups.append(1.0)
            risks.append(0.0)
            continue
        s = grid_index[choice.strategy]
        prediction = replay.prediction[s, test]  # (N_test,)
        test_labels = None if labels is None else labels[test]
        risk = float(per_sample_loss(prediction, replay.full_prediction[test], loss, test_labels).double().mean())
        speedups.append(metrics.speedup(replay.exit_layer[s, test], replay.num_layers))
        risks.append(risk)
        violations += risk > max_drop
    return Validation(
        trials=trials,
        n_calibration=n_cal,
        n_test=n_test,
        max_drop=float(max_drop),
        confidence=float(confidence),
        loss=loss,
        allowed=1.0 - confidence,
        violations=violations,
        violation_rate=violations / trials,
        mean_speedup=sum(speedups) / trials,
        faster_fraction=sum(x > 1.0 for x in speedups) / trials,
        mean_test_risk=sum(risks) / trials,
        max_test_risk=max(risks),
        chosen_families=chosen,
    )


# ----------------------------------------------------------------------------------------------
# The run folder


def save_choice(
    run_dir: str | Path,
    choices: Choice | Sequence[Choice],
    default: Choice | None = None,
    checks: Sequence[Check] = (),
    split: Mapping[str, Any] | None = None,
    reference: str | None = None,
) -> Path:
    """Write ``calibration.json`` in ``run_dir`` atomically (temp file, then rename); return its path.

    It records the mode and its request (target speed-up and metric, or max_drop, confidence and
    loss), the calibration and test sizes, every family's choice, the checks on the test split,
    ``split`` (free-form provenance, e.g. seed and fraction), the ``reference`` run whose full model the
    risk was measured against (``None``: this run's own full depth), and the default strategy:
    ``default`` or else :func:`pick_default` of ``choices``.
    """
    items = [choices] if isinstance(choices, Choice) else list(choices)
    if not items:
        raise LayerExitError("nothing to save: no calibration choice")
    first = items[0]
    if any((c.mode, _request(c), c.n_calibration) != (first.mode, _request(first), first.n_calibration) for c in items):
        raise LayerExitError("the choices to save come from different calibration requests")
    chosen = default if default is not None else pick_default(items)
    record: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "mode": first.mode,
        "request": _request(first),
        "n_calibration": first.n_calibration,
        "n_test": checks[0].n if checks else None,
        "split": dict(split) if split is not None else None,
        "reference": reference,
        "default": str(chosen.strategy),
        "default_family": chosen.family,
        "choices": [c.to_dict() for c in items],
        "test": [c.to_dict() for c in checks],
    }
    directory = Path(run_dir)
    if not directory.is_dir():
        raise LayerExitError(f"run folder {directory} does not exist")
    path = RunFolder(directory).calibration_file
    write_json(path, record)
    return path


def load_choice(run_dir: str | Path, num_layers: int | None = None) -> Strategy | None:
    """The default strategy saved in ``run_dir``'s ``calibration.json``, bound to the run (``RunFolder.bind``); None
    when there is none.

    With ``num_layers``, also checks the strategy fits a model of that depth. LayerExitError when
    the file is damaged.
    """
    record = _read(run_dir)
    if record is None:
        return None
    strategy = RunFolder(run_dir).bind(strategies.parse(record["default"]))
    if num_layers is not None and isinstance(strategy, Static) and strategy.layer > num_layers:
        raise LayerExitError(
            f"{RunFolder(run_dir).calibration_file}: the saved strategy {strategy} needs {strategy.layer} layers, "
            f"the model has {num_layers}; rerun `layerexit calibrate`"
        )
    return strategy


def load_choices(run_dir: str | Path) -> list[Choice]:
    """Every family's saved choice in ``run_dir`` (empty when there is no ``calibration.json``)."""
    record = _read(run_dir)
    return [] if record is None else [Choice.from_dict(c) for c in record["choices"]]


def _read(run_dir: str | Path) -> dict[str, Any] | None:
    path = RunFolder(run_dir).calibration_file
    if not path.exists():
        return None
    damaged = f"{path} is damaged"
    advice = "; rerun `layerexit calibrate`"
    record = read_json_object(path, "a calibration (it is damaged)", advice=advice)
    if record.get("format") != FORMAT_VERSION:
        raise LayerExitError(
            f"{path} has format {record.get('format')!r}; this layerexit reads {FORMAT_VERSION}{advice}"
        )
    for key, kind in (("mode", str), ("default", str), ("choices", list), ("request", dict), ("n_calibration", int)):
        if not isinstance(record.get(key), kind):
            raise LayerExitError(f"{damaged} (field {key!r} missing or not a {kind.__name__}){advice}")
    try:
        default = strategies.parse(record["default"])
        choices = [Choice.from_dict(c) for c in record["choices"]]
    except LayerExitError as err:
        raise LayerExitError(f"{damaged} ({err}){advice}") from None
    if default.needs_labels:
        raise LayerExitError(f"{damaged} (default strategy {default} needs labels at prediction time){advice}")
    if not choices:
        raise LayerExitError(f"{damaged} (no choices){advice}")
    return record


def _request(choice: Choice) -> dict[str, Any]:
    if choice.mode == "speedup":
        return {"target_speedup": choice.target_speedup, "metric": choice.metric}
    return {"max_drop": choice.max_drop, "confidence": choice.confidence, "loss": choice.loss}
