"""Pooling a layer's token states (B, T, H) into one vector per input, for exits and native heads.

``first``, ``mean`` and ``last`` give (B, H). ``pair`` is for inputs that are two texts (premise and
hypothesis, question and passage): the mean of each text's tokens on its own, u and v, compared as
sentence-pair models compare two sentence embeddings, ``[u, v, |u - v|, u * v]`` (B, 4H). Which tokens
belong to the second text is read from the token ids alone (:func:`second_text`), so every runtime can
find it the same way without the tokenizer.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Pooling = Literal["first", "mean", "last", "pair"]
POOLINGS: tuple[Pooling, ...] = ("first", "mean", "last", "pair")


def pooled_size(hidden_size: int, how: Pooling) -> int:
    """How many values ``pool`` gives per input."""
    return 4 * hidden_size if how == "pair" else hidden_size


def pool(hidden: Tensor, padding_mask: Tensor, how: Pooling, second: Tensor | None = None) -> Tensor:
    """(B, T, H) -> (B, H), or (B, 4H) for ``pair``: the first token, the last real token (inputs are
    right-padded), the mean over real tokens, or the pair features. ``second`` (B, T) marks the tokens
    of the second text (:func:`second_text`); only ``pair`` reads it."""
    if how == "first":
        return hidden[:, 0]
    if how == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token(padding_mask)]
    if how == "pair":
        if second is None:
            raise ValueError("pair pooling needs the mask of the second text's tokens")
        u = _mean(hidden, padding_mask * (1 - second))  # (B, H)
        v = _mean(hidden, second)
        return torch.cat([u, v, (u - v).abs(), u * v], -1)  # (B, 4H)
    return _mean(hidden, padding_mask)


def _mean(hidden: Tensor, mask: Tensor) -> Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def second_text(input_ids: Tensor, padding_mask: Tensor, separator_id: int) -> Tensor:
    """(B, T) -> (B, T) of 0/1 in ``padding_mask``'s dtype: 1 on the real tokens after each row's first
    separator token. For BERT's ``[CLS] a [SEP] b [SEP]`` that is ``b [SEP]`` (its token types), for
    RoBERTa's ``<s> a </s></s> b </s>`` it is ``</s> b </s>``; a single text has none."""
    is_separator = (input_ids == separator_id).to(torch.int32)
    before = is_separator.cumsum(1) - is_separator  # separators strictly before each position
    return ((before > 0).to(padding_mask.dtype)) * padding_mask


def last_token(padding_mask: Tensor) -> Tensor:
    """(B, T) -> (B,): the index of each row's rightmost real token."""
    positions = torch.arange(padding_mask.shape[1], device=padding_mask.device)
    return (positions * padding_mask.to(positions.dtype)).argmax(-1)
