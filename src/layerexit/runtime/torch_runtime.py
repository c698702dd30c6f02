"""The PyTorch runtime: an :class:`EarlyExitModel` behind the runtime protocol (:mod:`layerexit.runtime.base`).

Layers go through the backbone seam (:mod:`layerexit.backbones`: ``embed``, ``layer_kwargs``, ``layer``),
so this file touches no transformers internals. The attention mask the encoder's layers take is built
once per set of rows and kept in :attr:`Rows.extra` until rows are dropped, joined or trimmed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from layerexit.model import EarlyExitModel
from layerexit.runtime.base import Rows, used_length
from layerexit.strategies import Strategy


class TorchRuntime:
    """Runs ``model`` in eval mode, without gradients. Not thread-safe (one caller at a time)."""

    name = "torch"

    def __init__(self, model: EarlyExitModel) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def num_labels(self) -> int:
        return self.model.num_labels

    def _tokens(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None) -> tuple[Tensor, ...]:
        ids = torch.as_tensor(input_ids, device=self.device)
        mask = torch.as_tensor(attention_mask, device=self.device)
        types = None if token_type_ids is None else torch.as_tensor(token_type_ids, device=self.device)
        return (ids, mask) if types is None else (ids, mask, types)

    @torch.inference_mode()
    def embed(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Rows:
        ids, mask, *types = self._tokens(input_ids, attention_mask, token_type_ids)
        hidden = self.model.backbone.embed(ids, mask, types[0] if types else None)  # (B, T, H)
        return Rows(hidden, mask, self.model.second_text(ids, mask))

    @torch.inference_mode()
    def layer(self, layer: int, rows: Rows) -> tuple[Rows, Tensor]:
        backbone = self.model.backbone
        kwargs = rows.extra if rows.extra is not None else backbone.layer_kwargs(rows.hidden, rows.mask)
        hidden = backbone.layer(layer - 1, rows.hidden, kwargs)  # (b, t, H)
        probs = self.model.exits[layer - 1](hidden, rows.mask, rows.second).float().softmax(-1)  # (b, C)
        return Rows(hidden, rows.mask, rows.second, kwargs), probs.cpu()

    def take(self, rows: Rows, keep: Tensor, *, trim: bool = True) -> Rows:
        index = keep.to(self.device)
        hidden, mask = rows.hidden.index_select(0, index), rows.mask.index_select(0, index)
        second = None if rows.second is None else rows.second.index_select(0, index)
        if trim:
            length = used_length(mask)
            if length < mask.shape[1]:
                hidden, mask = hidden[:, :length], mask[:, :length]
                second = None if second is None else second[:, :length]
        return Rows(hidden, mask, second)

    def join(self, parts: Sequence[Rows]) -> Rows:
        if len(parts) == 1:
            return parts[0]
        length = max(int(p.mask.shape[1]) for p in parts)
        hidden = torch.cat([F.pad(p.hidden, (0, 0, 0, length - p.hidden.shape[1])) for p in parts])  # (b, t, H)
        mask = torch.cat([F.pad(p.mask, (0, length - p.mask.shape[1])) for p in parts])  # (b, t)
        if parts[0].second is None:
            return Rows(hidden, mask)
        second = torch.cat([F.pad(p.second, (0, length - p.second.shape[1])) for p in parts])  # (b, t)
        return Rows(hidden, mask, second)

    def whole_exit(
        self, strategy: Strategy, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> None:
        """Always None: on PyTorch the per-layer loop is the one path."""
        return None

    @torch.inference_mode()
    def full(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """The encoder's own forward (as a user would run it without early exit), then the last exit."""
        ids, mask, *types = self._tokens(input_ids, attention_mask, token_type_ids)
        kwargs = {"input_ids": ids, "attention_mask": mask}
        if types:
            kwargs["token_type_ids"] = types[0]
        hidden = self.model.backbone.model(**kwargs).last_hidden_state  # (B, T, H)
        second = self.model.second_text(ids, mask)
        return self.model.exits[-1](hidden, mask, second).float().softmax(-1).cpu()  # (B, C)
