"""Exit strategies: small objects that decide, layer by layer, when each sample may stop.

A strategy sees only the exits computed so far. Its one primitive is :meth:`Strategy.step`, which
takes the probabilities of layer ``l`` for the samples still running and says which of them exit
now and what each would predict. :meth:`Strategy.replay` (offline, over stored probabilities of
every layer) and online inference (:mod:`layerexit.runtime.loop`, which drops exited rows) both
drive ``step``, so they give the same exit layer and prediction for every sample by construction.

Layers are counted from 1; a sample that no rule lets out exits at the last layer L.

What is known about a strategy *family* as a whole (the parameter calibration moves, its default
grid of settings, how plots draw it, whether a run may fall back to it) is declared once on its
class: :attr:`Strategy.family` (a :class:`Family`) and :meth:`Strategy.default_grid`. The
sweep, calibration, the plots and the predictor read it from there.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
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

    def params(self) -> dict[str, float | int | bool]:
        return asdict(self)

    def __str__(self) -> str:
        """``name(param=value, ...)``, parameters left at their defaults omitted; :func:`parse` reads it back
        exactly: a float is written as its shortest round-tripping ``repr`` (``1.7888543819998317``, not
        ``1.78885``; a whole number without its ``.0``), so ``parse(str(s)) == s`` for every setting and a
        stored setting is the one that runs."""
        defaults = {f.name: f.default for f in fields(self)}
        args = ", ".join(
            f"{k}={_exact(v)}" if isinstance(v, float) else f"{k}={v}"
            for k, v in self.params().items()
            if defaults.get(k, MISSING) is MISSING or defaults[k] != v
        )
        return f"{self.name}({args})"


@dataclass(frozen=True)
class Entropy(Strategy):
    """DeeBERT: exit at the first layer whose prediction entropy is below ``threshold``."""

    threshold: float
    normalized: bool = True
    name: ClassVar[str] = "entropy"
    family: ClassVar[Family] = Family(knob="threshold", larger_exits_earlier=True, style=PlotStyle("C0"), preference=4)

    def __post_init__(self) -> None:
        _non_negative("threshold", self.threshold)

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
        _non_negative("threshold", self.threshold)

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
        _non_negative("threshold", self.threshold)
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
        _non_negative("threshold", self.threshold)

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
        _non_negative("entropy_threshold", self.entropy_threshold)

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


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Entropy, MaxProb, Patience, Voting, Hybrid, Static, Pcee, Oracle)
}

KNOWN_FAMILIES: tuple[str, ...] = tuple(name for name, cls in STRATEGIES.items() if cls.family is not None)
"""Every family one can sweep and calibrate by name: every registered strategy that declares a
:class:`Family` (all but the oracle)."""

FAMILIES: tuple[str, ...] = tuple(
    name for name in KNOWN_FAMILIES if (family := STRATEGIES[name].family) is not None and family.default
)
"""The families one sweeps and calibrates when none are named, in the order reports list them: the known
families less the opt-in ones (:attr:`Family.default`)."""


def family_of(name: str) -> Family:
    """The declaration of family ``name``; LayerExitError when ``name`` is not one of :data:`KNOWN_FAMILIES`."""
    cls = STRATEGIES.get(name)
    if cls is None or cls.family is None:
        raise LayerExitError(f"unknown strategy family {name!r}; known: {', '.join(KNOWN_FAMILIES)}")
    return cls.family


def preferred_families() -> list[str]:
    """The families a run may fall back to when no strategy is given, most preferred first
    (:attr:`Family.preference`)."""
    ranked = [(rank, name) for name in FAMILIES if (rank := family_of(name).preference) is not None]
    return [name for _, name in sorted(ranked)]


def _exact(value: float) -> str:
    """The shortest text that reads back as exactly ``value``: ``2``, ``0.5``, ``1.7888543819998317``."""
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _non_negative(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise LayerExitError(f"{name} must be a non-negative number, got {value!r}")


_SPEC = re.compile(r"^\s*([a-z]+)\s*(?:\((.*)\)|:(.*))?\s*$")


def parse(spec: str) -> Strategy:
    """A strategy from text: ``voting(k=0.5, threshold=2)``, ``entropy:threshold=0.3`` or ``oracle``."""
    match = _SPEC.match(spec)
    if not match:
        raise LayerExitError(f"cannot read strategy {spec!r}; expected e.g. 'voting(k=0.5, threshold=2.0)'")
    name, args = match.group(1), match.group(2) or match.group(3) or ""
    if name not in STRATEGIES:
        raise LayerExitError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    hints = typing.get_type_hints(cls)
    parameters = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, float | int | bool] = {}
    for part in filter(None, (p.strip() for p in args.split(","))):
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep:
            raise LayerExitError(f"strategy {spec!r}: expected key=value, got {part!r}")
        if key not in parameters:
            raise LayerExitError(f"strategy {name!r} has no parameter {key!r}; parameters: {parameters}")
        if key in kwargs:
            raise LayerExitError(f"strategy {spec!r}: {key} is given twice")
        kwargs[key] = _value(raw.strip(), hints[key], key, spec)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise LayerExitError(f"strategy {spec!r}: {err}") from None


def _value(raw: str, kind: type, key: str, spec: str) -> float | int | bool:
    """A parameter's value, of the parameter's type: true/false, an integer, or a number."""
    if kind is bool:
        if raw.lower() not in ("true", "false"):
            raise LayerExitError(f"strategy {spec!r}: {key} must be true or false, got {raw!r}")
        return raw.lower() == "true"
    value = _number(raw, spec)
    if isinstance(value, bool):
        raise LayerExitError(f"strategy {spec!r}: {key} must be a number, got {raw!r}")
    if kind is int:
        if not math.isfinite(value) or value != int(value):
            raise LayerExitError(f"strategy {spec!r}: {key} must be an integer, got {raw!r}")
        return int(value)
    return value


def _number(raw: str, spec: str) -> float | bool:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return float(raw)
    except ValueError:
        raise LayerExitError(f"strategy {spec!r}: {raw!r} is not a number") from None
