"""What several benchmarks of this folder share: a median timer and the results file. Imported by them as a
sibling module (they run as scripts), so it imports nothing heavier than the standard library."""

from __future__ import annotations

import argparse
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


def exit_loop_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of the benchmarks that time the exit loop over a run's test inputs in fixed batches:
    the run, the runtimes, the strategy, batch sizes, inputs, passes, threads and the results file."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("run")
    parser.add_argument("--runtime", nargs="+", default=["torch"])
    parser.add_argument("--strategy", default="entropy(threshold=0.14)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="")
    return parser


def exit_loop_inputs(args: argparse.Namespace) -> tuple[Any, Any, int, Any, dict[str, Any]]:
    """For :func:`exit_loop_parser`'s arguments: ``(run folder, test inputs, pad id, strategy, results
    header)``, with torch's threads set. The project is imported here, so this module stays light."""
    import torch

    from layerexit.evaluation.evaluate import load_run_split
    from layerexit.model import EarlyExitModel
    from layerexit.run_folder import RunFolder
    from layerexit.strategies import parse

    torch.set_num_threads(args.threads)
    run = RunFolder(args.run).require()
    model = EarlyExitModel.from_pretrained(run.path).eval()
    data, pad_id = load_run_split(run, "test", model, limit=args.samples)  # type: ignore[misc]
    header = {"run": args.run, "strategy": args.strategy, "samples": len(data), "threads": args.threads}
    return run, data, pad_id, parse(args.strategy), header
