"""What several benchmarks of this folder share: a median timer and the results file. Imported by them as a
sibling module (they run as scripts), so it imports nothing heavier than the standard library."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def timed(fn: Callable[[], None], per: int, repeats: int = 3) -> float:
    """Median milliseconds per item of ``fn``, which handles ``per`` items: one warm-up call (graphs built,
    shapes compiled), then ``repeats`` timed calls."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) / per * 1000, 3)


def write_results(path: str | Path | None, results: dict[str, Any]) -> None:
    """The results as indented JSON at ``path`` (nothing when None), and a line saying so."""
    if path:
        Path(path).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {path}")
