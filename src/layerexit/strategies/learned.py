"""A learned exit rule in the spirit of CATs (Schuster et al., 2021): a small model, fitted on rows the exits
did not train on, predicts whether exit l already gives the final exit's answer; a sample leaves at the first
layer where that predicted agreement reaches the threshold.

The model is a logistic regression over what :meth:`Strategy.step` sees, the exits' probabilities so far: at
layer l, for the class c that exit l predicts, its probability, its margin over the runner-up, the exit's
normalised entropy, the mean and the lowest probability exits 1..l gave c, the share of exits 1..l that
predicted c, three of them again on a log scale near certainty (:data:`NUM_STATS`), and the depth (one-hot).
CATs also reads a projection of the layer's hidden state; ``step`` sees probabilities only, in every runtime
and in the server, so this rule does not.

The fitted rule (:class:`AgreementRule`) lives in the run folder (``agreement.safetensors``: weights, the
rows it was fitted on, a format version), loaded with safetensors like the model's weights. A setting names
the rule by a fingerprint of its weights, ``agreement(threshold=0.97, rule=5d0c1e2f3a4b)``, so its text form
is exact; :meth:`Agreement.bound` attaches the weights (``RunFolder.bind`` does, for every command).
Calibrate its threshold on rows the rule was not fitted on: ``layerexit calibrate`` leaves them out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from layerexit.errors import LayerExitError
from layerexit.strategies.base import Family, PlotStyle, State, Strategy, entropy

FORMAT = "1"
"""Version of ``agreement.safetensors``; a file of another version is refused."""
FEATURES = "probs-v2"
"""The feature set (:func:`statistics` and the depth one-hot); part of the fingerprint, so a rule fitted on other
features is never run with these."""
NUM_STATS = 9
"""Features besides the depth one-hot: top probability, margin, entropy, mean and lowest probability given to
the class so far, share of exits that predicted it; then the logarithms of 1 - top probability, of the entropy
and of 1 - the lowest probability given to the class (floored at 1e-9), which resolve the nearly certain exits,
among which a rule at 1% disagreement chooses."""
THRESHOLDS: tuple[float, ...] = tuple(round(1 - 0.5 * 10 ** (-i / 10), 6) for i in range(41))
"""The calibration grid: from 0.5 to 1 - 5e-5, denser towards 1, where the rows that may leave early lie."""


def statistics(state: State, layer: int, probs: Tensor) -> tuple[Tensor, Tensor]:
    """Update the running per-class statistics in ``state`` with layer ``layer``'s probabilities (N, C) and
    return ``(stats, prediction)``: the features but the depth (N, NUM_STATS), float64, and exit l's argmax."""
    p = probs.double()
    prediction = p.argmax(-1)
    pick = prediction[:, None]
    state["votes"].scatter_add_(1, pick, torch.ones_like(state["votes"][:, :1]))
    state["mass"] += p
    torch.minimum(state["low"], p, out=state["low"])
    top2 = p.topk(2, -1).values if p.shape[-1] > 1 else torch.cat([p, torch.zeros_like(p)], -1)
    h = entropy(p)
    given = torch.cat([state["mass"].gather(1, pick), state["votes"].gather(1, pick)], 1) / layer  # mean, share
    low = state["low"].gather(1, pick)[:, 0]
    near_certain = torch.stack([1 - top2[:, 0], h, 1 - low], 1).clamp_min(1e-9).log()
    stats = torch.stack([top2[:, 0], top2[:, 0] - top2[:, 1], h, given[:, 0], low, given[:, 1]], 1)
    return torch.cat([stats, near_certain], 1), prediction


def depth_one_hot(num_rows: int, layer: int, num_layers: int) -> Tensor:
    """The depth features of layer ``layer`` (N, num_layers): what :func:`fit` appends to the statistics."""
    depth = torch.zeros(num_rows, num_layers, dtype=torch.float64)
    depth[:, layer - 1] = 1.0
    return depth


def initial_state(num_samples: int, num_classes: int, device: torch.device | str = "cpu") -> State:
    return {
        "votes": torch.zeros(num_samples, num_classes, dtype=torch.float64, device=device),
        "mass": torch.zeros(num_samples, num_classes, dtype=torch.float64, device=device),
        "low": torch.ones(num_samples, num_classes, dtype=torch.float64, device=device),
    }


