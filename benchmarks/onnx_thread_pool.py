"""ONNX Runtime: one thread pool per layer session (the default) against one pool shared by every session.

ONNX Runtime fixes its thread pools when a process creates its first session, so each setting runs in a
process of its own, one after the other (run it on a quiet machine). Each process times, on the first
``--samples`` test inputs of RUN, the full graph, the exit loop at full depth and early exit with the
run's strategy, at each batch size (passes interleaved, medians over ``--repeats``).

    .venv/bin/python benchmarks/onnx_thread_pool.py runs/full/tweets-binary-minilm-retrofit-seed1 \\
        --runtime onnx-int8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

MODES = ("per-session", "shared")


def measure(
    run_path: str, runtime_name: str, mode: str, samples: int, sizes: list[int], repeats: int
) -> dict[str, Any]:
    import torch

    from layerexit.evaluation.bench import BenchInputs, _time_pass
    from layerexit.evaluation.evaluate import load_run_split
    from layerexit.model import EarlyExitModel
    from layerexit.predictor import default_strategy
    from layerexit.run_folder import RunFolder
    from layerexit.runtime import load_runtime
    from layerexit.runtime.loop import early_exit
    from layerexit.runtime.onnx_runtime import share_thread_pool
    from layerexit.strategies import Static

    if mode == "shared":
        assert share_thread_pool(2)
    torch.set_num_threads(2)
    run = RunFolder(run_path).require(config=True).require_finished()
    model = EarlyExitModel.from_pretrained(run.path)
    strategy = default_strategy(run)[0]
    loaded = load_run_split(run, "test", model, limit=samples)
    assert loaded is not None
    inputs = BenchInputs(*loaded)
    runtime = load_runtime(run, runtime_name, threads=2)
    depth = Static(layer=runtime.num_layers)

    def tokens(b: dict[str, Any]) -> tuple[Any, Any, Any]:
        return b["input_ids"], b["attention_mask"], b.get("token_type_ids")

    rows = {
        "full": lambda b: runtime.full(*tokens(b)),
        "all_layers": lambda b: early_exit(runtime, depth, *tokens(b)),
        "early_exit": lambda b: early_exit(runtime, strategy, *tokens(b)),
    }
    out: dict[str, Any] = {}
    for size in sizes:
        batches = inputs.batches(size)
        for fn in rows.values():
            for b in batches[:5]:
                fn(b)
        totals: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(repeats):
            for name, fn in rows.items():
                totals[name].append(sum(_time_pass(fn, batches)))
        out[str(size)] = {name: statistics.median(t) * 1000 / len(inputs.encoded) for name, t in totals.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--runtime", default="onnx", help="onnx, onnx-int8 or onnx-int8-static (exported)")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    if args.mode:
        figures = measure(args.run, args.runtime, args.mode, args.samples, args.batch_sizes, args.repeats)
        print(json.dumps(figures))
        return
    results: dict[str, Any] = {"run": args.run, "runtime": args.runtime, "samples": args.samples, "threads": 2}
    for mode in MODES:
        command = [sys.executable, __file__, args.run, "--runtime", args.runtime, "--samples", str(args.samples)]
        command += ["--repeats", str(args.repeats), "--mode", mode, "--batch-sizes", *map(str, args.batch_sizes)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{args.run} · {args.runtime} · ms per input, 2 threads")
    print(f"{'batch':>5}  {'pools':<12} {'full':>7} {'all layers':>11} {'early exit':>11}")
    for size in map(str, args.batch_sizes):
        for mode in MODES:
            row = results[mode][size]
            print(f"{size:>5}  {mode:<12} {row['full']:>7.3f} {row['all_layers']:>11.3f} {row['early_exit']:>11.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
