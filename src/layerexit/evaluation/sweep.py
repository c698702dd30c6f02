"""Replay every strategy over its whole parameter grid from one set of per-layer probabilities."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from torch import Tensor

from layerexit import metrics
from layerexit.strategies import (
    FAMILIES,
    KNOWN_FAMILIES,
    STRATEGIES,
    VOTING_KS,
    Agreement,
    AgreementRule,
    Oracle,
    Strategy,
    voting_thresholds,
)

__all__ = [
    "FAMILIES",
    "KNOWN_FAMILIES",
    "VOTING_KS",
    "Point",
    "best_in_band",
    "default_grid",
    "evaluate_point",
    "paper_band",
    "select_in_band",
    "sweep",
    "voting_thresholds",
]

T = TypeVar("T")


def default_grid(
    num_layers: int, num_classes: int, families: Iterable[str] = FAMILIES, rule: AgreementRule | None = None
) -> list[Strategy]:
    """A sweep that spans each strategy's whole range of speed-ups: each family's
    :meth:`~layerexit.strategies.Strategy.default_grid`, in the order of ``families``; for the learned rule
    (``agreement``), the settings of the fitted ``rule`` (``RunFolder.agreement_rule``)."""
    grid: list[Strategy] = []
    for family in families:
        cls = STRATEGIES.get(family)
        if cls is None or cls.family is None:
            raise ValueError(f"unknown strategy family {family!r}; known: {', '.join(KNOWN_FAMILIES)}")
        grid += rule.grid() if cls is Agreement and rule is not None else cls.default_grid(num_layers, num_classes)
    return grid


@dataclass
class Point:
    """One strategy setting replayed over a split."""

    strategy: Strategy
    exit_layer: Tensor  # (N,) 1-based
    prediction: Tensor  # (N,)
    speedup: float
    scores: dict[str, float]

    def row(self) -> dict[str, object]:
        return {
            "strategy": self.strategy.name,
            "setting": str(self.strategy),
            **{k: v for k, v in self.strategy.params().items()},
            "speedup": round(self.speedup, 4),
            "mean_exit_layer": round(float(self.exit_layer.float().mean()), 4),
            **{k: round(v, 5) for k, v in self.scores.items()},
        }


def evaluate_point(
    strategy: Strategy,
    probs: Tensor,
    labels: Tensor | None,
    metric_names: Sequence[str] = ("accuracy",),
    reference: Tensor | None = None,
) -> Point:
    """``reference`` (N,): another model's classes; the point then also scores ``agreement_with_reference``."""
    exit_layer, prediction = strategy.replay(probs, labels)
    scores = {name: metrics.score(name, prediction, labels) for name in metric_names} if labels is not None else {}
    full_prediction = probs[-1].argmax(-1)
    scores["agreement_with_full"] = float((prediction == full_prediction).float().mean())
    if reference is not None:
        scores["agreement_with_reference"] = float((prediction == reference).float().mean())
    return Point(strategy, exit_layer, prediction, metrics.speedup(exit_layer, probs.shape[0]), scores)


def sweep(
    probs: Tensor,
    labels: Tensor | None,
    grid: Sequence[Strategy],
    metric_names: Sequence[str] = ("accuracy",),
    reference: Tensor | None = None,
) -> list[Point]:
    """Replay every setting of ``grid`` (plus the oracle when labels are given)."""
    points = [evaluate_point(s, probs, labels, metric_names, reference) for s in grid]
    if labels is not None:
        points.append(evaluate_point(Oracle(), probs, labels, metric_names, reference))
    return points


def best_in_band(
    settings: Iterable[T], band: Sequence[float], speedup: Callable[[T], float], score: Callable[[T], float]
) -> T | None:
    """The paper's selection rule on any record of a setting: the best ``score`` among the settings
    whose ``speedup`` lies in ``band`` (both ends included); ties go to the faster setting, then to
    the first. None if no setting lands in the band."""
    low, high = band
    candidates = [s for s in settings if low <= speedup(s) <= high]
    if not candidates:
        return None
    return max(candidates, key=lambda s: (score(s), speedup(s)))


def select_in_band(points: Sequence[Point], family: str, metric: str, band: tuple[float, float]) -> Point | None:
    """The paper's selection (:func:`best_in_band`): the best ``metric`` among a family's settings
    whose speed-up lies in ``band``; ties go to the faster setting. None if no setting lands in the band."""
    return best_in_band(
        (p for p in points if p.strategy.name == family), band, lambda p: p.speedup, lambda p: p.scores[metric]
    )


def paper_band(num_classes: int) -> tuple[float, float]:
    """1.3x-2.0x for binary tasks, 1.3x-2.3x for multi-class (the paper, Section 4.2)."""
    return (1.3, 2.0) if num_classes == 2 else (1.3, 2.3)
