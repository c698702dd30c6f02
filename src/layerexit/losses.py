"""Training losses over the logits of every exit, ``(L, B, C)``. Pure functions, no state.

Notation (docs/design.md, Definitions): x_i = softmax(z_i), q_i = log_softmax(z_i) for exit i,
CE(x_i, y) = -q_i[y] and CE(x_i, x_j) = -sum_c x_j[c] q_i[c] (x_j is the target).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Weighting = Literal["uniform", "linear"]
MinOver = Literal["batch", "sample"]


def layer_weights(num_layers: int, kind: Weighting, device: torch.device | None = None) -> Tensor:
    """Per-exit weights: ``uniform`` is all ones (the paper, Eq. 10); ``linear`` is i / sum_i i (PABEE)."""
    if kind == "uniform":
        return torch.ones(num_layers, device=device)
    if kind == "linear":
        w = torch.arange(1, num_layers + 1, dtype=torch.float32, device=device)
        return w / w.sum()
    raise ValueError(f"unknown weighting {kind!r}; expected 'uniform' or 'linear'")


def _check(logits: Tensor, weights: Tensor | None) -> Tensor:
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (L, B, C), got {tuple(logits.shape)}")
    num_layers = logits.shape[0]
    if weights is None:
        return torch.ones(num_layers, device=logits.device, dtype=torch.float32)
    weights = torch.as_tensor(weights, device=logits.device, dtype=torch.float32)
    if weights.shape != (num_layers,):
        raise ValueError(f"weights must have shape ({num_layers},), got {tuple(weights.shape)}")
    return weights


def relevancy(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """sum_i w_i * mean_b CE(x_i, y): the relevancy loss of Eq. 10 (w all ones by default)."""
    w = _check(logits, weights)  # (L,)
    num_layers, batch, num_classes = logits.shape
    ce = F.cross_entropy(
        logits.float().reshape(num_layers * batch, num_classes),
        labels.repeat(num_layers),
        reduction="none",
    ).view(num_layers, batch)  # (L, B)
    return (w * ce.mean(1)).sum()


def pairwise_ce(logits: Tensor, detach_teacher: bool = True) -> Tensor:
    """CE(x_i, x_j) for every pair of exits and sample: ``ce[i, j, b]``, shape (L, L, B)."""
    q = logits.float().log_softmax(-1)  # (L, B, C) predictions, log-probabilities
    x = q.exp()  # (L, B, C) targets, probabilities
    if detach_teacher:
        x = x.detach()
    return -torch.einsum("jbc,ibc->ijb", x, q)  # (L, L, B)


def diversity(
    logits: Tensor,
    weights: Tensor | None = None,
    *,
    detach_teacher: bool = True,
    min_over: MinOver = "batch",
) -> Tensor:
    """sum_{i>=2} w_i * min_{j<i} CE(x_i, x_j), the term the ensemble loss subtracts (Eq. 12/14).

    ``min_over="batch"`` takes, for each exit i, the earlier exit j with the smallest batch-mean CE
    (one j per exit per step, as the paper's Figure 6b counts it); ``"sample"`` takes the minimum
    per sample, then the batch mean. ``weights[0]`` is unused (exit 1 has no earlier exit);
    set ``weights[-1] = 0`` to drop the last exit's diversity (beta_L = 0).
    """
    w = _check(logits, weights)  # (L,)
    num_layers = logits.shape[0]
    if num_layers < 2:
        return logits.new_zeros((), dtype=torch.float32)
    ce = pairwise_ce(logits, detach_teacher)  # (L, L, B)
    earlier = torch.ones(num_layers, num_layers, dtype=torch.bool, device=logits.device).tril(-1)  # j < i
    inf = torch.tensor(float("inf"), device=logits.device)
    if min_over == "batch":
        per_exit = torch.where(earlier, ce.mean(-1), inf).min(1).values  # (L,)
    elif min_over == "sample":
        per_exit = torch.where(earlier.unsqueeze(-1), ce, inf).min(1).values.mean(-1)  # (L,)
    else:
        raise ValueError(f"unknown min_over {min_over!r}; expected 'batch' or 'sample'")
    return (w[1:] * per_exit[1:]).sum()


def closest_earlier_exit(logits: Tensor) -> Tensor:
    """For each exit i >= 2, the 1-based j < i with the smallest batch-mean CE(x_i, x_j): (L - 1,).

    What the diversity term pushes away from; the paper's Figure 6b counts these during training.
    """
    num_layers = logits.shape[0]
    ce = pairwise_ce(logits).mean(-1)  # (L, L)
    earlier = torch.ones(num_layers, num_layers, dtype=torch.bool, device=logits.device).tril(-1)
    ce = torch.where(earlier, ce, torch.tensor(float("inf"), device=logits.device))
    return ce[1:].argmin(1) + 1


def ensemble(
    logits: Tensor,
    labels: Tensor,
    *,
    lam: float,
    relevancy_weights: Tensor | None = None,
    diversity_weights: Tensor | None = None,
    detach_teacher: bool = True,
    min_over: MinOver = "batch",
) -> Tensor:
    """The paper's loss (Eq. 14/24): relevancy - lambda * diversity."""
    rel = relevancy(logits, labels, relevancy_weights)
    if lam == 0:
        return rel
    div = diversity(logits, diversity_weights, detach_teacher=detach_teacher, min_over=min_over)
    return rel - lam * div


def ensemble_weights(
    num_layers: int, weighting: Weighting, drop_last_diversity: bool, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """alpha (relevancy) and beta (diversity) of the ensemble loss, on one scale.

    The paper's analysis of lambda (Eq. 15-22) holds per exit: exit i sees ``beta_i / alpha_i`` as its
    lambda. So beta_i = alpha_i for i < L (and beta_L = 0 when the last exit's diversity is dropped),
    and ``lambda`` means the same under ``uniform`` (alpha_i = 1) and ``linear`` (alpha_i = i / sum_j j)
    weights: the diversity term of exit i weighs ``lambda`` times its relevancy term.
    """
    alpha = layer_weights(num_layers, weighting, device)  # (L,)
    beta = alpha.clone()  # (L,)
    if drop_last_diversity:
        beta[-1] = 0.0
    return alpha, beta


def final_exit_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the last exit alone: plain fine-tuning."""
    return F.cross_entropy(logits[-1].float(), labels)


def distillation(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """FastBERT's self-distillation: sum over exits i < L of KL(x_L || x_i), the last exit detached."""
    teacher = (logits[-1].detach().float() / temperature).softmax(-1)  # (B, C)
    students = (logits[:-1].float() / temperature).log_softmax(-1)  # (L-1, B, C)
    kl = (teacher * (teacher.clamp_min(1e-12).log() - students)).sum(-1)  # (L-1, B)
    return kl.mean(1).sum() * temperature**2


def teacher_distillation(logits: Tensor, teacher: Tensor, weights: Tensor | None = None) -> Tensor:
    """sum_i w_i * mean_b KL(t || x_i): every exit, the last included, towards a fixed teacher's
    probabilities ``teacher`` (B, C), e.g. the frozen fine-tuned model's (w all ones by default)."""
    w = _check(logits, weights)  # (L,)
    if teacher.shape != logits.shape[1:]:
        raise ValueError(f"teacher must have shape {tuple(logits.shape[1:])}, got {tuple(teacher.shape)}")
    target = teacher.float()  # (B, C)
    students = logits.float().log_softmax(-1)  # (L, B, C)
    kl = (target * (target.clamp_min(1e-12).log() - students)).sum(-1)  # (L, B)
    return (w * kl.mean(1)).sum()
