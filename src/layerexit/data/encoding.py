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
    """Tokenise with truncation to ``max_length`` tokens; pairs where given (all or none). Long texts are
    cut between words first (:func:`cut_to_tokens`): the ids are the same, the time is bounded."""
    has_pairs = pairs is not None and any(p is not None for p in pairs)
    if has_pairs:
        assert pairs is not None
        if any(p is None for p in pairs):
            raise LayerExitError("some examples have a text pair and some do not")
        first, second = cut_pairs(tokenizer, texts, [p for p in pairs if p is not None], max_length)
        out = tokenizer(first, second, truncation=True, max_length=max_length)
    else:
        out = tokenizer(cut_to_tokens(tokenizer, texts, max_length)[0], truncation=True, max_length=max_length)
    types = out.get("token_type_ids") if token_types else None
    label_tensor = torch.tensor(list(labels) if labels is not None else [-1] * len(texts), dtype=torch.long)
    return Encoded(input_ids=out["input_ids"], token_type_ids=types, labels=label_tensor)


CHARS_PER_TOKEN = 8
"""The first guess at how many characters ``max_length`` tokens can need (:func:`cut_to_tokens`)."""
CUT_SLACK = 8
"""Tokens a prefix must have beyond ``max_length`` before its cut is trusted: only the last few tokens
before a cut can differ from the whole text's."""


