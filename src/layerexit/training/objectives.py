"""Training methods as data: each is a list of stages the one training loop runs in turn.

A stage names its loss over the logits of every exit, ``(L, B, C)``, which parameters it trains,
and how deep the forward pass must go. The loop in :mod:`layerexit.training.loop` knows nothing about
any particular method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from layerexit import losses

Trainable = Literal["all", "internal_exits"]
LossFn = Callable[[Tensor, Tensor], Tensor]

OBJECTIVES = ("ensemble", "relevancy", "pabee", "finetune", "deebert", "fastbert", "righttool", "static", "retrofit")
STARTS_WITH_FINETUNE = ("deebert", "fastbert")
"""Two-stage methods whose first stage is the whole ``finetune`` method (:mod:`.reuse`)."""
OBJECTIVE_HELP = {
    "ensemble": "the paper: relevancy - lambda * diversity over all exits",
    "relevancy": "cross-entropy at every exit, uniform weights (lambda = 0)",
    "pabee": "PABEE: cross-entropy at every exit weighted by layer index",
    "finetune": "plain fine-tuning of the backbone and the final exit only",
    "deebert": "DeeBERT: fine-tune backbone + final exit, then train the internal exits on a frozen backbone",
    "fastbert": "FastBERT: fine-tune backbone + final exit, then distil the final exit into the internal ones",
    "righttool": "RightTool: relevancy (uniform), then per-exit temperatures fitted on dev",
    "static": "a model cut to its first `static_layers` layers with one classifier",
    "retrofit": "exits added to a fine-tuned classifier, its encoder frozen and its head kept (`layerexit retrofit`)",
}


@dataclass(frozen=True)
class Stage:
    name: str
    loss: LossFn
    trainable: Trainable
    depth: int
    """How many layers the forward pass runs; exits deeper than this get no logits."""
    exits: tuple[int, ...]
    """1-based exits whose dev metric selects the best checkpoint of this stage."""


def final_exit_ce(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits[-1].float(), labels)


def internal_relevancy(logits: Tensor, labels: Tensor) -> Tensor:
    return losses.relevancy(logits[:-1], labels)


def internal_distillation(logits: Tensor, labels: Tensor) -> Tensor:
    return losses.distillation(logits)


def ensemble_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    lam: float,
    weighting: losses.Weighting,
    drop_last_diversity: bool,
    detach_target: bool,
    min_over: losses.MinOver,
) -> Tensor:
    num_layers = logits.shape[0]
    rel_w, div_w = ensemble_weights(num_layers, weighting, drop_last_diversity, logits.device)
    return losses.ensemble(
        logits,
        labels,
        lam=lam,
        relevancy_weights=rel_w,
        diversity_weights=div_w,
        detach_target=detach_target,
        min_over=min_over,
    )


def ensemble_weights(
    num_layers: int, weighting: losses.Weighting, drop_last_diversity: bool, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """alpha (relevancy) and beta (diversity) of the ensemble objective, on one scale.

    The paper's analysis of lambda (Eq. 15-22) holds per exit: exit i sees ``beta_i / alpha_i`` as its
    lambda. So beta_i = alpha_i for i < L (and beta_L = 0 when the last exit's diversity is dropped),
    and ``lambda`` means the same under ``uniform`` (alpha_i = 1) and ``linear`` (alpha_i = i / sum_j j)
    weights: the diversity term of exit i weighs ``lambda`` times its relevancy term.
    """
    alpha = losses.layer_weights(num_layers, weighting, device)  # (L,)
    beta = alpha.clone()  # (L,)
    if drop_last_diversity:
        beta[-1] = 0.0
    return alpha, beta


def build(
    name: str,
    num_layers: int,
    *,
    lam: float = 0.3,
    weighting: losses.Weighting = "uniform",
    drop_last_diversity: bool = True,
    detach_target: bool = True,
    min_over: losses.MinOver = "batch",
    static_layers: int | None = None,
) -> list[Stage]:
    """The stages of a training method (see ``OBJECTIVE_HELP``)."""
    every = tuple(range(1, num_layers + 1))
    internal = every[:-1]
    finetune = Stage("finetune", final_exit_ce, "all", num_layers, (num_layers,))
    if name == "ensemble":
        loss = partial(
            ensemble_loss,
            lam=lam,
            weighting=weighting,
            drop_last_diversity=drop_last_diversity,
            detach_target=detach_target,
            min_over=min_over,
        )
        return [Stage("ensemble", loss, "all", num_layers, every)]
    if name in ("relevancy", "righttool"):
        return [Stage(name, losses.relevancy, "all", num_layers, every)]
    if name == "pabee":
        return [Stage("pabee", partial(_weighted_relevancy, weighting="linear"), "all", num_layers, every)]
    if name == "finetune":
        return [finetune]
    if name == "deebert":
        return [finetune, Stage("internal-exits", internal_relevancy, "internal_exits", num_layers, internal)]
    if name == "fastbert":
        return [finetune, Stage("self-distillation", internal_distillation, "internal_exits", num_layers, internal)]
    if name == "static":
        if static_layers is None or not 1 <= static_layers <= num_layers:
            raise ValueError(f"objective 'static' needs static_layers in [1, {num_layers}], got {static_layers}")
        return [Stage(f"static-{static_layers}", final_exit_ce, "all", static_layers, (static_layers,))]
    if name == "retrofit":
        raise ValueError("retrofit starts from a fine-tuned classifier: run `layerexit retrofit CLASSIFIER --task ...`")
    raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")


def _weighted_relevancy(logits: Tensor, labels: Tensor, *, weighting: losses.Weighting) -> Tensor:
    return losses.relevancy(logits, labels, losses.layer_weights(logits.shape[0], weighting, logits.device))
