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
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from layerexit import metrics, strategies
from layerexit.errors import LayerExitError
from layerexit.evaluation.sweep import FAMILIES, default_grid
from layerexit.strategies import Static, Strategy, family_of

Mode = Literal["speedup", "risk"]
Loss = Literal["disagreement", "accuracy_drop"]
LOSSES: tuple[str, ...] = ("disagreement", "accuracy_drop")
FILENAME = "calibration.json"
FORMAT_VERSION = 1
RELATIVE_TOLERANCE = 1e-9
"""A speed-up "reaches" a target when speed-up >= target * (1 - RELATIVE_TOLERANCE): float rounding
of L / mean(exit layer) must not make an exact hit (e.g. 6 / 4.0 against 1.5) miss."""

CALIBRATABLE: tuple[str, ...] = tuple(f for f in FAMILIES if family_of(f).calibratable)
"""The families whose settings calibration can order by the grid alone (:attr:`Family.calibratable`):
settings that share every parameter but the family's knob form one chain, sorted along the knob
(:attr:`Family.knob`, :attr:`Family.slowest_first`) so that every sample's exit layer can only move
earlier, before any risk is looked at."""


# ----------------------------------------------------------------------------------------------
# The binomial tail bound


def binomial_cdf(k: int | Tensor, n: int, p: float) -> Tensor:
    """P(Binomial(n, p) <= k), exactly (summed in log space in float64), for int or tensor ``k``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    i = torch.arange(n + 1, dtype=torch.float64)  # (n + 1,)
    log_comb = torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1)
    log_pmf = log_comb + torch.xlogy(i, torch.tensor(p, dtype=torch.float64))
    log_pmf = log_pmf + torch.xlogy(n - i, torch.tensor(1.0 - p, dtype=torch.float64))
    cdf = torch.logcumsumexp(log_pmf, 0).exp().clamp(max=1.0)  # (n + 1,)
    index = torch.as_tensor(k, dtype=torch.long).clamp(min=-1, max=n)
    return torch.where(index < 0, torch.zeros((), dtype=torch.float64), cdf[index.clamp(min=0)])


def p_value(num_losses: int | Tensor, n: int, max_drop: float) -> Tensor:
    """Binomial-tail p-value of H: risk > ``max_drop``, from ``num_losses`` ones among n per-sample
    {0, 1} losses: P(Binomial(n, max_drop) <= num_losses). Valid because under H the count is
    Binomial(n, r) with r > max_drop, which is stochastically larger."""
    return binomial_cdf(num_losses, n, max_drop)


def required_samples(max_drop: float, delta: float) -> int:
    """The fewest calibration samples with which any setting can pass a test at level ``delta``:
    even with no loss at all, the p-value (1 - max_drop)**n must reach ``delta``."""
    n = max(1, math.ceil(math.log(delta) / math.log1p(-max_drop)))
    while n > 1 and (1 - max_drop) ** (n - 1) <= delta:
        n -= 1
    while (1 - max_drop) ** n > delta:
        n += 1
    return n


# ----------------------------------------------------------------------------------------------
# One replay of a grid


@dataclass(frozen=True)
class GridReplay:
    """Every setting of a grid replayed over one split: what both calibration modes work from.

    A strategy decides for each sample from that sample's probabilities alone, so the replay of a
    subset of samples is the subset of the replay (:meth:`subset`).
    """

    grid: tuple[Strategy, ...]
    exit_layer: Tensor  # (S, N) long, 1-based
    prediction: Tensor  # (S, N) long
    full_prediction: Tensor  # (N,) the full model's (last exit's) argmax
    num_layers: int

    @classmethod
    def of(cls, probs: Tensor, grid: Sequence[Strategy]) -> GridReplay:
        """Replay each setting of ``grid`` over probabilities (L, N, C)."""
        _check_probs(probs)
        if not grid:
            raise LayerExitError("the grid of settings to calibrate is empty")
        for strategy in grid:
            if strategy.needs_labels:
                raise LayerExitError(
                    f"strategy {strategy.name!r} needs labels at prediction time; it cannot be calibrated"
                )
        replays = [strategy.replay(probs) for strategy in grid]
        return cls(
            grid=tuple(grid),
            exit_layer=torch.stack([r[0] for r in replays]),  # (S, N)
            prediction=torch.stack([r[1] for r in replays]),  # (S, N)
            full_prediction=probs[-1].argmax(-1),  # (N,)
            num_layers=probs.shape[0],
        )

    @property
    def num_samples(self) -> int:
        return int(self.full_prediction.shape[0])

    def subset(self, index: Tensor) -> GridReplay:
        """The replay of the samples ``index`` (N',), repeats allowed."""
        return GridReplay(
            self.grid,
            self.exit_layer.index_select(1, index),
            self.prediction.index_select(1, index),
            self.full_prediction.index_select(0, index),
            self.num_layers,
        )

    def speedups(self) -> Tensor:
        """(S,) L / mean exit layer of each setting."""
        return self.num_layers * self.num_samples / self.exit_layer.sum(1).double()

    def losses(self, loss: Loss, labels: Tensor | None = None) -> Tensor:
        """(S, N) per-sample loss in {0, 1} of each setting (see :func:`per_sample_loss`)."""
        return per_sample_loss(self.prediction, self.full_prediction, loss, labels)


def per_sample_loss(prediction: Tensor, full_prediction: Tensor, loss: Loss, labels: Tensor | None = None) -> Tensor:
    """Per-sample loss in {0, 1} of early-exit predictions (..., N) against the full model's (N,).

    ``disagreement``: 1 where the early exit predicts another class than the full model.
    ``accuracy_drop``: 1 where the full model is right and the early exit is wrong, i.e.
    max(0, correct_full - correct_exit). Its mean is P(full right, exit wrong), which is at least
    accuracy_full - accuracy_exit (the difference also subtracts P(full wrong, exit right)), so a
    bound on it bounds the loss of accuracy. It never exceeds the disagreement.
    """
    if loss == "disagreement":
        return (prediction != full_prediction).to(torch.uint8)
    if loss == "accuracy_drop":
        if labels is None:
            raise LayerExitError("loss 'accuracy_drop' needs labels; use loss 'disagreement' for unlabelled data")
        return ((full_prediction == labels) & (prediction != labels)).to(torch.uint8)
    raise LayerExitError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")


# ----------------------------------------------------------------------------------------------
# The result


@dataclass(frozen=True)
class Choice:
    """The setting chosen for one strategy family, with the calibration numbers behind it.

    ``speedup``, ``disagreement``, ``metric_value`` and ``risk`` are measured on the calibration
    split (``n_calibration`` samples). ``full_model`` marks the fallback of risk mode when no
    setting of the family faster than the full model passed: the strategy is then ``static`` at
    the last layer, which is the full model and meets any bound.
    """

    family: str
    strategy: Strategy
    mode: Mode
    speedup: float
    disagreement: float
    n_calibration: int
    method: str
    metric: str | None = None
    metric_value: float | None = None
    loss: Loss | None = None
    risk: float | None = None
    p_value: float | None = None
    target_speedup: float | None = None
    max_drop: float | None = None
    confidence: float | None = None
    full_model: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the strategy as its text form, e.g. ``voting(k=0.5, threshold=2)``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["strategy"] = str(self.strategy)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Choice:
        """Inverse of :meth:`to_dict`; LayerExitError on a missing, unknown or ill-typed field."""
        if not isinstance(data, Mapping):
            raise LayerExitError(f"a calibration choice must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LayerExitError(f"a calibration choice has unknown field {unknown[0]!r}")
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING]
        if missing:
            raise LayerExitError(f"a calibration choice lacks field {missing[0]!r}")
        if not isinstance(data["strategy"], str):
            raise LayerExitError("a calibration choice's strategy must be text, e.g. 'voting(k=0.5, threshold=2)'")
        values = dict(data)
        values["strategy"] = strategies.parse(data["strategy"])
        _check_field_types(values)
        choice = cls(**values)
        if choice.mode not in ("speedup", "risk"):
            raise LayerExitError(f"a calibration choice has unknown mode {choice.mode!r}")
        if choice.loss is not None and choice.loss not in LOSSES:
            raise LayerExitError(f"a calibration choice has unknown loss {choice.loss!r}")
        if choice.strategy.name != choice.family and not choice.full_model:
            raise LayerExitError(
                f"a calibration choice for {choice.family!r} holds a {choice.strategy.name!r} strategy"
            )
        return choice


def _check_field_types(values: Mapping[str, Any]) -> None:
    kinds: dict[str, tuple[type, ...]] = {
        "family": (str,),
        "mode": (str,),
        "method": (str,),
        "metric": (str, type(None)),
        "loss": (str, type(None)),
        "n_calibration": (int,),
        "full_model": (bool,),
    }
    for name, value in values.items():
        if name == "strategy":
            continue
        allowed = kinds.get(name, (int, float, type(None)))
        if isinstance(value, bool) and bool not in allowed:
            allowed = ()
        if not isinstance(value, allowed):
            raise LayerExitError(f"a calibration choice's field {name!r} has the wrong type ({type(value).__name__})")


def pick_default(choices: Sequence[Choice]) -> Choice:
    """The choice to use by default across families.

    Speed-up mode: the best calibration metric (ties: faster). Risk mode: the fastest (ties: lower
    calibration risk); every accepted setting of :func:`for_risk` is covered by one guarantee, so
    choosing among them by speed keeps it.
    """
    if not choices:
        raise LayerExitError("no calibration choice to pick from")
    if choices[0].mode == "speedup":
        return max(choices, key=lambda c: (c.metric_value or 0.0, c.speedup))
    return max(choices, key=lambda c: (c.speedup, -(c.risk or 0.0)))


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
        _check_probs(probs)
    num_layers = probs.num_layers if isinstance(probs, GridReplay) else probs.shape[0]
    if not (isinstance(target, int | float) and 1.0 <= target <= num_layers):
        raise LayerExitError(
            f"target speed-up must be between 1 and the number of layers ({num_layers}), got {target!r}"
        )
    replay = _replay(probs, families)
    _check_labels(labels, replay.num_samples)
    speedups = replay.speedups().tolist()
    disagreement = replay.losses("disagreement").double().mean(1).tolist()
    reach = target * (1 - RELATIVE_TOLERANCE)
    choices: list[Choice] = []
    fastest: dict[str, float] = {}
    for family in _families_in(replay, families):
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
# Mode 2: a bounded loss with a stated confidence (Learn-then-Test)


def chains(grid: Sequence[Strategy], family: str) -> list[list[int]]:
    """The fixed-sequence testing orders of one family: indices into ``grid``, most conservative first.

    Settings that share every parameter but the family's speed knob (the voting ``k``, say) form
    a chain, sorted along the knob so that each sample's exit layer can only move earlier. The
    order depends on the grid alone, never on data, as fixed-sequence testing requires.
    """
    if family not in CALIBRATABLE:
        raise LayerExitError(f"strategy family {family!r} cannot be calibrated; known: {', '.join(CALIBRATABLE)}")
    return [list(chain) for chain in _chains(tuple(grid), family)]


@functools.lru_cache(maxsize=32)
def _chains(grid: tuple[Strategy, ...], family: str) -> tuple[tuple[int, ...], ...]:
    """:func:`chains`, cached: repeated calibrations over subsets of one replay share its grid."""
    declared = family_of(family)
    knob, direction = declared.knob, declared.slowest_first
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, strategy in enumerate(grid):
        if strategy.name != family:
            continue
        rest = tuple((f.name, getattr(strategy, f.name)) for f in fields(strategy) if f.name != knob)
        groups.setdefault(rest, []).append(index)
    return tuple(
        tuple(sorted(members, key=lambda s: direction * float(getattr(grid[s], knob))))
        for _, members in sorted(groups.items())
    )


def for_risk(
    probs: Tensor | GridReplay,
    labels: Tensor | None,
    max_drop: float,
    confidence: float,
    families: Sequence[str] = FAMILIES,
    loss: Loss = "disagreement",
    metric: str = "accuracy",
) -> list[Choice]:
    """Per family, the fastest setting whose risk is at most ``max_drop`` with probability >= ``confidence``.

    ``probs`` (L, N, C) of the calibration split, or a :class:`GridReplay` of it. ``loss`` is
    ``disagreement`` with the full model (no labels needed) or ``accuracy_drop`` (labels needed);
    see :func:`per_sample_loss`. ``labels``, when given with the disagreement loss, only add the
    calibration ``metric`` to each choice.

    Learn-then-Test with fixed-sequence testing: delta = 1 - confidence is split equally over the
    families, and within a family equally over its chains (:func:`chains`). Along each chain,
    from the most conservative setting on, H: risk > max_drop is tested with the exact binomial
    tail p-value, and settings are accepted until the first p-value above the chain's level. This
    controls the family-wise error at delta: with probability >= confidence over the draw of the
    calibration set, *every* accepted setting, of every family, has risk <= max_drop on the
    distribution the calibration data came from. Each family's choice is its fastest accepted
    setting on the calibration split; :func:`pick_default` picks among them with the guarantee
    intact. A family with none accepted gets the full model (``full_model=True``), whose loss is 0.
    """
    if not (isinstance(max_drop, int | float) and 0.0 < max_drop < 1.0):
        raise LayerExitError(f"max_drop must be strictly between 0 and 1 (e.g. 0.01), got {max_drop!r}")
    if not (isinstance(confidence, int | float) and 0.0 < confidence < 1.0):
        raise LayerExitError(f"confidence must be strictly between 0 and 1 (e.g. 0.9), got {confidence!r}")
    if loss not in LOSSES:
        raise LayerExitError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
    if loss == "accuracy_drop" and labels is None:
        raise LayerExitError("loss 'accuracy_drop' needs labels; use loss 'disagreement' for unlabelled data")
    replay = _replay(probs, families)
    if labels is not None:
        _check_labels(labels, replay.num_samples)
        if metric not in metrics.METRICS:
            raise LayerExitError(f"unknown metric {metric!r}; known: {', '.join(metrics.METRICS)}")
    n = replay.num_samples
    delta = 1.0 - confidence
    names = _families_in(replay, families)
    family_chains = {family: chains(replay.grid, family) for family in names}
    levels = {family: delta / len(names) / len(family_chains[family]) for family in names}
    needed = {family: required_samples(max_drop, levels[family]) for family in names}
    if n < min(needed.values()):
        raise LayerExitError(
            f"{n} calibration samples cannot show a risk of at most {max_drop:g} with confidence {confidence:g}: "
            f"even with no loss at all, at least {min(needed.values())} are needed (for the family with fewest "
            f"settings to test, after splitting {delta:g} over {len(names)} famil{'y' if len(names) == 1 else 'ies'}). "
            "Use more calibration data, a larger max_drop, a lower confidence or fewer strategies."
        )
    disagreements = replay.losses("disagreement").sum(1)  # (S,)
    counts = disagreements if loss == "disagreement" else replay.losses(loss, labels).sum(1)  # (S,)
    p_values = p_value(counts, n, max_drop).tolist()
    risks = (counts.double() / n).tolist()
    disagreement = (disagreements.double() / n).tolist()
    speedups = replay.speedups().tolist()
    choices: list[Choice] = []
    for family in names:
        accepted: list[int] = []
        for chain in family_chains[family]:
            for s in chain:
                if p_values[s] > levels[family]:
                    break
                accepted.append(s)
        method = (
            f"Learn-then-Test, fixed-sequence over {len(family_chains[family])} {family} chain(s), exact binomial "
            f"tail, level {levels[family]:.3g} per chain (delta {delta:g} split over {len(names)} families)"
        )
        if not accepted:
            reason = (
                f"needs at least {needed[family]} calibration samples"
                if n < needed[family]
                else "no setting faster than the full model passed"
            )
            full = Static(layer=replay.num_layers)
            choices.append(
                Choice(
                    family=family,
                    strategy=full,
                    mode="risk",
                    speedup=1.0,
                    disagreement=0.0,
                    n_calibration=n,
                    method=f"{method}; {reason}: only the full model satisfies the bound",
                    metric=metric if labels is not None else None,
                    metric_value=metrics.score(metric, replay.full_prediction, labels) if labels is not None else None,
                    loss=loss,
                    risk=0.0,
                    max_drop=float(max_drop),
                    confidence=float(confidence),
                    full_model=True,
                )
            )
            continue
        best = max(accepted, key=lambda s: (speedups[s], -risks[s]))
        choices.append(
            Choice(
                family=family,
                strategy=replay.grid[best],
                mode="risk",
                speedup=speedups[best],
                disagreement=disagreement[best],
                n_calibration=n,
                method=f"{method}; fastest of {len(accepted)} accepted",
                metric=metric if labels is not None else None,
                metric_value=metrics.score(metric, replay.prediction[best], labels) if labels is not None else None,
                loss=loss,
                risk=risks[best],
                p_value=p_values[best],
                max_drop=float(max_drop),
                confidence=float(confidence),
            )
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


def check_on_test(choice: Choice, probs: Tensor, labels: Tensor | None = None) -> Check:
    """Replay ``choice`` on held-out probabilities (L, N, C) (and labels, when known)."""
    _check_probs(probs)
    if labels is not None:
        _check_labels(labels, probs.shape[1])
    if choice.mode == "risk" and choice.loss == "accuracy_drop" and labels is None:
        raise LayerExitError("this choice bounds the loss of accuracy; checking it needs the test labels")
    exit_layer, prediction = choice.strategy.replay(probs)  # (N,), (N,)
    full = probs[-1].argmax(-1)  # (N,)
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
    replay = _replay(probs, families)
    if labels is not None:
        _check_labels(labels, replay.num_samples)
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
) -> Path:
    """Write ``calibration.json`` in ``run_dir`` atomically (temp file, then rename); return its path.

    It records the mode and its request (target speed-up and metric, or max_drop, confidence and
    loss), the calibration and test sizes, every family's choice, the checks on the test split,
    ``split`` (free-form provenance, e.g. seed and fraction), and the default strategy:
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
        "default": str(chosen.strategy),
        "default_family": chosen.family,
        "choices": [c.to_dict() for c in items],
        "test": [c.to_dict() for c in checks],
    }
    directory = Path(run_dir)
    if not directory.is_dir():
        raise LayerExitError(f"run folder {directory} does not exist")
    path = directory / FILENAME
    handle, tmp = tempfile.mkstemp(prefix=".calibration-", suffix=".json", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(record, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_choice(run_dir: str | Path, num_layers: int | None = None) -> Strategy | None:
    """The default strategy saved in ``run_dir``'s ``calibration.json``; None when there is none.

    With ``num_layers``, also checks the strategy fits a model of that depth. LayerExitError when
    the file is damaged.
    """
    record = _read(run_dir)
    if record is None:
        return None
    strategy = strategies.parse(record["default"])
    if num_layers is not None and isinstance(strategy, Static) and strategy.layer > num_layers:
        raise LayerExitError(
            f"{Path(run_dir) / FILENAME}: the saved strategy {strategy} needs {strategy.layer} layers, "
            f"the model has {num_layers}; rerun `layerexit calibrate`"
        )
    return strategy


def load_choices(run_dir: str | Path) -> list[Choice]:
    """Every family's saved choice in ``run_dir`` (empty when there is no ``calibration.json``)."""
    record = _read(run_dir)
    return [] if record is None else [Choice.from_dict(c) for c in record["choices"]]


def _read(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / FILENAME
    if not path.exists():
        return None
    damaged = f"{path} is damaged"
    advice = "; rerun `layerexit calibrate`"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LayerExitError(f"{damaged} ({err}){advice}") from None
    if not isinstance(record, dict):
        raise LayerExitError(f"{damaged} (not a JSON object){advice}")
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


# ----------------------------------------------------------------------------------------------
# Input checks


def _replay(probs: Tensor | GridReplay, families: Sequence[str]) -> GridReplay:
    if isinstance(families, str):
        raise LayerExitError(f"families must be a list of names, got the text {families!r}")
    for family in families:
        if family not in CALIBRATABLE:
            raise LayerExitError(f"strategy family {family!r} cannot be calibrated; known: {', '.join(CALIBRATABLE)}")
    if not families:
        raise LayerExitError("no strategy family to calibrate")
    if isinstance(probs, GridReplay):
        return probs
    _check_probs(probs)
    return GridReplay.of(probs, default_grid(probs.shape[0], probs.shape[2], families))


def _families_in(replay: GridReplay, families: Sequence[str]) -> list[str]:
    present = {s.name for s in replay.grid}
    names = [f for f in dict.fromkeys(families) if f in present]
    if not names:
        raise LayerExitError(f"the grid holds no setting of {', '.join(families)}")
    return names


def _check_probs(probs: Tensor) -> None:
    if not isinstance(probs, Tensor) or probs.dim() != 3:
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise LayerExitError(f"probs must be a tensor of shape (L, N, C), got {shape}")
    num_layers, num_samples, num_classes = probs.shape
    if num_layers < 1 or num_samples < 1 or num_classes < 2:
        raise LayerExitError(
            f"probs must have at least 1 layer, 1 sample and 2 classes, got shape {tuple(probs.shape)}"
        )
    if not probs.is_floating_point() or not bool(torch.isfinite(probs).all()):
        raise LayerExitError("probs must be finite floating-point probabilities")


def _check_labels(labels: Tensor, num_samples: int) -> None:
    if not isinstance(labels, Tensor) or labels.shape != (num_samples,):
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise LayerExitError(f"labels must have shape ({num_samples},) to match probs, got {shape}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise LayerExitError(f"labels must be integer class indices, got {labels.dtype}")
