"""One replay of a grid of strategy settings over a calibration split, the per-sample losses that
calibration bounds, and the checks of calibration's inputs (:mod:`layerexit.evaluation.calibrate`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from layerexit.errors import LayerExitError
from layerexit.evaluation.sweep import KNOWN_FAMILIES, default_grid
from layerexit.strategies import Strategy, family_of

Loss = Literal["disagreement", "accuracy_drop"]
LOSSES: tuple[str, ...] = ("disagreement", "accuracy_drop")
CALIBRATABLE: tuple[str, ...] = tuple(f for f in KNOWN_FAMILIES if family_of(f).calibratable)
"""The families whose settings calibration can order by the grid alone (:attr:`Family.calibratable`):
settings that share every parameter but the family's knob form one chain, sorted along the knob
(:attr:`Family.knob`, :attr:`Family.slowest_first`) so that every sample's exit layer can only move
earlier, before any risk is looked at."""


@dataclass(frozen=True)
class GridReplay:
    """Every setting of a grid replayed over one split: what both calibration modes work from.

    A strategy decides for each sample from that sample's probabilities alone, so the replay of a
    subset of samples is the subset of the replay (:meth:`subset`).
    """

    grid: tuple[Strategy, ...]
    exit_layer: Tensor  # (S, N) long, 1-based
    prediction: Tensor  # (S, N) long
    full_prediction: Tensor  # (N,) the reference's answers: the full model's (last exit's) argmax by default
    num_layers: int
    own_full_prediction: Tensor | None = None
    """(N,) the run's own last exit's argmax where ``full_prediction`` is another model's (``--reference``)."""

    @classmethod
    def of(cls, probs: Tensor, grid: Sequence[Strategy], reference: Tensor | None = None) -> GridReplay:
        """Replay each setting of ``grid`` over probabilities (L, N, C). ``reference`` (N,): the classes of the
        model whose answers the losses compare with, when it is not this run's own full depth."""
        check_probs(probs)
        if reference is not None:
            check_reference(reference, probs)
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
            full_prediction=probs[-1].argmax(-1) if reference is None else reference,  # (N,)
            num_layers=probs.shape[0],
            own_full_prediction=None if reference is None else probs[-1].argmax(-1),
        )

    @property
    def last_prediction(self) -> Tensor:
        """(N,) this run's own full depth's answers."""
        return self.full_prediction if self.own_full_prediction is None else self.own_full_prediction

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
            None if self.own_full_prediction is None else self.own_full_prediction.index_select(0, index),
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
# Input checks


def replay_of(probs: Tensor | GridReplay, families: Sequence[str], reference: Tensor | None = None) -> GridReplay:
    if isinstance(families, str):
        raise LayerExitError(f"families must be a list of names, got the text {families!r}")
    for family in families:
        if family not in CALIBRATABLE:
            raise LayerExitError(f"strategy family {family!r} cannot be calibrated; known: {', '.join(CALIBRATABLE)}")
    if not families:
        raise LayerExitError("no strategy family to calibrate")
    if isinstance(probs, GridReplay):
        if reference is not None:
            raise LayerExitError("give the reference when the grid is replayed (GridReplay.of), not with a replay")
        return probs
    check_probs(probs)
    return GridReplay.of(probs, default_grid(probs.shape[0], probs.shape[2], families), reference)


def families_in(replay: GridReplay, families: Sequence[str]) -> list[str]:
    present = {s.name for s in replay.grid}
    names = [f for f in dict.fromkeys(families) if f in present]
    if not names:
        raise LayerExitError(f"the grid holds no setting of {', '.join(families)}")
    return names


def check_reference(reference: Tensor, probs: Tensor) -> None:
    """A reference model's classes (N,) for probabilities (L, N, C)."""
    n, classes = probs.shape[1], probs.shape[2]
    if not isinstance(reference, Tensor) or reference.shape != (n,) or reference.is_floating_point():
        shape = tuple(reference.shape) if isinstance(reference, Tensor) else type(reference).__name__
        raise LayerExitError(f"the reference's answers must be {n} class indices, got {shape}")
    if n and (int(reference.min()) < 0 or int(reference.max()) >= classes):
        raise LayerExitError(f"the reference's answers must be classes in 0..{classes - 1}")


def check_probs(probs: Tensor) -> None:
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


def check_labels(labels: Tensor, num_samples: int) -> None:
    if not isinstance(labels, Tensor) or labels.shape != (num_samples,):
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise LayerExitError(f"labels must have shape ({num_samples},) to match probs, got {shape}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise LayerExitError(f"labels must be integer class indices, got {labels.dtype}")
