"""One interactive, self-contained HTML page for an evaluated run or a comparison.

``layerexit report RUN`` writes ``RUN/report.html``: accuracy against speed-up of every strategy
setting on dev and test (hover for the setting), the per-layer scores and the oracle, where inputs
leave under each strategy, the calibrated choice, the ``bench`` table and any serving measurement,
and a per-input explorer. On a ``compare`` folder it draws every method's curves side by side.
The page embeds plotly's script and its data, so it opens offline. Needs the ``report`` extra
(``pip install 'layerexit[report]'``: plotly).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from layerexit.errors import LayerExitError
from layerexit.options import option

FILENAME = "report.html"


def build_report(
    path: str | Path, output: str | Path | None = None, *, split: str | None = None, texts: bool = True
) -> Path:
    """Write the page of the run or compare folder ``path``; returns the file written.

    ``output``: where (default ``<path>/report.html``); ``split``: the split the explorer shows
    (default the report split, test); ``texts``: reload the task to show the inputs' texts.
    """
    from layerexit.atomic import write_text
    from layerexit.report import sources

    _need_plotly()
    folder = Path(path)
    if folder.is_dir() and sources.is_compare(folder):
        from layerexit.report.page import compare_page

        html = compare_page(sources.load_compare(folder))
    else:
        from layerexit.report.page import run_page

        html = run_page(sources.load_run(folder, split, texts=texts))
    target = Path(output) if output else folder / FILENAME
    if target.parent and not target.parent.is_dir():
        raise LayerExitError(f"cannot write {target}: folder {target.parent} does not exist")
    write_text(target, html)
    return target


def _need_plotly() -> None:
    try:
        import plotly  # noqa: F401
    except ImportError:
        raise LayerExitError(
            "the report needs plotly: pip install 'layerexit[report]' (or pip install plotly)"
        ) from None


@dataclass
class ReportOptions:
    """``layerexit report``'s options."""

    path: str = option("", "an evaluated run folder, or a folder written by `layerexit compare`", positional=True)
    output: str = option("", "HTML file to write (default: PATH/report.html)")
    split: str = option("", "split whose inputs the explorer shows (default: the report split)")
    texts: bool = option(True, "reload the task for the inputs' texts (--no-texts: do not)")


def cmd_report(namespace: argparse.Namespace) -> int:
    from layerexit.config import from_namespace

    args = from_namespace(ReportOptions, namespace)
    path = build_report(args.path, args.output or None, split=args.split or None, texts=args.texts)
    size = path.stat().st_size / 1e6
    print(f"wrote {path} ({size:.1f} MB; open it in a browser, it needs no network)")
    return 0


def add_command(command: Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]) -> None:
    """Register ``layerexit report`` through the CLI's ``command(name, func, help)`` helper."""
    p = command(
        "report",
        cmd_report,
        "Write one self-contained HTML page for an evaluated run (trade-off curves, exit layers, calibration, "
        "bench, a per-input explorer) or a compare folder (every method's curves side by side)",
    )
    from layerexit.config import add_arguments

    add_arguments(p, ReportOptions)
