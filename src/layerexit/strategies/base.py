"""What every exit strategy is: the :class:`Strategy` base with its one primitive, ``step``, the
:class:`Family` a strategy family declares, and the helpers the rules share."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import MISSING, asdict, dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor

from layerexit.errors import LayerExitError

State = dict[str, Tensor]
"""Per-sample running state of a strategy; every tensor has the sample dimension first."""


def select_state(state: State, rows: Tensor) -> State:
    """The state of the given samples only (online inference drops the rows that exited)."""
    return {key: value.index_select(0, rows) for key, value in state.items()}


def entropy(probs: Tensor, normalized: bool = True) -> Tensor:
    """Shannon entropy over the last dimension, divided by log C when ``normalized``."""
    h = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    return h / math.log(probs.shape[-1]) if normalized else h


@dataclass(frozen=True)
class PlotStyle:
    """How plots of metric against speed-up draw a family."""

    color: str
    marker: str = "."
    front: bool = True
    """True: the family's Pareto front, as a line; False: every setting as its own point."""
    label: str | None = None
    """The legend entry; None: the family's name."""


@dataclass(frozen=True)
class Family:
    """What is known about a strategy family as a whole, declared once on its class."""

    knob: str
    """The parameter that trades accuracy for speed: the one calibration moves, along chains of
    settings that share every other parameter."""
    larger_exits_earlier: bool
    """The knob's direction: True when a larger value lets every sample out at the same layer or
    earlier (entropy's threshold), False when at the same layer or later (voting's threshold, ...)."""
    style: PlotStyle
    calibratable: bool = True
    """Whether calibration can order the family's settings by the grid alone: along the knob every
    sample's exit layer moves one way only, as fixed-sequence testing requires."""
    preference: int | None = None
    """Rank (1 first) among the families whose dev-selected setting a run uses when no strategy is
    given and none is calibrated; None: never chosen that way."""
    default: bool = True
    """Whether sweeps, calibration and reports take the family when no families are named. False: an
    opt-in family, run only when named (``--strategies pcee``, ``--strategy "pcee(...)"``), so that adding it
    changes no existing report, and no calibration that splits its confidence over the families it tests."""

    @property
    def slowest_first(self) -> int:
        """The sort direction along the knob that puts the most conservative (slowest) setting
        first: +1 ascending, -1 descending."""
        return 1 if self.larger_exits_earlier else -1


@dataclass(frozen=True)
class Strategy(ABC):
    """Base class. Subclasses are frozen dataclasses whose fields are their parameters.

    A subclass that is a family one sweeps and calibrates declares :attr:`family` and
    :meth:`default_grid`; the oracle, which needs labels, is none.
    """

    name: ClassVar[str]
    needs_labels: ClassVar[bool] = False
    family: ClassVar[Family | None] = None

    @classmethod
    def default_grid(cls, num_layers: int, num_classes: int) -> list[Strategy]:
        """The settings an offline sweep replays for a model of ``num_layers`` exits and
        ``num_classes`` classes: together they span the family's whole range of speed-ups."""
        raise LayerExitError(f"strategy {cls.name!r} is not a family with a grid of settings")

    def init(self, num_samples: int, num_classes: int, device: torch.device | str = "cpu") -> State:
        """The running state before layer 1."""
        return {}

    @abstractmethod
    def step(self, state: State, layer: int, probs: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Update ``state`` in place with layer ``layer``'s probabilities (N, C).

        Returns ``(exit_now, prediction)``: a bool tensor (N,) and a long tensor (N,).
        """

    def replay(self, probs: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Exit layer (1-based) and prediction of every sample from all layers' probabilities (L, N, C)."""
        if probs.dim() != 3:
            raise LayerExitError(f"probs must have shape (L, N, C), got {tuple(probs.shape)}")
        if self.needs_labels and labels is None:
            raise LayerExitError(f"strategy {self.name!r} needs labels")
        num_layers, num_samples, num_classes = probs.shape
        state = self.init(num_samples, num_classes, probs.device)
        exit_layer = torch.full((num_samples,), num_layers, dtype=torch.long, device=probs.device)
        prediction = torch.zeros(num_samples, dtype=torch.long, device=probs.device)
        done = torch.zeros(num_samples, dtype=torch.bool, device=probs.device)
        for layer in range(1, num_layers + 1):
            fire, pred = self.step(state, layer, probs[layer - 1], labels)
            if layer == num_layers:
                fire = torch.ones_like(fire)
            new = fire & ~done
            exit_layer[new] = layer
            prediction[new] = pred[new]
            done |= fire
            if bool(done.all()):
                break
        return exit_layer, prediction

    def params(self) -> dict[str, float | int | bool | str]:
        return asdict(self)

    def __str__(self) -> str:
        """``name(param=value, ...)``, parameters left at their defaults omitted; :func:`parse` reads it back
        exactly: a float is written as its shortest round-tripping ``repr`` (``1.7888543819998317``, not
        ``1.78885``; a whole number without its ``.0``), so ``parse(str(s)) == s`` for every setting and a
        stored setting is the one that runs."""
        defaults = {f.name: f.default for f in fields(self)}
        args = ", ".join(
            f"{k}={exact(v)}" if isinstance(v, float) else f"{k}={v}"
            for k, v in self.params().items()
            if defaults.get(k, MISSING) is MISSING or defaults[k] != v
        )
        return f"{self.name}({args})"


def exact(value: float) -> str:
    """The shortest text that reads back as exactly ``value``: ``2``, ``0.5``, ``1.7888543819998317``."""
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def non_negative(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise LayerExitError(f"{name} must be a non-negative number, got {value!r}")
