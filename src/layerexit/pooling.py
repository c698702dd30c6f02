"""Pooling a layer's token states (B, T, H) into one vector per input (B, H), for exits and native heads."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Pooling = Literal["first", "mean", "last"]


def pool(hidden: Tensor, padding_mask: Tensor, how: Pooling) -> Tensor:
    """(B, T, H) -> (B, H): the first token, the last real token (inputs are right-padded), or the mean over
    real tokens."""
    if how == "first":
        return hidden[:, 0]
    if how == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token(padding_mask)]
    weights = padding_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def last_token(padding_mask: Tensor) -> Tensor:
    """(B, T) -> (B,): the index of each row's rightmost real token."""
    positions = torch.arange(padding_mask.shape[1], device=padding_mask.device)
    return (positions * padding_mask.to(positions.dtype)).argmax(-1)
