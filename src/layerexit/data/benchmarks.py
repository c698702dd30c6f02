"""Benchmark folders in their standard layouts: GLUE (SST-2, MRPC, CoLA, RTE, QQP, QNLI, MNLI), SST-5,
AG News and TREC.

Each layout fixes the file names, the columns and the label values, so these folders need no
column options. GLUE TSVs are read unquoted, one record per line (their texts hold stray quote
characters), as the GLUE baselines read them; AG News CSVs are quoted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from layerexit.data.builtin import SNLI_LABELS
from layerexit.data.tables import QUOTED, UNQUOTED, column_index, read_text, table_kind, table_rows
from layerexit.data.tasks import RawSplit, raw_label
from layerexit.errors import LayerExitError


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


LAYOUTS: dict[str, list[_Layout]] = {
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
            tuple(SNLI_LABELS),
            tuple(SNLI_LABELS),
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


GLUE_KEYS = ("sst2", "mrpc", "cola", "rte", "qqp", "qnli", "mnli")


def format_key(name: str) -> str | None:
    """The layout key for a benchmark name such as ``SST-2``, ``ag_news_csv`` or ``sst5``; None if unknown."""
    key = re.sub(r"[-_ .]", "", name.lower())
    key = _FORMAT_ALIASES.get(key, key)
    return key if key in LAYOUTS else None


def _cell(record: list[str], spec: str | int | tuple[int, ...], header_index: Mapping[str, int]) -> str:
    if isinstance(spec, tuple):
        return " ".join(record[i].strip() for i in spec)
    return record[header_index[spec] if isinstance(spec, str) else spec]


def _read_layout_table(path: Path, text: str, layout: _Layout, raw: RawSplit) -> None:
    delimiter = "\t" if layout.reader == "tsv" else ","
    rows = table_rows(path, text, delimiter, UNQUOTED if layout.reader == "tsv" else QUOTED)
    if not rows:
        raise LayerExitError(f"{path}: the file is empty")
    header_index: dict[str, int] = {}
    if layout.header:
        header_line, header = rows[0]
        for spec, option in ((layout.text, "text"), (layout.pair, "text pair"), (layout.label, "label")):
            if isinstance(spec, str):
                header_index[spec] = column_index(
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
                f"{table_kind(delimiter)} fields for {layout.name}, found {len(record)}"
            )
        label = raw_label(_cell(record, layout.label, header_index), raw.where(line))
        pair = None if layout.pair is None else _cell(record, layout.pair, header_index)
        raw.add(line, _cell(record, layout.text, header_index), pair, label, layout.pair is not None)


_PTB_LEAF = re.compile(r"\(\S+ ([^()\s]+)\)")


_PTB_BRACKETS = {"-LRB-": "(", "-RRB-": ")"}


def _read_layout_lines(path: Path, text: str, layout: _Layout, raw: RawSplit) -> None:
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


def load_layout(
    folder: Path, layout: _Layout, encoding: str | None, shown: str
) -> tuple[dict[str, RawSplit], dict[str, str]]:
    """The splits of ``folder`` read as ``layout``, and their sources: file names under ``shown``, the
    folder as the user wrote it."""
    raw: dict[str, RawSplit] = {}
    sources: dict[str, str] = {}
    for split, filename in layout.files.items():
        path = folder / filename
        if not path.is_file():
            if split in layout.optional:
                continue
            raise LayerExitError(
                f"{folder}: no {filename} (expected for {layout.name}: {', '.join(layout.files.values())})"
            )
        text = read_text(path, encoding or layout.encoding)
        part = RawSplit(str(path), "line")
        if layout.reader in ("tsv", "csv"):
            _read_layout_table(path, text, layout, part)
        else:
            _read_layout_lines(path, text, layout, part)
        if not part.rows:
            raise LayerExitError(f"{path}: no usable rows")
        raw[split] = part
        sources[split] = os.path.join(shown, filename)
    return raw, sources


def pick_layout(folder: Path, key: str) -> _Layout | None:
    """The layout of benchmark ``key`` whose train file is in ``folder``."""
    for layout in LAYOUTS[key]:
        if (folder / layout.files["train"]).is_file():
            return layout
    return None
