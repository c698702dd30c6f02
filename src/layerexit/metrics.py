"""Classification metrics on label tensors, and the speed-up of a set of exit layers."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def accuracy(pred: Tensor, labels: Tensor) -> float:
    return float((pred == labels).float().mean()) if labels.numel() else float("nan")


def _confusion(pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    index = labels.long() * num_classes + pred.long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)  # (true, pred)


def macro_f1(pred: Tensor, labels: Tensor, num_classes: int | None = None) -> float:
    """Unweighted mean over classes of F1; a class absent from both labels and predictions is skipped."""
    num_classes = num_classes or int(max(int(pred.max()), int(labels.max())) + 1)
    cm = _confusion(pred, labels, num_classes).double()
    tp = cm.diag()
    support = cm.sum(1) + cm.sum(0)
    present = support > 0
    f1 = torch.where(present, 2 * tp / support.clamp_min(1), torch.zeros_like(tp))
    return float(f1[present].mean()) if bool(present.any()) else float("nan")


def binary_f1(pred: Tensor, labels: Tensor, positive: int = 1) -> float:
    tp = float(((pred == positive) & (labels == positive)).sum())
    predicted = float((pred == positive).sum())
    actual = float((labels == positive).sum())
    return 2 * tp / (predicted + actual) if predicted + actual else 0.0


def f1_acc(pred: Tensor, labels: Tensor) -> float:
    """GLUE's MRPC/QQP score: the mean of accuracy and F1 of the positive class."""
    return (accuracy(pred, labels) + binary_f1(pred, labels)) / 2


def mcc(pred: Tensor, labels: Tensor, num_classes: int | None = None) -> float:
    """Matthews correlation (GLUE's CoLA metric), multi-class form; 0 when undefined."""
    num_classes = num_classes or int(max(int(pred.max()), int(labels.max())) + 1)
    cm = _confusion(pred, labels, num_classes).double()
    t, p, c, s = cm.sum(1), cm.sum(0), cm.trace(), cm.sum()
    numerator = c * s - (t * p).sum()
    denominator = math.sqrt(float(s * s - (p * p).sum())) * math.sqrt(float(s * s - (t * t).sum()))
    return float(numerator) / denominator if denominator else 0.0


METRICS: dict[str, Callable[[Tensor, Tensor], float]] = {
    "accuracy": accuracy,
    "macro_f1": macro_f1,
    "f1_acc": f1_acc,
    "mcc": mcc,
}


def score(metric: str, pred: Tensor, labels: Tensor) -> float:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    return METRICS[metric](pred, labels)


def speedup(exit_layer: Tensor, num_layers: int) -> float:
    """The paper's speed-up: L divided by the mean number of layers run (embeddings not counted)."""
    return num_layers / float(exit_layer.float().mean())


def per_layer_scores(probs: Tensor, labels: Tensor, metric: str) -> list[float]:
    """The metric of each exit used alone: [score of exit 1, ..., exit L]. probs: (L, N, C)."""
    return [score(metric, p.argmax(-1), labels) for p in probs]
