"""The published exit rules: DeeBERT's entropy, RightTool's top probability, PABEE's patience, the paper's
voting, the hybrid of voting and entropy, PCEE-BERT's patience over confident exits, a model cut at a fixed
depth, and the oracle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from layerexit.errors import LayerExitError
from layerexit.strategies.base import Family, PlotStyle, State, Strategy, entropy, non_negative


@dataclass(frozen=True)
class Entropy(Strategy):
    """DeeBERT: exit at the first layer whose prediction entropy is below ``threshold``."""

    threshold: float
    normalized: bool = True
    name: ClassVar[str] = "entropy"
    family: ClassVar[Family] = Family(knob="threshold", larger_exits_earlier=True, style=PlotStyle("C0"), preference=4)

    def __post_init__(self) -> None:
        non_negative("threshold", self.threshold)

    @classmethod
    def default_grid(cls, num_layers: int, num_classes: int) -> list[Strategy]:
        """Thresholds 0, 0.02, ..., 1 (the normalized entropy lies in [0, 1])."""
        return [cls(threshold=round(t, 4)) for t in torch.linspace(0.0, 1.0, 51).tolist()]

    def step(self, state: State, layer: int, probs: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return entropy(probs, self.normalized) < self.threshold, probs.argmax(-1)


@dataclass(frozen=True)
class MaxProb(Strategy):
    """RightTool: exit at the first layer whose largest class probability reaches ``threshold``."""

    threshold: float
    name: ClassVar[str] = "maxprob"
    family: ClassVar[Family] = Family(knob="threshold", larger_exits_earlier=False, style=PlotStyle("C1"))

    def __post_init__(self) -> None:
        non_negative("threshold", self.threshold)

    @classmethod
    def default_grid(cls, num_layers: int, num_classes: int) -> list[Strategy]:
        """51 thresholds evenly from 1 / C (every sample exits at once) to 1."""
        low = 1.0 / num_classes
        return [cls(threshold=round(low + (1 - low) * t, 4)) for t in torch.linspace(0, 1, 51).tolist()]

    def step(self, state: State, layer: int, probs: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        top, pred = probs.max(-1)
        return top >= self.threshold, pred


@dataclass(frozen=True)
class Patience(Strategy):
    """PABEE: exit once the prediction has stayed the same for ``patience`` consecutive layers."""

    patience: int
    name: ClassVar[str] = "patience"
    family: ClassVar[Family] = Family(knob="patience", larger_exits_earlier=False, style=PlotStyle("C2"), preference=3)

    def __post_init__(self) -> None:
        if not isinstance(self.patience, int) or self.patience < 1:
            raise LayerExitError(f"patience must be a positive integer, got {self.patience!r}")

    @classmethod
    def default_grid(cls, num_layers: int, num_classes: int) -> list[Strategy]:
        """Patience 1 to L - 1 (the counter cannot reach L - 1 before the last layer)."""
        return [cls(patience=p) for p in range(1, num_layers)]

    def init(self, num_samples: int, num_classes: int, device: torch.device | str = "cpu") -> State:
        return {
            "counter": torch.zeros(num_samples, dtype=torch.long, device=device),
            "previous": torch.full((num_samples,), -1, dtype=torch.long, device=device),
        }

    def step(self, state: State, layer: int, probs: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        pred = probs.argmax(-1)
        same = pred == state["previous"]
        state["counter"] = torch.where(same, state["counter"] + 1, torch.zeros_like(state["counter"]))
        state["previous"] = pred
        return state["counter"] == self.patience, pred


@dataclass(frozen=True)
class Pcee(Strategy):
    """PCEE-BERT: exit once the last ``patience`` exits in a row were each confident, their normalized
    entropy below ``threshold``; the prediction is the current exit's. With ``patience=1`` it is entropy's rule.

    Opt-in (:attr:`Family.default` False): on the study's runs it is slower than entropy at every level of
    disagreement with the full model (``docs/results.md``), so default sweeps leave it out.
    """

    threshold: float
    patience: int = 2
    name: ClassVar[str] = "pcee"
    family: ClassVar[Family] = Family(knob="threshold", larger_exits_earlier=True, style=PlotStyle("C5"), default=False)

    def __post_init__(self) -> None:
        non_negative("threshold", self.threshold)
        if not isinstance(self.patience, int) or self.patience < 1:
            raise LayerExitError(f"pcee patience must be a positive integer, got {self.patience!r}")

    @classmethod
    def default_grid(cls, num_layers: int, num_classes: int) -> list[Strategy]:
        """Patience 2 and 3 (where the model has more layers than that), each with entropy's 51 thresholds."""
        thresholds = [round(t, 4) for t in torch.linspace(0.0, 1.0, 51).tolist()]
        return [cls(threshold=t, patience=p) for p in (2, 3) if p < num_layers for t in thresholds]

    def init(self, num_samples: int, num_classes: int, device: torch.device | str = "cpu") -> State:
        return {"counter": torch.zeros(num_samples, dtype=torch.long, device=device)}

    def step(self, state: State, layer: int, probs: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        confident = entropy(probs) < self.threshold
        state["counter"] = torch.where(confident, state["counter"] + 1, torch.zeros_like(state["counter"]))
        return state["counter"] >= self.patience, probs.argmax(-1)


@dataclass(frozen=True)
class Voting(Strategy):
    """The paper's rule (Eq. 23): exit once V_l = max_c votes_c(l) / l**k reaches ``threshold``.

    Each exit so far votes for its argmax. The prediction is the class with most votes; a tie goes
    to the tied class with the largest summed probability over the exits so far.
    """

    k: float
    threshold: float
    name: ClassVar[str] = "voting"
    family: ClassVar[Family] = Family(knob="threshold", larger_exits_earlier=False, style=PlotStyle("C3"), preference=1)

    def __post_init__(self) -> None:
        if not 0.0 <= self.k < 1.0:
            raise LayerExitError(f"voting k must be in [0, 1), got {self.k}")
        non_negative("threshold", self.threshold)

    @classmethod
    def default_grid(cls, num_layers: int, num_classes: int) -> list[Strategy]:
        """Every k of :data:`VOTING_KS`, each with every value V_l can take (:func:`voting_thresholds`)."""
        return [cls(k=k, threshold=t) for k in VOTING_KS for t in voting_thresholds(num_layers, k)]

    def init(self, num_samples: int, num_classes: int, device: torch.device | str = "cpu") -> State:
        return {
            "votes": torch.zeros(num_samples, num_classes, dtype=torch.long, device=device),
            "mass": torch.zeros(num_samples, num_classes, dtype=torch.float64, device=device),
        }

    def step(self, state: State, layer: int, probs: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        state["votes"].scatter_add_(1, probs.argmax(-1, keepdim=True), torch.ones_like(state["votes"][:, :1]))  # (N, C)
        state["mass"] += probs.double()
        top = state["votes"].max(-1, keepdim=True).values  # (N, 1)
        tied = state["votes"] == top
        pred = torch.where(tied, state["mass"], torch.full_like(state["mass"], -1.0)).argmax(-1)
        score = top.squeeze(-1).double() / voting_denominator(layer, self.k)
        return score >= self.threshold, pred


def voting_denominator(layer: int, k: float) -> float:
    """l**k of Eq. 23, shared by the rule and its threshold grid so both round the same way."""
    return float(layer) ** k


VOTING_KS = (0.0, 0.25, 0.5, 0.75)
"""The exponents k of the voting grid."""


def voting_thresholds(num_layers: int, k: float) -> list[float]:
    """Every value V_l can take (votes / l**k for 1 <= votes <= l <= L): the exact grid, no gaps."""
    values = {v / voting_denominator(layer, k) for layer in range(1, num_layers + 1) for v in range(1, layer + 1)}
    return sorted(values)


@dataclass(frozen=True)
class Hybrid(Strategy):
    """Voting or entropy, whichever fires first.

    The paper finds voting best at low speed-up and entropy best at high speed-up (Section 4.3);
    this rule lets a sample out as soon as the exits so far agree (``V_l >= threshold``) *or* the
    current exit alone is confident (normalized entropy below ``entropy_threshold``). The prediction
    is the vote winner when the vote fires (and at the last layer), else the current exit's argmax.
    """

    k: float
    threshold: float
    entropy_threshold: float
    name: ClassVar[str] = "hybrid"
    family: ClassVar[Family] = Family(knob="threshold", larger_exits_earlier=False, style=PlotStyle("C4"), preference=2)
    ENTROPY_THRESHOLDS: ClassVar[tuple[float, ...]] = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)

    def __post_init__(self) -> None:
        Voting(self.k, self.threshold)  # validates k and threshold
        non_negative("entropy_threshold", self.entropy_threshold)

    @classmethod
    def default_grid(cls, num_layers: int, num_classes: int) -> list[Strategy]:
        """k = 0.5, every value V_l can take, each with every entropy threshold of ``ENTROPY_THRESHOLDS``."""
        return [
            cls(k=0.5, threshold=t, entropy_threshold=e)
            for t in voting_thresholds(num_layers, 0.5)
            for e in cls.ENTROPY_THRESHOLDS
        ]

    def _voting(self) -> Voting:
        return Voting(self.k, self.threshold)

    def init(self, num_samples: int, num_classes: int, device: torch.device | str = "cpu") -> State:
        return self._voting().init(num_samples, num_classes, device)

    def step(self, state: State, layer: int, probs: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        vote_fire, vote_pred = self._voting().step(state, layer, probs)
        confident = entropy(probs) < self.entropy_threshold
        pred = torch.where(vote_fire | ~confident, vote_pred, probs.argmax(-1))
        return vote_fire | confident, pred


@dataclass(frozen=True)
class Static(Strategy):
    """Every sample exits at ``layer``: a model truncated to its first n layers."""

    layer: int
    name: ClassVar[str] = "static"
    family: ClassVar[Family] = Family(
        knob="layer",
        larger_exits_earlier=False,
        style=PlotStyle("0.4", marker="s", front=False, label="static (cut at layer n)"),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or self.layer < 1:
            raise LayerExitError(f"static layer must be a positive integer, got {self.layer!r}")

    @classmethod
    def default_grid(cls, num_layers: int, num_classes: int) -> list[Strategy]:
        """Every depth 1 to L."""
        return [cls(layer=n) for n in range(1, num_layers + 1)]

    def step(self, state: State, layer: int, probs: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return torch.full((probs.shape[0],), layer >= self.layer, device=probs.device), probs.argmax(-1)


@dataclass(frozen=True)
class Oracle(Strategy):
    """Exit at the first layer whose prediction is right (else the last): the upper bound. Needs labels."""

    name: ClassVar[str] = "oracle"
    needs_labels: ClassVar[bool] = True

    def step(self, state: State, layer: int, probs: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if labels is None:
            raise LayerExitError("strategy 'oracle' needs labels")
        pred = probs.argmax(-1)
        return pred == labels, pred