@dataclass(frozen=True, eq=False)
class AgreementRule:
    """A fitted agreement model, ``sigmoid([statistics, depth one-hot] @ weights + bias)``, for a model of
    ``num_layers`` exits and ``num_classes`` classes; ``fit_split`` and ``fit_rows`` say which rows fitted it."""

    weights: Tensor  # (NUM_STATS + num_layers,) float64
    bias: float
    num_layers: int
    num_classes: int
    fit_split: str
    fit_rows: Tensor  # (M,) int64, indices into fit_split

    def __post_init__(self) -> None:
        if self.weights.shape != (NUM_STATS + self.num_layers,) or self.weights.dtype != torch.float64:
            raise LayerExitError(
                f"an agreement rule for {self.num_layers} layers has {NUM_STATS + self.num_layers} float64 weights, "
                f"got {tuple(self.weights.shape)} {self.weights.dtype}"
            )
        if not math.isfinite(self.bias) or not bool(torch.isfinite(self.weights).all()):
            raise LayerExitError("an agreement rule's weights must be finite numbers")

    @property
    def fingerprint(self) -> str:
        """12 hex digits of a hash of the weights, the bias, the sizes and the feature set."""
        digest = hashlib.sha256(f"{FEATURES}|{self.num_layers}|{self.num_classes}|{self.bias!r}|".encode())
        digest.update(self.weights.numpy().tobytes())
        return digest.hexdigest()[:12]

    def score(self, stats: Tensor, layer: int) -> Tensor:
        """Predicted probability (N,) that exit ``layer``, with these :func:`statistics`, agrees with the final
        exit: the logistic model over the statistics and the depth one-hot, the latter as one weight added."""
        weights = self.weights.to(stats.device)
        return torch.sigmoid(stats @ weights[:NUM_STATS] + (weights[NUM_STATS + layer - 1] + self.bias))

    def grid(self) -> list[Strategy]:
        """The settings calibration tests: every threshold of :data:`THRESHOLDS`, bound to this rule."""
        return [Agreement(threshold=t, rule=self.fingerprint).bound(self) for t in THRESHOLDS]

    def to_file(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The tensors and metadata of ``agreement.safetensors`` (``RunFolder.write_agreement_rule`` writes them)."""
        tensors = {"weights": self.weights, "bias": torch.tensor([self.bias], dtype=torch.float64)}
        tensors["fit_rows"] = self.fit_rows.long().contiguous()
        metadata = {
            "format": FORMAT,
            "features": FEATURES,
            "num_layers": str(self.num_layers),
            "num_classes": str(self.num_classes),
            "fit_split": self.fit_split,
            "fingerprint": self.fingerprint,
        }
        return tensors, metadata

    @classmethod
    def load(cls, path: Path) -> AgreementRule:
        from safetensors import safe_open

        if not path.is_file():
            raise LayerExitError(f"{path} is missing: fit the rule first (`layerexit fit-agreement RUN`)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (a safe_open handle)
        except Exception as err:  # a damaged file: safetensors' own errors vary
            raise LayerExitError(f"{path} cannot be read as an agreement rule: {err}") from None
        if meta.get("format") != FORMAT or meta.get("features") != FEATURES:
            raise LayerExitError(
                f"{path}: format {meta.get('format')!r} with features {meta.get('features')!r}; this layerexit reads "
                f"format {FORMAT} with {FEATURES}: fit the rule again"
            )
        missing = sorted({"weights", "bias", "fit_rows"} - set(tensors))
        if missing or not {"num_layers", "num_classes", "fit_split"} <= set(meta):
            raise LayerExitError(f"{path} is damaged (lacks {missing or 'its sizes'}): fit the rule again")
        rule = cls(
            weights=tensors["weights"],
            bias=float(tensors["bias"][0]),
            num_layers=int(meta["num_layers"]),
            num_classes=int(meta["num_classes"]),
            fit_split=meta["fit_split"],
            fit_rows=tensors["fit_rows"],
        )
        if meta.get("fingerprint") != rule.fingerprint:
            raise LayerExitError(f"{path} is damaged: its weights do not give the fingerprint it records")
        return rule


def internal_exits(probs: Tensor, answers: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
    """For every internal exit l of rows (L, N, C): ``(l, its statistics (N, NUM_STATS), whether its argmax equals
    answers (N,), as 0/1 float64)``: what the rule is fitted on and scored against."""
    state = initial_state(probs.shape[1], probs.shape[2])
    for layer in range(1, probs.shape[0]):
        stats, prediction = statistics(state, layer, probs[layer - 1])
        yield layer, stats, (prediction == answers).double()


def fit(probs: Tensor, answers: Tensor, rows: Tensor, split: str, l2: float = 1e-3) -> AgreementRule:
    """Fit the rule on rows ``rows`` of a split's per-layer probabilities (L, N, C): at every internal exit, does
    its argmax equal ``answers`` (N,), the final answers it should agree with (the run's own last exit's, or
    a reference model's)? Logistic regression with an L2 penalty, by L-BFGS in float64: deterministic."""
    num_layers, _, num_classes = probs.shape
    xs, ys = [], []
    for layer, stats, agrees in internal_exits(probs[:, rows], answers[rows]):
        xs.append(torch.cat([stats, depth_one_hot(len(rows), layer, num_layers)], 1))
        ys.append(agrees)
    x, y = torch.cat(xs), torch.cat(ys)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return AgreementRule(w.detach(), float(b.detach()), num_layers, num_classes, split, rows.long().clone())


@dataclass(frozen=True)
class Agreement(Strategy):
    """Exit at the first layer whose predicted agreement with the final exit reaches ``threshold``, by the fitted
    rule ``rule`` (a fingerprint; :meth:`bound` attaches the weights). Opt-in and calibrated, never swept."""

    threshold: float
    rule: str
    name: ClassVar[str] = "agreement"
    family: ClassVar[Family] = Family(
        knob="threshold", larger_exits_earlier=False, style=PlotStyle("C6"), default=False
    )

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, int | float) and 0.0 <= self.threshold <= 1.0):
            raise LayerExitError(f"agreement threshold must be in [0, 1], got {self.threshold!r}")
        if not (
            isinstance(self.rule, str) and len(self.rule) == 12 and all(c in "0123456789abcdef" for c in self.rule)
        ):
            raise LayerExitError(f"agreement rule must be the 12-digit fingerprint of a fitted rule, got {self.rule!r}")

    @classmethod
    def default_grid(cls, num_layers: int, num_classes: int) -> list[Strategy]:
        raise LayerExitError(
            "the agreement rule's settings come from its fitted rule: `layerexit fit-agreement RUN`, then "
            "`layerexit calibrate RUN --strategies agreement ...` or `layerexit evaluate RUN --strategies agreement`"
        )

    def bound(self, rule: AgreementRule) -> Agreement:
        """This setting with ``rule``'s weights attached; refused unless ``rule`` is the one it names."""
        if rule.fingerprint != self.rule:
            raise LayerExitError(f"{self} names rule {self.rule}, but the fitted rule is {rule.fingerprint}")
        copy = dataclasses.replace(self)
        object.__setattr__(copy, "_rule", rule)
        return copy

    @property
    def fitted(self) -> AgreementRule:
        rule: AgreementRule | None = getattr(self, "_rule", None)
        if rule is None:
            raise LayerExitError(
                f"{self} has no weights attached: load it from its run folder (RunFolder(RUN).bind(strategy); "
                "the commands and Predictor.from_run do)"
            )
        return rule

    def init(self, num_samples: int, num_classes: int, device: torch.device | str = "cpu") -> State:
        return initial_state(num_samples, num_classes, device)

    def step(self, state: State, layer: int, probs: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        rule = self.fitted
        if probs.shape[-1] != rule.num_classes:
            raise LayerExitError(f"rule {self.rule} was fitted for {rule.num_classes} classes, got {probs.shape[-1]}")
        if layer > rule.num_layers:
            raise LayerExitError(f"rule {self.rule} was fitted for a model of {rule.num_layers} layers")
        stats, prediction = statistics(state, layer, probs)
        return rule.score(stats, layer) >= self.threshold, prediction
