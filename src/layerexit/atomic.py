"""Run-folder I/O: crash-safe writes (a file is its old whole self or its new whole self, never half of
either) and the one reader of JSON objects with a clear error.

Every writer goes through :func:`replacing`: the content goes to ``<name>.tmp`` next to the target,
is flushed to disk (fsync), and only then renamed over the target (``os.replace`` is atomic on one
filesystem). A failure on the way (disk full, permissions, a kill) leaves the target untouched; the
temporary file is removed when Python is still alive to do it, and ignored otherwise.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any


def fsync_path(path: Path) -> None:
    """Flush a file's (or, where the platform allows, a folder's) content to the disk."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if path.is_dir():  # folders cannot be opened on some platforms; their entries are then not synced
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _named(err: OSError, path: Path) -> OSError:
    """The same error, naming the file the user asked for rather than its temporary twin."""
    if err.errno is None:
        return err
    return OSError(err.errno, err.strerror or str(err), str(path))


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed.

    An ``OSError`` on the way is re-raised naming ``path`` (``error: <path>: No space left on device``).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with suppress(OSError):
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _named(err, path) from err
        raise


def save_safetensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, with its I/O failures raised as the ``OSError`` they are."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as err:  # SafetensorError("... I/O error: No space left on device (os error 28) ...")
        match = re.search(r"os error (\d+)", str(err))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(path)) from err


def write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV file (the standard module's dialect: quoted where needed, UTF-8), written atomically."""
    with replacing(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def read_json_object(path: Path, what: str, *, advice: str = "") -> dict[str, Any]:
    """The JSON object stored at ``path``, or a :class:`LayerExitError` that names the file and what it
    should have been (``what``: "a run configuration", "an evaluation report", ...); ``advice`` is
    appended to the message (e.g. "; rerun `layerexit evaluate`")."""
    from layerexit.errors import LayerExitError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LayerExitError(f"{path}: cannot read {what}: the file is missing{advice}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LayerExitError(f"{path}: cannot read {what} ({err}){advice}") from None
    except json.JSONDecodeError as err:
        raise LayerExitError(f"{path}: not valid JSON ({err}); cannot read {what}{advice}") from None
    if not isinstance(data, dict):
        raise LayerExitError(
            f"{path}: expected a JSON object ({what}); not a JSON object but a {type(data).__name__}{advice}"
        )
    return data
