"""Reading text files: decoding with clear errors, and delimited (CSV/TSV) records with their line numbers.

Shared by the user-file, built-in and benchmark readers. The parsing is the standard ``csv``
module's; what is decided here is only which of its two dialects a file is read with:

* quoted (``csv.QUOTE_MINIMAL``), as pandas ``to_csv``, R ``write.csv`` and spreadsheets write:
  a field that starts with ``"`` ends at the closing ``"`` and may hold delimiters, tabs and line
  breaks; ``""`` inside it is one quote character;
* unquoted (``csv.QUOTE_NONE``), as GLUE's TSVs are written: one record per line, and a ``"``
  anywhere is part of the text (SST-2 has ``it 's a "charming" and often affecting journey .``,
  and texts that open a quote they never close).

Benchmark layouts and built-in files have a known dialect (GLUE TSVs unquoted; AG News and the
tweets CSV quoted). A user's CSV or TSV is read by this rule (:data:`AUTO`):

1. Read it quoted, strictly (a quote that opens a field must close it, followed by the
   delimiter or the end of the line). If that reads to the end and every record has the
   header's number of fields, the file is quoted, and is read so. One exception, for TSV: if a
   quoted field spans lines while every physical line, read unquoted, already has the header's
   number of fields, the quote is a stray one that swallowed whole lines, and the file is read
   unquoted.
2. Otherwise, if reading it unquoted gives every line the header's number of fields, it is read
   unquoted: its quote characters are text (a text that opens a quote and never closes it, or
   ``"charming" and often`` at the start of a field).
3. Otherwise the file is malformed either way, and the error names the first record with the
   wrong number of fields, on the line where that record starts: in the quoted reading if its
   quoting is well formed (step 1 read to the end), else in the reading its extension has
   always had, CSV quoted (leniently, as before) and TSV unquoted.

Why: a writer that quotes (pandas, R, spreadsheets, Python's ``csv``) always writes well-formed
quoting, so its files pass step 1; GLUE's texts nearly always break strict quoting somewhere (a
quote that opens a text and closes mid-text or never), which sends the whole file to step 2. The
choice is made once per file, never per line, and a file without any ``"`` reads the same
either way. Where both readings are regular, quoting wins: a TSV whose texts are wholly enclosed
in quotes loses those quotes, as pandas would read it. The exception in step 1 is for TSV only:
in a CSV a quoted text holding a comma and a line break (``"a, b<LF>c"``) can read regularly
unquoted by coincidence, so there quoting must win; in a TSV every fragment of a quoted text
would need the header's number of tabs, while a GLUE text whose opening quote finds its
"closing" one lines later, right before a tab, is real.
"""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from layerexit.errors import LayerExitError


def read_text(path: Path, encoding: str) -> str:
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


QUOTED = "quoted"
"""Standard double-quote quoting (``csv.QUOTE_MINIMAL``): a field that starts with ``"`` runs to the
closing ``"`` and may hold delimiters and line breaks; ``""`` inside it is one quote."""
UNQUOTED = "unquoted"
"""No quoting (``csv.QUOTE_NONE``), one record per line, quote characters kept as text: GLUE's TSVs."""
AUTO = "auto"
"""Chosen per file by the rule in the module docstring: the user's own files."""


@dataclass
class _Reading:
    """The non-blank records of one reading of a file, with the line each starts on."""

    rows: list[tuple[int, list[str]]] = field(default_factory=list)
    multiline: bool = False
    """Whether some record spans more than one physical line (a quoted line break)."""
    error: tuple[int, csv.Error] | None = None
    """Where the reading stopped, and why."""

    def regular(self) -> bool:
        """Read to the end, and every record has as many fields as the first (the header)."""
        return self.error is None and all(len(record) == len(self.rows[0][1]) for _, record in self.rows)


def _read(text: str, delimiter: str, quoted: bool, strict: bool) -> _Reading:
    """Read ``text`` with the csv module, quoted or not; ``strict`` refuses malformed quoting."""
    reader = csv.reader(
        io.StringIO(text, newline=""),
        delimiter=delimiter,
        quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE,
        strict=strict,
    )
    reading = _Reading()
    start = 1
    with _large_csv_fields():
        try:
            for record in reader:
                if record and any(cell.strip() for cell in record):
                    reading.rows.append((start, record))
                    reading.multiline = reading.multiline or reader.line_num > start
                start = reader.line_num + 1
        except csv.Error as exc:
            reading.error = (start, exc)
    return reading


def _choose(text: str, delimiter: str) -> _Reading:
    """The reading of a user's file: quoted when its quoting is well formed, else unquoted (GLUE)."""
    if '"' not in text:  # both readings agree
        return _read(text, delimiter, quoted=False, strict=False)
    quoted = _read(text, delimiter, quoted=True, strict=True)
    plain = _read(text, delimiter, quoted=False, strict=False)
    if quoted.regular() and not (delimiter == "\t" and quoted.multiline and plain.regular()):
        return quoted
    if plain.regular():
        return plain
    if quoted.error is None:  # well-formed quoting, wrong field counts: report them as quoted
        return quoted
    return plain if delimiter == "\t" else _read(text, delimiter, quoted=True, strict=False)


def table_rows(path: Path, text: str, delimiter: str, quoting: str) -> list[tuple[int, list[str]]]:
    """Non-blank records of a delimited file with the 1-based line each starts on.

    ``quoting`` is :data:`QUOTED`, :data:`UNQUOTED` or :data:`AUTO` (see the module docstring).
    A record's line is the line it starts on, also when a quoted field spans several lines.
    """
    if quoting == AUTO:
        reading = _choose(text, delimiter)
    elif quoting in (QUOTED, UNQUOTED):
        reading = _read(text, delimiter, quoted=quoting == QUOTED, strict=False)
    else:
        raise ValueError(f"quoting must be {QUOTED!r}, {UNQUOTED!r} or {AUTO!r}, got {quoting!r}")
    if reading.error is not None:
        line, exc = reading.error
        raise LayerExitError(f"{path}, line {line}: unreadable {table_kind(delimiter)} record ({exc})")
    return reading.rows


def table_kind(delimiter: str) -> str:
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


def column_index(header: list[str], name: str, where: str, delimiter: str, option: str) -> int:
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
