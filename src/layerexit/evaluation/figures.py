"""Matplotlib, headless, and figures written atomically: the one place PNGs of a run are saved from."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Write a PNG atomically (temporary file, then rename) and free the figure."""
    from layerexit.atomic import replacing

    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        pyplot().close(fig)
