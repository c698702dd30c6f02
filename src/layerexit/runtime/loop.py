"""The one exit loop: layers after a sample's exit are never computed for that sample, on any runtime.

At batch size 1 the loop simply stops. In a batch, rows that exit are dropped before the next layer,
and when the longest remaining row is shorter than the padded length the padding is cut too, so later
layers run on a smaller tensor. The decision at each layer is the strategy's ``step``, the same
primitive offline replay drives, so online and offline exits agree by construction.

Everything here goes through the runtime protocol (:mod:`layerexit.runtime.base`), so PyTorch and
ONNX Runtime share the loop; :func:`exit_step` is the one layer-and-decision step that both this loop
and the serving engine's scheduler drive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from layerexit.data.encoding import Encoded, batches
from layerexit.model import EarlyExitModel
from layerexit.runtime.base import Rows, Runtime
from layerexit.strategies import State, Strategy, select_state


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


def check_online(strategy: Strategy) -> None:
    if strategy.needs_labels:
        raise ValueError(f"strategy {strategy.name!r} needs labels and cannot run online")


def exit_step(
    runtime: Runtime, strategy: Strategy, layer: int, rows: Rows, state: State
) -> tuple[Rows, Tensor, Tensor, Tensor]:
    """Run layer ``layer`` and its exit on ``rows`` and decide: ``(rows, probs, fire, prediction)``.

    ``state`` is the strategy's running state of exactly these rows, updated in place. At the last
    layer every row fires.
    """
    rows, probs = runtime.layer(layer, rows)  # probs (b, C)
    fire, prediction = strategy.step(state, layer, probs)
    if layer == runtime.num_layers:
        fire = torch.ones_like(fire)
    return rows, probs, fire, prediction


def early_exit(
    runtime: Runtime,
    strategy: Strategy,
    input_ids: Tensor | np.ndarray,
    attention_mask: Tensor | np.ndarray,
    token_type_ids: Tensor | np.ndarray | None = None,
    *,
    trim_padding: bool = True,
) -> ExitResult:
    """Run one batch on ``runtime``, each row stopping at the layer ``strategy`` lets it out."""
    check_online(strategy)
    if trim_padding or len(input_ids) == 1:  # a runtime may run the whole exit in one call, deciding as below
        whole = runtime.whole_exit(strategy, input_ids, attention_mask, token_type_ids)
        if whole is not None:
            depth, answer, answer_probs = whole
            return ExitResult(depth, answer, answer_probs, layers_run=int(depth.max()))
    rows = runtime.embed(input_ids, attention_mask, token_type_ids)  # (B, T, H)
    batch = len(rows)
    state = strategy.init(batch, runtime.num_labels, "cpu")
    # Until the first rows leave nothing is indexed: at batch 1 (and whenever a whole batch leaves
    # together) each layer costs one runtime call, one strategy step and one count.
    positions: Tensor | None = None  # input positions of the rows still running, once some have left
    exit_layer = torch.full((batch,), runtime.num_layers, dtype=torch.long)
    prediction = torch.zeros(batch, dtype=torch.long)
    exit_probs = torch.zeros(batch, runtime.num_labels)
    layer = 0
    for layer in range(1, runtime.num_layers + 1):
        rows, probs, fire, pred = exit_step(runtime, strategy, layer, rows, state)
        leaving = int(np.count_nonzero(fire.numpy()))  # 3x cheaper than fire.sum() at batch 1
        if leaving == fire.shape[0]:
            if positions is None:  # the whole batch leaves here together
                return ExitResult(torch.full((batch,), layer, dtype=torch.long), pred, probs, layers_run=layer)
            exit_layer[positions], prediction[positions], exit_probs[positions] = layer, pred, probs
            break
        if leaving == 0:
            continue
        if positions is None:
            positions = torch.arange(batch)
        done = fire.nonzero().squeeze(1)
        exit_layer[positions[done]] = layer
        prediction[positions[done]] = pred[done]
        exit_probs[positions[done]] = probs[done]
        keep = (~fire).nonzero().squeeze(1)
        positions, state = positions[keep], select_state(state, keep)
        rows = runtime.take(rows, keep, trim=trim_padding)
    return ExitResult(exit_layer=exit_layer, prediction=prediction, probs=exit_probs, layers_run=layer)


def all_exits(
    runtime: Runtime,
    input_ids: Tensor | np.ndarray,
    attention_mask: Tensor | np.ndarray,
    token_type_ids: Tensor | np.ndarray | None = None,
    *,
    depth: int | None = None,
) -> Tensor:
    """Every exit's probabilities, (depth, B, C) float32: the input of offline replay."""
    rows = runtime.embed(input_ids, attention_mask, token_type_ids)
    probs = []
    for layer in range(1, (depth or runtime.num_layers) + 1):
        rows, layer_probs = runtime.layer(layer, rows)
        probs.append(layer_probs)
    return torch.stack(probs)  # (depth, B, C)


def collect_probs(
    runtime: Runtime,
    data: Encoded,
    batch_size: int,
    pad_id: int,
    *,
    progress: bool = False,
    depth: int | None = None,
) -> Tensor:
    """Every exit's probabilities for every example, in input order: (depth, N, C)."""
    out = torch.zeros(depth or runtime.num_layers, len(data), runtime.num_labels)
    bar = tqdm(total=len(data), desc="evaluating", disable=not progress, leave=False)
    for batch in batches(data, batch_size, pad_id, by_length=True):
        out[:, batch["index"]] = all_exits(
            runtime, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), depth=depth
        )  # (depth, b, C)
        bar.update(len(batch["index"]))
    bar.close()
    return out


def model_probs(model: EarlyExitModel, data: Encoded, batch_size: int, pad_id: int, **options: Any) -> Tensor:
    """:func:`collect_probs` on the PyTorch runtime of ``model``, whose train/eval mode is restored
    afterwards (training evaluates dev between epochs). (L, N, C), in input order."""
    from layerexit.runtime.torch_runtime import TorchRuntime

    was_training = model.training
    try:
        return collect_probs(TorchRuntime(model), data, batch_size, pad_id, **options)
    finally:
        model.train(was_training)


def early_exit_forward(
    model: EarlyExitModel,
    strategy: Strategy,
    input_ids: Tensor,
    attention_mask: Tensor,
    token_type_ids: Tensor | None = None,
    *,
    trim_padding: bool = True,
) -> ExitResult:
    """:func:`early_exit` on the PyTorch runtime of ``model`` (which is put in eval mode)."""
    from layerexit.runtime.torch_runtime import TorchRuntime

    return early_exit(
        TorchRuntime(model), strategy, input_ids, attention_mask, token_type_ids, trim_padding=trim_padding
    )
