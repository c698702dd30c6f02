"""What one exit decision costs: each strategy's ``step`` timed alone, per layer, on a run's stored test probabilities.

Early exit pays a decision after every layer it runs; on a fast runtime that cost is part of what keeps the clock
from showing the whole layer saving. The learned rule (``agreement``) computes a dozen statistics per decision,
entropy one. Settings are bound to the run (a learned rule's weights attached) as every command binds them.

    python benchmarks/strategy_step_cost.py runs/demo "entropy(threshold=0.38)" \\
        "agreement(threshold=0.960284, rule=1ed56e542526)" --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from layerexit import strategies
from layerexit.run_folder import RunFolder


def step_cost(strategy: strategies.Strategy, probs: torch.Tensor, repeats: int) -> float:
    """Median microseconds per layer of ``strategy.step`` over every layer of probabilities (L, N, C)."""
    num_layers, rows, classes = probs.shape
    times = []
    for _ in range(repeats):
        state = strategy.init(rows, classes)
        started = time.perf_counter()
        for layer in range(1, num_layers + 1):
            strategy.step(state, layer, probs[layer - 1])
        times.append((time.perf_counter() - started) / num_layers * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("strategies", nargs="+", help="settings, e.g. 'entropy(threshold=0.38)'")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = RunFolder(args.run)
    probs = run.read_probs("test")[0].float()
    rows = []
    for text in args.strategies:
        strategy = run.bind(strategies.parse(text))
        for batch in args.batch_sizes:
            us = step_cost(strategy, probs[:, :batch], args.repeats)
            rows.append({"strategy": text, "batch": batch, "us_per_layer": round(us, 1)})
            print(f"{text:55s} batch {batch:3d}: {us:7.1f} us per layer")
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "threads": args.threads, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
