"""The runtime protocol: what every way of running a trained model provides to the one exit loop.

A runtime (PyTorch, ONNX Runtime fp32 or int8) exposes five operations on batches of rows:

* ``embed(input_ids, attention_mask, token_type_ids)`` -> :class:`Rows`: the hidden states entering
  layer 1, with their padding mask;
* ``layer(layer, rows)`` -> ``(rows, probs)``: layer ``layer`` (1-based) and its exit, on the rows
  given; ``probs`` is a float32 CPU tensor (b, C) of that exit's probabilities;
* ``take(rows, keep)``: only the rows ``keep`` (a LongTensor of row positions), with the trailing
  padding that every kept row shares cut off (right padding);
* ``join(parts)``: the rows of several batches at the same depth as one batch, right-padded to the
  longest (a server pools rows of different requests this way);
* ``full(input_ids, attention_mask, token_type_ids)`` -> probs (B, C): the plain full model, as a user
  would deploy it without early exit (the latency baseline);
* ``whole_exit(strategy, input_ids, attention_mask, token_type_ids)`` -> ``(exit layer (B,), prediction
  (B,), probs (B, C))`` or None: a runtime that can run a batch's whole exit in a single call, with exactly
  the loop's decisions, rows dropped and padding cut, does so (ONNX Runtime,
  :mod:`layerexit.runtime.onnx_fused`); None runs the loop.

:mod:`layerexit.runtime.loop` drives these, so exits, dropped rows and trimmed padding are written once
for every runtime; a new backend is one module that implements this protocol plus one parity test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from torch import Tensor

from layerexit.runtime.registry import REGISTRY, runtime_entry
from layerexit.strategies import Strategy

RUNTIMES: tuple[str, ...] = tuple(REGISTRY)
"""Runtime names, as every command and :meth:`Predictor.from_run` take them (``--runtime``): the
entries of :mod:`layerexit.runtime.registry`."""


def parse_runtime(name: str) -> str:
    """A runtime name, checked against the registry."""
    return runtime_entry(name).name


@dataclass
class Rows:
    """A batch of rows between layers, in a runtime's own array type.

    ``hidden`` (b, t, H) and ``mask`` (b, t) are torch tensors or numpy arrays, whichever the runtime
    computes with; ``second`` (b, t), in the same type, marks the second text's tokens where the exits
    pool text pairs (:func:`layerexit.pooling.second_text`), else it is ``None``; ``extra`` is the
    runtime's cache for these exact rows (PyTorch keeps the attention mask it built for its layers
    there), dropped whenever the rows change.
    """

    hidden: Any
    mask: Any
    second: Any = None
    extra: Any = None

    def __len__(self) -> int:
        return int(self.mask.shape[0])


@runtime_checkable
class Runtime(Protocol):
    """See the module docstring. ``name`` is one of :data:`RUNTIMES`."""

    name: str

    @property
    def num_layers(self) -> int: ...

    @property
    def num_labels(self) -> int: ...

    def embed(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Rows: ...

    def layer(self, layer: int, rows: Rows) -> tuple[Rows, Tensor]: ...

    def take(self, rows: Rows, keep: Tensor, *, trim: bool = True) -> Rows: ...

    def join(self, parts: Sequence[Rows]) -> Rows: ...

    def full(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Tensor: ...

    def whole_exit(
        self, strategy: Strategy, input_ids: Any, attention_mask: Any, token_type_ids: Any = None
    ) -> tuple[Tensor, Tensor, Tensor] | None: ...


def used_length(mask: Tensor | np.ndarray) -> int:
    """How many leading columns hold a real token in some row (right padding): trimming keeps these."""
    used = mask.any(0) if isinstance(mask, np.ndarray) else mask.any(0).cpu().numpy()
    columns = np.flatnonzero(used)
    return int(columns[-1]) + 1 if columns.size else int(mask.shape[1])
