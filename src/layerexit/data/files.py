"""The data users bring: CSV, TSV and JSONL files with named columns (keys), and inputs to predict.

CSV and TSV files are read as pandas, R and spreadsheets write them: quoted fields (holding
delimiters, tabs, line breaks, doubled quotes) are read whole, a leading unnamed row-index
column (header cell empty or ``Unnamed: 0``) is ignored, and GLUE-style unquoted TSVs still read
one record per line; :mod:`.tables` gives the rule that tells the two apart. Fields are kept as
written (after stripping surrounding whitespace): nothing is unescaped, so ``&amp;`` stays
``&amp;``, and R's ``NA`` is the text ``NA``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerexit.data.tables import AUTO, column_index, read_text, table_rows
from layerexit.data.tasks import (
    UNLABELLED,
    RawSplit,
    TaskData,
    finish_task,
    index_labels,
    merge_skipped,
    raw_label,
    with_dev,
)
from layerexit.errors import LayerExitError


@dataclass(frozen=True)
class Columns:
    """Names of the text, text-pair and label columns (keys, for JSONL) of a user's file."""

    text: str
    pair: str | None
    label: str | None
    """None for inputs to predict, which have no label."""


_INDEX_HEADERS = ("", "Unnamed: 0")
"""Header cells of a leading row-index column: pandas ``to_csv`` writes an empty one (``Unnamed: 0``
once the file has been read back and written again without its index), R ``write.csv`` ``""``."""


def _has_index_column(header: list[str], cols: Columns) -> bool:
    """Whether the first column is an unnamed row index (not one of the columns asked for)."""
    first = header[0].strip()
    return len(header) > 1 and first in _INDEX_HEADERS and first not in (cols.text, cols.pair, cols.label)


def _read_table_file(path: Path, text: str, delimiter: str, cols: Columns) -> RawSplit:
    rows = table_rows(path, text, delimiter, AUTO)
    raw = RawSplit(str(path), "line")
    if not rows:
        raise LayerExitError(f"{path}: the file is empty")
    header_line, header = rows[0]
    if _has_index_column(header, cols):  # ignored: a row with nothing but its index is a blank row
        rows = rows[:1] + [
            (line, record)
            for line, record in rows[1:]
            if len(record) != len(header) or any(cell.strip() for cell in record[1:])
        ]
    where = f"{path}, line {header_line}"
    t = column_index(header, cols.text, where, delimiter, "text_column")
    p = None if cols.pair is None else column_index(header, cols.pair, where, delimiter, "text_pair_column")
    y = None if cols.label is None else column_index(header, cols.label, where, delimiter, "label_column")
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
        label = "" if y is None else raw_label(record[y], f"{path}, line {line}")
        raw.add(line, record[t], None if p is None else record[p], label, p is not None)
    return raw


def _read_jsonl_file(path: Path, text: str, cols: Columns) -> RawSplit:
    raw = RawSplit(str(path), "line")
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
        label = "" if cols.label is None else raw_label(record[cols.label], f"{path}, line {line}")
        raw.add(
            line,
            record[cols.text],
            None if cols.pair is None else record[cols.pair],
            label,
            cols.pair is not None,
        )
    return raw


def _read_lines_file(path: Path, text: str) -> RawSplit:
    """A plain text file: one unlabelled text per line (blank lines are skipped, not counted); it has no
    columns, so a label column named for other files does not apply to it."""
    raw = RawSplit(str(path), "line")
    for line, content in enumerate(text.split("\n"), start=1):
        if content.strip():
            raw.add(line, content.strip(), None, "", False)
    return raw


SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": "", ".txt": ""}


def read_user_file(path: Path, cols: Columns, encoding: str) -> RawSplit:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise LayerExitError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv, .jsonl or .txt")
    if suffix == ".txt" and cols.pair is not None:
        raise LayerExitError(f"{path}: a .txt file holds one text per line, without pairs; use a CSV/TSV/JSONL file")
    text = read_text(path, encoding)
    if suffix == ".txt":
        raw = _read_lines_file(path, text)
    elif suffix == ".jsonl":
        raw = _read_jsonl_file(path, text, cols)
    else:
        raw = _read_table_file(path, text, SUFFIXES[suffix], cols)
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
    raw = read_user_file(path, Columns(text_column, text_pair_column, None), encoding)
    texts = [text for _, text, _, _ in raw.rows]
    pairs = [pair or "" for _, _, pair, _ in raw.rows] if text_pair_column else None
    return texts, pairs, dict(raw.skipped)


def user_task(
    name: str,
    raw: dict[str, RawSplit],
    sources: dict[str, str],
    extra: dict[str, Any],
    max_train: int | None,
    max_eval: int | None,
    seed: int,
) -> TaskData:
    labelled = any(label for part in raw.values() for *_, label in part.rows)
    label_names, splits = index_labels(raw, None if labelled else [""])
    label_names = label_names if labelled else [UNLABELLED]
    splits, rule = with_dev(splits, name, sources["train"])
    info = {
        "source": sources,
        "split_rule": rule,
        **extra,
        "labels": "label names are the distinct training labels, sorted (numerically if all are integers)"
        if labelled
        else "none: the texts are unlabelled",
        "labelled": labelled,
        "skipped": merge_skipped(raw),
    }
    return finish_task(name, label_names, "accuracy", splits, info, max_train, max_eval, seed)
