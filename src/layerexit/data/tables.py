"""Reading text files: decoding with clear errors, and delimited (CSV/TSV) records with their line numbers.

Shared by the user-file, built-in and benchmark readers.
"""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Iterator
from pathlib import Path

from layerexit.errors import LayerExitError


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
