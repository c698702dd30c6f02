"""Replay every strategy over its whole parameter grid from one set of per-layer probabilities."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from layerexit import metrics
from layerexit.strategies import (
    Entropy,
    Hybrid,
    MaxProb,
    Oracle,
    Patience,
    Static,
    Strategy,
    Voting,
    voting_denominator,
)

FAMILIES = ("entropy", "maxprob", "patience", "voting", "hybrid", "static")
VOTING_KS = (0.0, 0.25, 0.5, 0.75)


def voting_thresholds(num_layers: int, k: float) -> list[float]:
    """Every value V_l can take (votes / l**k for 1 <= votes <= l <= L): the exact grid, no gaps."""
    values = {v / voting_denominator(layer, k) for layer in range(1, num_layers + 1) for v in range(1, layer + 1)}
    return sorted(values)


def default_grid(num_layers: int, num_classes: int, families: Iterable[str] = FAMILIES) -> list[Strategy]:
    """A sweep that spans each strategy's whole range of speed-ups."""
    grid: list[Strategy] = []
    for family in families:
        if family == "entropy":
            grid += [Entropy(threshold=round(t, 4)) for t in torch.linspace(0.0, 1.0, 51).tolist()]
        elif family == "maxprob":
            low = 1.0 / num_classes
            grid += [MaxProb(threshold=round(low + (1 - low) * t, 4)) for t in torch.linspace(0, 1, 51).tolist()]
        elif family == "patience":
            grid += [Patience(patience=p) for p in range(1, num_layers)]
        elif family == "voting":
            grid += [Voting(k=k, threshold=t) for k in VOTING_KS for t in voting_thresholds(num_layers, k)]
        elif family == "hybrid":
            entropy_grid = [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5]
            grid += [
                Hybrid(k=0.5, threshold=t, entropy_threshold=e)
                for t in voting_thresholds(num_layers, 0.5)
                for e in entropy_grid
            ]
        elif family == "static":
            grid += [Static(layer=n) for n in range(1, num_layers + 1)]
        else:
            raise ValueError(f"unknown strategy family {family!r}; known: {', '.join(FAMILIES)}")
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
    strategy: Strategy, probs: Tensor, labels: Tensor | None, metric_names: Sequence[str] = ("accuracy",)
) -> Point:
    exit_layer, prediction = strategy.replay(probs, labels)
    scores = {name: metrics.score(name, prediction, labels) for name in metric_names} if labels is not None else {}
    full_prediction = probs[-1].argmax(-1)
    scores["agreement_with_full"] = float((prediction == full_prediction).float().mean())
    return Point(strategy, exit_layer, prediction, metrics.speedup(exit_layer, probs.shape[0]), scores)


def sweep(
    probs: Tensor,
    labels: Tensor | None,
    grid: Sequence[Strategy],
    metric_names: Sequence[str] = ("accuracy",),
) -> list[Point]:
    """Replay every setting of ``grid`` (plus the oracle when labels are given)."""
    points = [evaluate_point(s, probs, labels, metric_names) for s in grid]
    if labels is not None:
        points.append(evaluate_point(Oracle(), probs, labels, metric_names))
    return points


def select_in_band(points: Sequence[Point], family: str, metric: str, band: tuple[float, float]) -> Point | None:
    """The paper's selection: the best ``metric`` among a family's settings whose speed-up lies in
    ``band``; ties go to the faster setting. None if no setting lands in the band."""
    candidates = [p for p in points if p.strategy.name == family and band[0] <= p.speedup <= band[1]]
    if not candidates:
        return None
    return max(candidates, key=lambda p: (p.scores[metric], p.speedup))


def paper_band(num_classes: int) -> tuple[float, float]:
    """1.3x-2.0x for binary tasks, 1.3x-2.3x for multi-class (the paper, Section 4.2)."""
    return (1.3, 2.0) if num_classes == 2 else (1.3, 2.3)
