"""Cutting long texts before tokenising (the server's bounded work per text) changes nothing the model
sees: on tokenizers of the three kinds in use (WordPiece, byte-level BPE, SentencePiece-style Unigram),
built in code, random texts give the same ids and the same ``truncated`` flags as tokenising them whole."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from layerexit.data.encoding import cut_pairs, cut_to_tokens, encode, encode_marking_truncation, word_cut

WORDS = [
    "the",
    "service",
    "was",
    "great",
    "but",
    "delay",
    "long",
    "nobody",
    "answered",
    "calls",
    "today",
    "again",
    "unbelievable",
    "antidisestablishmentarianism",
    "café",
    "naïve",
    "東京",
    "émigré",
    "don't",
    "it's",
    "3.14",
    "#tag",
    "@user",
    ":)",
    "...",
]


def _corpus(rng: random.Random, n: int = 400) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(n)]


def _tokenizer(kind: str) -> PreTrainedTokenizerFast:
    corpus = _corpus(random.Random(0))
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]"]
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=30))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    else:
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=specials, unk_token="[UNK]")
    tok.train_from_iterator(corpus, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]"
    )


def _text(rng: random.Random, scale: int = 10) -> str:
    """Mostly short texts; some long, some with runs of whitespace, one long word or none at all."""
    shape = rng.random()
    n = rng.choice([2, 10, 60, 30 * scale, 300 * scale]) if scale >= 10 else rng.choice([2, 10, 30 * scale])
    spaces = [" ", " ", " ", "  ", "\n", "\t ", " \u3000 "]
    if shape < 0.1:
        return "x" * rng.randint(1, 500 * scale) + " end"  # one long word
    if shape < 0.15:
        return "東京" * rng.randint(1, 300 * scale)  # no whitespace at all
    if shape < 0.25:
        return "word" + " " * rng.randint(1, 2000 * scale) + " ".join(WORDS)  # much whitespace, then words
    return "".join(rng.choice(WORDS) + rng.choice(spaces) for _ in range(n)).strip() or "x"


def _reference(tokenizer, texts, pairs, max_length):  # type: ignore[no-untyped-def]
    """The model's view without any cut: the whole text, truncated by the tokenizer."""
    args = (texts,) if pairs is None else (texts, pairs)
    whole = tokenizer(*args, truncation=False)["input_ids"]
    cut = tokenizer(*args, truncation=True, max_length=max_length, return_token_type_ids=True)
    return (
        [list(r) for r in cut["input_ids"]],
        [list(r) for r in cut["token_type_ids"]],
        [len(r) > max_length for r in whole],
    )


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "unigram"])
@pytest.mark.parametrize("max_length", [16, 31, 64])
def test_cutting_long_texts_changes_no_id_and_no_flag(kind: str, max_length: int) -> None:
    tokenizer = _tokenizer(kind)
    rng = random.Random(max_length)
    texts = [_text(rng) for _ in range(60)]
    # pairs of shorter texts: the reference truncation of two long texts costs the product of their lengths
    firsts, seconds = [_text(rng, scale=1) for _ in range(80)], [_text(rng, scale=1) for _ in range(80)]
    seen: list[bool] = []
    for first, second in ((texts, None), (firsts, seconds)):
        encoded, truncated = encode_marking_truncation(tokenizer, first, second, max_length=max_length)
        ids, types, flags = _reference(tokenizer, first, second, max_length)
        assert encoded.input_ids == ids
        assert encoded.token_type_ids == types
        assert truncated == flags
        seen.extend(flags)
        assert encode(tokenizer, first, second, max_length=max_length).input_ids == ids  # training's encode too
    assert sum(seen) >= 10 and not all(seen)  # both kinds of input were tried


class Recording:
    """A tokenizer that records the longest text it was given."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        for batch in args:
            self.longest = max([self.longest, *(len(t) for t in ([batch] if isinstance(batch, str) else batch))])
        return self.tokenizer(*args, **kwargs)


def test_a_long_text_is_never_tokenised_whole() -> None:
    tokenizer = Recording(_tokenizer("wordpiece"))
    words = " ".join(random.Random(1).choice(WORDS) for _ in range(300_000))  # about 2 MB
    encoded, truncated = encode_marking_truncation(tokenizer, [words, "short text"], max_length=64)
    assert truncated == [True, False] and len(encoded.input_ids[0]) == 64
    assert tokenizer.longest < 5_000
    cut, counts = cut_to_tokens(tokenizer, [words, "short text"], max_length=64)
    assert len(cut[0]) < 5_000 and counts[0] is not None and counts[0] > 64 and cut[1] == "short text"


def test_a_pair_of_long_texts_is_cut_to_short_prefixes() -> None:
    """Two long texts in a pair: tokenising them whole with truncation would list the product of their
    overflowing pieces; the cut pieces stay a few kilobytes, whichever text is longer."""
    tokenizer = _tokenizer("wordpiece")
    rng = random.Random(2)
    long_a = " ".join(rng.choice(WORDS) for _ in range(120_000))
    long_b = " ".join(rng.choice(WORDS) for _ in range(100_000))
    for a, b in ((long_a, long_b), (long_b, long_a), (long_a, "short"), ("short", long_b)):
        first, second = cut_pairs(tokenizer, [a], [b], max_length=31)
        assert len(first[0]) < 20_000 and len(second[0]) < 20_000
        na, nb = (len(tokenizer(x, add_special_tokens=False)["input_ids"]) for x in (a, b))
        ca, cb = (len(tokenizer(x, add_special_tokens=False)["input_ids"]) for x in (first[0], second[0]))
        assert (ca > cb) == (na > nb)  # the truncation's shares follow which text is longer


def test_word_cut_ends_before_whitespace_after_a_word() -> None:
    assert word_cut("one two  three", 9) == "one two"
    assert word_cut("one two", 50) == "one two"
    assert word_cut("x" * 40, 10) == "x" * 10  # no word boundary in the second half: inside the word