def word_cut(text: str, limit: int) -> str:
    """``text`` ended before the last whitespace that follows a non-space character at or before ``limit``
    characters, or at ``limit`` itself when its second half has no such place (one long word, or a script
    written without spaces); the whole text when it is no longer than ``limit``."""
    if len(text) <= limit:
        return text
    for i in range(limit, limit // 2, -1):
        if text[i].isspace() and not text[i - 1].isspace():
            return text[:i]
    return text[:limit]


def cut_to_tokens(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[list[str], list[int | None]]:
    """Each text cut, between words, to a prefix that still has more than ``max_length`` tokens (plus
    :data:`CUT_SLACK`), or left whole; with the prefix's token count (``None`` for a text left whole).
    The tokens a model truncated to ``max_length`` sees are then the same as the whole text's, and
    tokenising costs at most a bounded time whatever the text's length. The tokenizer splits words at
    whitespace first and tokenises each word on its own (WordPiece, byte-level BPE and SentencePiece's
    Metaspace all do), so a prefix that ends at a word boundary tokenises to a prefix of the whole text's
    tokens. A word longer than the prefix (a script written without spaces) is cut inside; only the
    tokens next to the cut can change, and :data:`CUT_SLACK` keeps them out of what the model sees
    (``tests/test_text_cut.py`` checks all of this on the three kinds of tokenizer). A prefix with too few
    tokens (long words, much whitespace) grows fourfold until it has enough or is the whole text."""
    out: list[str] = list(texts)
    counts: list[int | None] = [None] * len(out)
    limit = CHARS_PER_TOKEN * (max_length + CUT_SLACK)
    todo = list(range(len(out)))
    while todo:
        cuts = {i: word_cut(texts[i], limit) for i in todo}
        cut = [i for i in todo if len(cuts[i]) < len(texts[i])]
        if not cut:
            break
        found = tokenizer([cuts[i] for i in cut], add_special_tokens=False, truncation=False)["input_ids"]
        todo = []
        for i, ids in zip(cut, found, strict=True):
            if len(ids) > max_length + CUT_SLACK:
                out[i], counts[i] = cuts[i], len(ids)
            else:
                todo.append(i)
        limit *= 4
    return out, counts


def cut_pairs(
    tokenizer: Any, texts: Sequence[str], pairs: Sequence[str], max_length: int
) -> tuple[list[str], list[str]]:
    """:func:`cut_to_tokens` for text pairs. Truncating a pair keeps a share of each text that depends on
    which of the two is longer in tokens, so a pair with a long text is cut only after that is known
    (:func:`_pair_cut`); the tokens the model sees stay the whole texts'. Cutting also keeps the
    tokenizer from listing the overflowing pieces of two long texts, whose number grows with the product
    of their lengths."""
    first, first_counts = cut_to_tokens(tokenizer, texts, max_length)
    second, second_counts = cut_to_tokens(tokenizer, pairs, max_length)
    for i in range(len(first)):
        if first_counts[i] is not None or second_counts[i] is not None:
            first[i], second[i] = _pair_cut(tokenizer, texts[i], pairs[i], max_length)
    return first, second


def _pair_cut(tokenizer: Any, first: str, second: str, max_length: int) -> tuple[str, str]:
    """Prefixes of a pair's texts that truncate to what the whole pair does: each has more than
    ``max_length`` (plus :data:`CUT_SLACK`) tokens or is whole, and the first is longer than the second
    exactly when it is so whole. Which is longer is found by growing the shorter prefix until one text is
    whole or the other prefix passes it: the cost follows the shorter text, not the longer."""

    def prefix(text: str, limit: int) -> tuple[str, int, bool]:
        piece = word_cut(text, limit)
        count = len(tokenizer(piece, add_special_tokens=False, truncation=False)["input_ids"])
        return piece, count, len(piece) == len(text)

    start = CHARS_PER_TOKEN * (max_length + CUT_SLACK)
    limits = [start, start]
    a, b = prefix(first, start), prefix(second, start)
    while True:  # is the first text longer than the second, in tokens?
        (_, na, whole_a), (_, nb, whole_b) = a, b
        if (whole_a and whole_b) or (whole_a and nb >= na) or (whole_b and na > nb):
            first_longer = na > nb
            break
        if not whole_a and (whole_b or na <= nb):
            limits[0] *= 4
            a = prefix(first, limits[0])
        else:
            limits[1] *= 4
            b = prefix(second, limits[1])
    need = max_length + CUT_SLACK
    limits = [start, start]
    a, b = prefix(first, start), prefix(second, start)
    while not a[2] and a[1] <= need:
        limits[0] *= 4
        a = prefix(first, limits[0])
    while not b[2] and b[1] <= need:
        limits[1] *= 4
        b = prefix(second, limits[1])
    while (a[1] > b[1]) != first_longer:  # grow the one that must be longer (it ends whole at the latest)
        if first_longer:
            limits[0] *= 4
            a = prefix(first, limits[0])
        else:
            limits[1] *= 4
            b = prefix(second, limits[1])
    return a[0], b[0]


def encode_marking_truncation(
    tokenizer: Any,
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    *,
    max_length: int = 128,
    token_types: bool = True,
) -> tuple[Encoded, list[bool]]:
    """As :func:`encode`, and for each input whether it was longer than ``max_length`` tokens, so that the
    model sees less than the whole input. Long texts are first cut between words to what ``max_length``
    tokens can need (:func:`cut_to_tokens`), so a text of megabytes costs what one of a few kilobytes
    does. One tokenizer call in the common case; only the inputs that are too long are encoded again,
    with the tokenizer's own truncation (which keeps the special tokens and, for pairs, trims the longer
    text first), as :func:`encode` does."""
    if pairs is None:
        texts = cut_to_tokens(tokenizer, texts, max_length)[0]
    else:
        texts, pairs = cut_pairs(tokenizer, texts, pairs, max_length)

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


TokenRow = Sequence[int] | Tensor


def pad_right(
    id_rows: Sequence[TokenRow], type_rows: Sequence[TokenRow] | None, pad_id: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Right-padded ``input_ids``, ``attention_mask`` and (where ``type_rows`` are given) ``token_type_ids`` of
    token rows of any lengths: the one padding of training, evaluation, prediction and the serving engine."""
    lengths = [len(row) for row in id_rows]
    width = max(lengths)
    ids = torch.full((len(id_rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(id_rows), width, dtype=torch.long)
    types = None if type_rows is None else torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.as_tensor(id_rows[i])
        mask[i, :n] = 1
        if types is not None and type_rows is not None:
            types[i, :n] = torch.as_tensor(type_rows[i])
    return ids, mask, types


def collate(encoded: Encoded, rows: Sequence[int], pad_id: int) -> dict[str, Tensor]:
    """Right-padded tensors for the given rows: input_ids, attention_mask, [token_type_ids], labels."""
    type_rows = None if encoded.token_type_ids is None else [encoded.token_type_ids[r] for r in rows]
    ids, mask, types = pad_right([encoded.input_ids[r] for r in rows], type_rows, pad_id)
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
