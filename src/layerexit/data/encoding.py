"""Tokenising examples once and padding them into batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from layerexit.errors import LayerExitError


@dataclass
class Encoded:
    """Tokenised inputs of one split, unpadded; ``labels`` is -1 where unknown."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: Tensor  # (N,)

    def __len__(self) -> int:
        return len(self.input_ids)


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise LayerExitError(f"cannot load a tokenizer from {path}: {err}") from None


def encode(
    tokenizer: Any,
    texts: Sequence[str],
    pairs: Sequence[str | None] | None = None,
    labels: Sequence[int] | None = None,
    *,
    max_length: int = 128,
    token_types: bool = True,
) -> Encoded:
    """Tokenise with truncation to ``max_length`` tokens; pairs where given (all or none)."""
    has_pairs = pairs is not None and any(p is not None for p in pairs)
    if has_pairs:
        assert pairs is not None
        if any(p is None for p in pairs):
            raise LayerExitError("some examples have a text pair and some do not")
        out = tokenizer(list(texts), list(pairs), truncation=True, max_length=max_length)
    else:
        out = tokenizer(list(texts), truncation=True, max_length=max_length)
    types = out.get("token_type_ids") if token_types else None
    label_tensor = torch.tensor(list(labels) if labels is not None else [-1] * len(texts), dtype=torch.long)
    return Encoded(input_ids=out["input_ids"], token_type_ids=types, labels=label_tensor)


def encode_marking_truncation(
    tokenizer: Any,
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    *,
    max_length: int = 128,
    token_types: bool = True,
) -> tuple[Encoded, list[bool]]:
    """As :func:`encode`, and for each input whether it was longer than ``max_length`` tokens, so that the
    model sees less than the whole input. One tokenizer call in the common case; only the inputs that are
    too long are encoded again, with the tokenizer's own truncation (which keeps the special tokens and,
    for pairs, trims the longer text first), as :func:`encode` does."""

    def tokenize(rows: list[int], truncate: bool) -> Any:
        args = ([texts[i] for i in rows],) + (([pairs[i] for i in rows],) if pairs is not None else ())
        extra = {"truncation": True, "max_length": max_length} if truncate else {"truncation": False}
        return tokenizer(*args, return_token_type_ids=token_types, **extra)

    everything = list(range(len(texts)))
    whole = tokenize(everything, truncate=False)
    ids = [list(row) for row in whole["input_ids"]]
    types = [list(row) for row in whole["token_type_ids"]] if token_types else None
    truncated = [len(row) > max_length for row in ids]
    long = [i for i in everything if truncated[i]]
    if long:
        again = tokenize(long, truncate=True)
        for j, i in enumerate(long):
            ids[i] = list(again["input_ids"][j])
            if types is not None:
                types[i] = list(again["token_type_ids"][j])
    labels = torch.full((len(ids),), -1, dtype=torch.long)
    return Encoded(input_ids=ids, token_type_ids=types, labels=labels), truncated


def collate(encoded: Encoded, rows: Sequence[int], pad_id: int) -> dict[str, Tensor]:
    """Right-padded tensors for the given rows: input_ids, attention_mask, [token_type_ids], labels."""
    length = max(len(encoded.input_ids[r]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    types = torch.zeros(len(rows), length, dtype=torch.long) if encoded.token_type_ids is not None else None
    for i, r in enumerate(rows):
        seq = encoded.input_ids[r]
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        if types is not None and encoded.token_type_ids is not None:
            types[i, : len(seq)] = torch.tensor(encoded.token_type_ids[r])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": encoded.labels[list(rows)]}
    if types is not None:
        batch["token_type_ids"] = types
    return batch


def batches(
    encoded: Encoded,
    batch_size: int,
    pad_id: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    by_length: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """Batches in order, shuffled, or (for fast evaluation) grouped by length with an ``index`` key."""
    n = len(encoded)
    if shuffle:
        order = torch.randperm(n, generator=generator).tolist()
    elif by_length:
        order = sorted(range(n), key=lambda r: len(encoded.input_ids[r]))
    else:
        order = list(range(n))
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        batch = collate(encoded, rows, pad_id)
        batch["index"] = torch.tensor(rows, dtype=torch.long)
        yield batch


def encode_split(tokenizer: Any, examples: Sequence[Any], max_length: int, token_types: bool) -> Encoded:
    """Tokenise a split's examples (``text``, ``text_pair``, ``label``) as training and evaluation do."""
    return encode(
        tokenizer,
        [e.text for e in examples],
        [e.text_pair for e in examples] if any(e.text_pair is not None for e in examples) else None,
        [e.label for e in examples],
        max_length=max_length,
        token_types=token_types,
    )


def tokenizer_separator(tokenizer: Any) -> int | None:
    """The token that ends the first text of a pair, which ``pair`` pooling finds the second text by, if any."""
    sep = getattr(tokenizer, "sep_token_id", None)
    return sep if isinstance(sep, int) else None


def separator_id(tokenizer: Any) -> int:
    """:func:`tokenizer_separator`, or a clear error where the tokenizer has none."""
    sep = tokenizer_separator(tokenizer)
    if sep is None:
        raise LayerExitError(
            f"pair pooling needs a tokenizer with a separator token between the two texts; "
            f"{type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '?')}) has none: use --pooling mean"
        )
    return sep


def pairs_problem(trained_on_pairs: bool | None, given_pairs: bool, *, field: str = "pairs") -> str:
    """What is wrong with giving (or not giving) text pairs to a model, or ``""``: a model trained on pairs
    needs the second text of every input, one trained on single texts takes none."""
    if trained_on_pairs and not given_pairs:
        return f"this model was trained on text pairs; give the second text of each input ({field})"
    if trained_on_pairs is False and given_pairs:
        return f"this model was trained on single texts; it takes no second text ({field})"
    return ""
