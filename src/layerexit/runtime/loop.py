"""Online early exit: layers after a sample's exit are never computed for that sample.

At batch size 1 the loop simply stops. In a batch, rows that exit are dropped before the next
layer, and when the longest remaining row is shorter than the padded length the padding is cut
too, so later layers run on a smaller tensor. The decision at each layer is the strategy's
``step``, the same primitive offline replay drives, so both give identical exits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from layerexit.model import EarlyExitModel
from layerexit.strategies import Strategy, select_state


@dataclass
class ExitResult:
    """Per-sample outcome of an early-exit forward pass, in input order."""

    exit_layer: Tensor
    """(B,) long, 1-based layer each sample left at."""
    prediction: Tensor
    """(B,) long."""
    probs: Tensor
    """(B, C) the probabilities of the exit each sample left at."""
    layers_run: int
    """How many layers the batch as a whole went through (the deepest exit)."""


@torch.inference_mode()
def early_exit_forward(
    model: EarlyExitModel,
    strategy: Strategy,
    input_ids: Tensor,
    attention_mask: Tensor,
    token_type_ids: Tensor | None = None,
    *,
    trim_padding: bool = True,
) -> ExitResult:
    """Run ``model`` on one batch, each row stopping at the layer ``strategy`` lets it out."""
    if strategy.needs_labels:
        raise ValueError(f"strategy {strategy.name!r} needs labels and cannot run online")
    backbone = model.backbone
    num_layers = model.num_layers
    batch = input_ids.shape[0]
    device = input_ids.device
    exit_layer = torch.full((batch,), num_layers, dtype=torch.long, device=device)
    prediction = torch.zeros(batch, dtype=torch.long, device=device)
    exit_probs = torch.zeros(batch, model.num_labels, device=device)

    mask = attention_mask
    hidden = backbone.embed(input_ids, mask, token_type_ids)  # (B, T, H)
    kwargs = backbone.layer_kwargs(hidden, mask)
    state = strategy.init(batch, model.num_labels, device)
    rows = torch.arange(batch, device=device)  # input positions of the rows still running
    layer = 0
    for layer in range(1, num_layers + 1):
        hidden = backbone.layer(layer - 1, hidden, kwargs)  # (b, t, H)
        probs = model.exits[layer - 1](hidden, mask).float().softmax(-1)  # (b, C)
        fire, pred = strategy.step(state, layer, probs)
        if layer == num_layers or bool(fire.all()):
            exit_layer[rows] = layer
            prediction[rows] = pred
            exit_probs[rows] = probs
            break
        if not bool(fire.any()):
            continue
        done = fire.nonzero().squeeze(1)
        exit_layer[rows[done]] = layer
        prediction[rows[done]] = pred[done]
        exit_probs[rows[done]] = probs[done]
        keep = (~fire).nonzero().squeeze(1)
        rows, hidden, mask = rows[keep], hidden[keep], mask[keep]
        state = select_state(state, keep)
        if trim_padding:
            hidden, mask = _trim_trailing_padding(hidden, mask)
        kwargs = backbone.layer_kwargs(hidden, mask)
    return ExitResult(exit_layer=exit_layer, prediction=prediction, probs=exit_probs, layers_run=layer)


def _trim_trailing_padding(hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Cut the columns that are padding in every remaining row (right padding)."""
    used = mask.any(0)  # (t,)
    length = int(used.nonzero().max()) + 1 if bool(used.any()) else mask.shape[1]
    if length == mask.shape[1]:
        return hidden, mask
    return hidden[:, :length], mask[:, :length]
