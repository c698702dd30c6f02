"""Calibration for a bounded risk with a stated confidence: Learn-then-Test (Angelopoulos et al.,
2021) with fixed-sequence testing along each family's chains of settings and the exact binomial
tail bound. The guarantee and its assumptions are spelled out in ``docs/calibration.md``."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from layerexit import metrics
from layerexit.errors import LayerExitError
from layerexit.evaluation.choice import Choice
from layerexit.evaluation.replay import (
    CALIBRATABLE,
    LOSSES,
    GridReplay,
    Loss,
    check_labels,
    families_in,
    per_sample_loss,
    replay_of,
)
from layerexit.evaluation.sweep import FAMILIES
from layerexit.strategies import Static, Strategy, family_of

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
# Fixed-sequence testing along the chains


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


@dataclass(frozen=True)
class FamilyTest:
    """The outcome of fixed-sequence testing for one family."""

    accepted: list[int]
    """Indices into the grid of the settings that passed, in testing order."""
    chains: int
    level: float
    """The level of each of the family's chains: delta split over the families, then over their chains."""
    needed: int
    """The fewest calibration samples with which a setting of the family can pass at that level."""


def fixed_sequence(
    grid: Sequence[Strategy],
    families: Sequence[str],
    counts: Tensor | Sequence[int],
    n: int,
    max_drop: float,
    confidence: float,
) -> dict[str, FamilyTest]:
    """Learn-then-Test's tests from loss counts alone: ``counts[s]`` samples of ``n`` have loss 1 under grid
    setting ``s``. Delta = 1 - confidence is split equally over ``families`` and within a family over its
    chains; along a chain, most conservative setting first, settings are accepted until the first p-value
    above the chain's level. Counts are all the tests need, so a grid replayed elsewhere (a report's
    ``points.csv``, whose rates times n are the counts) is certified exactly as :func:`for_risk` would."""
    delta = 1.0 - confidence
    family_chains = {family: chains(grid, family) for family in families}
    levels = {family: delta / len(families) / len(family_chains[family]) for family in families}
    needed = {family: required_samples(max_drop, levels[family]) for family in families}
    if n < min(needed.values()):
        raise LayerExitError(
            f"{n} calibration samples cannot show a risk of at most {max_drop:g} with confidence {confidence:g}: "
            f"even with no loss at all, at least {min(needed.values())} are needed (for the family with fewest "
            f"settings to test, after splitting {delta:g} over {len(families)} "
            f"famil{'y' if len(families) == 1 else 'ies'}). "
            "Use more calibration data, a larger max_drop, a lower confidence or fewer strategies."
        )
    p_values = p_value(torch.as_tensor(counts), n, max_drop).tolist()
    out = {}
    for family in families:
        accepted: list[int] = []
        for chain in family_chains[family]:
            for s in chain:
                if p_values[s] > levels[family]:
                    break
                accepted.append(s)
        out[family] = FamilyTest(accepted, len(family_chains[family]), levels[family], needed[family])
    return out


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

    ``probs`` (L, N, C) of the calibration split, or a :class:`~layerexit.evaluation.replay.GridReplay`
    of it. ``loss`` is ``disagreement`` with the full model (no labels needed) or ``accuracy_drop``
    (labels needed); see :func:`~layerexit.evaluation.replay.per_sample_loss`. ``labels``, when
    given with the disagreement loss, only add the calibration ``metric`` to each choice.

    Learn-then-Test with fixed-sequence testing: delta = 1 - confidence is split equally over the
    families, and within a family equally over its chains (:func:`chains`). Along each chain,
    from the most conservative setting on, H: risk > max_drop is tested with the exact binomial
    tail p-value, and settings are accepted until the first p-value above the chain's level. This
    controls the family-wise error at delta: with probability >= confidence over the draw of the
    calibration set, *every* accepted setting, of every family, has risk <= max_drop on the
    distribution the calibration data came from. Each family's choice is its fastest accepted
    setting on the calibration split; :func:`~layerexit.evaluation.choice.pick_default` picks among
    them with the guarantee intact. A family with none accepted gets the full model
    (``full_model=True``), whose loss is 0.
    """
    if not (isinstance(max_drop, int | float) and 0.0 < max_drop < 1.0):
        raise LayerExitError(f"max_drop must be strictly between 0 and 1 (e.g. 0.01), got {max_drop!r}")
    if not (isinstance(confidence, int | float) and 0.0 < confidence < 1.0):
        raise LayerExitError(f"confidence must be strictly between 0 and 1 (e.g. 0.9), got {confidence!r}")
    if loss not in LOSSES:
        raise LayerExitError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
    if loss == "accuracy_drop" and labels is None:
        raise LayerExitError("loss 'accuracy_drop' needs labels; use loss 'disagreement' for unlabelled data")
    replay = replay_of(probs, families)
    if labels is not None:
        check_labels(labels, replay.num_samples)
        if metric not in metrics.METRICS:
            raise LayerExitError(f"unknown metric {metric!r}; known: {', '.join(metrics.METRICS)}")
    n = replay.num_samples
    delta = 1.0 - confidence
    names = families_in(replay, families)
    disagreements = replay.losses("disagreement").sum(1)  # (S,)
    counts = disagreements if loss == "disagreement" else replay.losses(loss, labels).sum(1)  # (S,)
    tests = fixed_sequence(replay.grid, names, counts, n, max_drop, confidence)
    p_values = p_value(counts, n, max_drop).tolist()
    risks = (counts.double() / n).tolist()
    disagreement = (disagreements.double() / n).tolist()
    speedups = replay.speedups().tolist()
    choices: list[Choice] = []
    for family in names:
        accepted, test = tests[family].accepted, tests[family]
        method = (
            f"Learn-then-Test, fixed-sequence over {test.chains} {family} chain(s), exact binomial "
            f"tail, level {test.level:.3g} per chain (delta {delta:g} split over {len(names)} families)"
        )
        needed = test.needed
        if not accepted:
            reason = (
                f"needs at least {needed} calibration samples"
                if n < needed
                else "no setting faster than the full model passed"
            )
            full = Static(layer=replay.num_layers)
            own = replay.last_prediction
            # 0 against the run's own full depth; against another reference, measured and not certified
            full_disagreement = float(per_sample_loss(own, replay.full_prediction, "disagreement").double().mean())
            full_risk = float(per_sample_loss(own, replay.full_prediction, loss, labels).double().mean())
            outcome = "only the full model satisfies the bound"
            if replay.own_full_prediction is not None:
                outcome = "the full model, whose risk against the reference (another model) is measured, not certified"
            choices.append(
                Choice(
                    family=family,
                    strategy=full,
                    mode="risk",
                    speedup=1.0,
                    disagreement=full_disagreement,
                    n_calibration=n,
                    method=f"{method}; {reason}: {outcome}",
                    metric=metric if labels is not None else None,
                    metric_value=metrics.score(metric, own, labels) if labels is not None else None,
                    loss=loss,
                    risk=full_risk,
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
