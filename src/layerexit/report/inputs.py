"""The per-input data of the explorer, stored compactly: flat typed arrays in base64, no objects.

For N inputs, L layers and C classes the page carries the probabilities (N*L*C bytes, rounded to
multiples of 1/``SCALE``), each layer's prediction (N*L, the argmax of the unrounded
probabilities, so rounding never changes a prediction), the labels (N), and the exit layer and
prediction of every strategy shown (2*N each). Exits and predictions come from each strategy's
own ``replay``; the page never re-implements a rule.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from layerexit import strategies
from layerexit.errors import LayerExitError
from layerexit.strategies import Strategy

SCALE = 250
"""Probabilities are stored as round(p * SCALE) in one byte: steps of 0.004, shown with 3 decimals."""
MAX_TEXT = 600
"""Longer texts are cut (with an ellipsis) to keep the page small."""


@dataclass(frozen=True)
class Shown:
    """A strategy setting shown in the explorer, and why it is there."""

    name: str  # the family, "oracle", or "calibrated"
    strategy: Strategy
    source: str  # e.g. "selected on dev in 1.3x-2.0x"


def pack(values: Tensor | np.ndarray) -> dict[str, Any]:
    """A flat array of non-negative integers as base64 of uint8 (or uint16 when a value exceeds 255)."""
    array = np.asarray(values).reshape(-1)
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise ValueError("pack holds integers in [0, 65535]")
    dtype = "u1" if not array.size or array.max() <= 255 else "u2"
    raw = array.astype("<u2" if dtype == "u2" else np.uint8).tobytes()
    return {"dtype": dtype, "b64": base64.b64encode(raw).decode("ascii")}


def unpack(packed: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`pack` (what the page's script does in JavaScript)."""
    raw = base64.b64decode(packed["b64"])
    return np.frombuffer(raw, dtype="<u2" if packed["dtype"] == "u2" else np.uint8).astype(np.int64)


def shown_strategies(
    report: dict[str, Any],
    calibration: dict[str, Any] | None,
    bind: Callable[[strategies.Strategy], strategies.Strategy] = lambda s: s,
) -> list[Shown]:
    """The selected setting of every family (report.json "selected"), the calibrated default, the oracle.
    ``bind``: what makes a setting runnable on the run (``RunFolder.bind``: a learned rule's weights)."""
    lo, hi = report.get("band", [None, None])
    band = f" in {lo:g}x-{hi:g}x" if lo is not None else ""
    shown = []
    for family, entry in report.get("selected", {}).items():
        if entry is not None:
            shown.append(
                Shown(family, bind(strategies.parse(entry["setting"])), f"selected on {report['select_split']}{band}")
            )
    if calibration is not None and isinstance(calibration.get("default"), str):
        request = ", ".join(f"{k}={v}" for k, v in calibration.get("request", {}).items() if v is not None)
        shown.append(Shown("calibrated", bind(strategies.parse(calibration["default"])), f"calibrated ({request})"))
    shown.append(Shown("oracle", strategies.Oracle(), "upper bound: the first layer that is right"))
    return shown


def voting_k(shown: list[Shown]) -> tuple[float, float | None, str]:
    """The k (and threshold) of the V_l chart: the selected voting setting, else the hybrid's, else k=0.5."""
    for item in shown:
        if isinstance(item.strategy, strategies.Voting | strategies.Hybrid):
            return float(item.strategy.k), float(item.strategy.threshold), str(item.strategy)
    return 0.5, None, ""


def payload(
    probs: Tensor,
    labels: Tensor,
    label_names: list[str],
    shown: list[Shown],
    replays: list[tuple[Tensor, Tensor]] | None = None,
    *,
    texts: list[str] | None = None,
    pairs: list[str | None] | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Everything the explorer needs, JSON-ready. ``replays``: each shown strategy's (exit layer,
    prediction) from its ``replay``, when the caller already has them."""
    if probs.dim() != 3 or labels.dim() != 1 or probs.shape[1] != labels.numel():
        raise LayerExitError(f"probabilities {tuple(probs.shape)} and labels {tuple(labels.shape)} do not match")
    num_layers, num_inputs, num_classes = probs.shape
    probs = probs.float()
    by_input = probs.permute(1, 0, 2).contiguous()  # (N, L, C)
    rounded = torch.round(by_input.clamp(0, 1) * SCALE).to(torch.int64)
    if replays is None:
        replays = [s.strategy.replay(probs, labels if s.strategy.needs_labels else None) for s in shown]
    rows = []
    for item, (exit_layer, prediction) in zip(shown, replays, strict=True):
        rows.append(
            {
                "name": item.name,
                "setting": str(item.strategy),
                "source": item.source,
                "speedup": round(num_layers / float(exit_layer.double().mean()), 4),
                "exit": pack(exit_layer),
                "pred": pack(prediction),
            }
        )
    k, threshold, setting = voting_k(shown)
    return {
        "split": split,
        "L": num_layers,
        "C": num_classes,
        "n": num_inputs,
        "labelNames": label_names,
        "scale": SCALE,
        "probs": pack(rounded),
        "argmax": pack(by_input.argmax(-1)),
        "y": pack(labels),
        "strategies": rows,
        "voting": {"k": k, "threshold": threshold, "setting": setting},
        "texts": [_cut(t) for t in texts] if texts is not None else None,
        "pairs": [_cut(p) if p else "" for p in pairs] if pairs is not None else None,
    }


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"
