"""ONNX Runtime at batch 1: the per-layer exit loop against the single-row graph (one call per input, the
strategy's decision inside it; :mod:`layerexit.runtime.onnx_fused`).

For each runtime, on the first ``--samples`` test inputs of RUN one at a time, it times the runtime's full
graph, the exit loop at full depth and early exit with the run's strategy, each with the single-row graph
off (``fuse=False``, one call per layer) and on, plus the PyTorch full model; passes interleaved, medians
over ``--repeats``, in one process on a quiet machine. Exits are checked to be identical both ways.

    .venv/bin/python benchmarks/onnx_single_row.py runs/demo --runtime onnx onnx-int8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--runtime", nargs="+", default=["onnx", "onnx-int8"])
    parser.add_argument("--strategy", help="default: the run's own (calibrated, else dev-selected)")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shared-pool", action="store_true", help="one ONNX Runtime thread pool for every session")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.shared_pool:
        from layerexit.runtime.onnx_runtime import share_thread_pool

        assert share_thread_pool(args.threads)

    from layerexit.evaluation.evaluate import load_run_split
    from layerexit.model import EarlyExitModel
    from layerexit.predictor import default_strategy
    from layerexit.run_folder import RunFolder
    from layerexit.runtime import load_runtime
    from layerexit.runtime.loop import early_exit
    from layerexit.runtime.torch_runtime import TorchRuntime
    from layerexit.strategies import Static, parse

    torch.set_num_threads(args.threads)
    run = RunFolder(args.run).require(config=True).require_finished()
    model = EarlyExitModel.from_pretrained(run.path)
    strategy = parse(args.strategy) if args.strategy else default_strategy(run)[0]
    loaded = load_run_split(run, "test", model, limit=args.samples)
    assert loaded is not None
    data = loaded[0]
    rows = []
    for i in range(len(data)):
        ids = torch.tensor([data.input_ids[i]])
        types = None if data.token_type_ids is None else torch.tensor([data.token_type_ids[i]])
        rows.append((ids, torch.ones_like(ids), types))
    torch_full = TorchRuntime(model)
    results: dict[str, Any] = {"run": args.run, "strategy": str(strategy), "samples": len(rows)}
    results["threads"], results["shared_pool"] = args.threads, args.shared_pool
    timings: dict[str, Callable[[Any], Any]] = {"torch full": lambda r: torch_full.full(*r)}
    runtimes = {name: load_runtime(run, name, threads=args.threads) for name in args.runtime}
    depth = Static(layer=model.num_layers)

    def fused(runtime: Any, on: bool, rule: Any) -> Callable[[Any], Any]:
        def call(r: Any) -> Any:
            runtime.fuse = on
            return early_exit(runtime, rule, *r)

        return call

    exits: dict[str, list[int]] = {}
    for name, runtime in runtimes.items():
        timings[f"{name} full"] = lambda r, runtime=runtime: runtime.full(*r)
        for on, label in ((False, "per-layer"), (True, "one call")):
            timings[f"{name} all layers, {label}"] = fused(runtime, on, depth)
            timings[f"{name} early exit, {label}"] = fused(runtime, on, strategy)
            exits[f"{name} {label}"] = [int(fused(runtime, on, strategy)(r).exit_layer) for r in rows]
        assert exits[f"{name} per-layer"] == exits[f"{name} one call"], f"{name}: exits differ"
        results[f"{name} layer saving"] = model.num_layers / statistics.mean(exits[f"{name} one call"])

    totals: dict[str, list[float]] = {key: [] for key in timings}
    for fn in timings.values():
        for r in rows[:10]:
            fn(r)
    for _ in range(args.repeats):
        for key, fn in timings.items():
            start = time.perf_counter()
            for r in rows:
                fn(r)
            totals[key].append((time.perf_counter() - start) * 1000 / len(rows))
    ms = {key: statistics.median(t) for key, t in totals.items()}
    results["ms"] = ms
    pools = "one shared thread pool" if args.shared_pool else "a thread pool per session"
    print(f"{args.run} · {strategy} · batch 1 · {len(rows)} inputs · {args.threads} threads, {pools} · ms per input")
    print(f"{'torch full':<40} {ms['torch full']:>7.3f}")
    for name in runtimes:
        saving = results[f"{name} layer saving"]
        print(f"{name} ({saving:.2f}x fewer layers)")
        full = ms[f"{name} full"]
        print(f"  {'full graph':<38} {full:>7.3f}")
        for label in ("per-layer", "one call"):
            early = ms[f"{name} early exit, {label}"]
            print(f"  {'all layers, ' + label:<38} {ms[f'{name} all layers, {label}']:>7.3f}")
            print(
                f"  {'early exit, ' + label:<38} {early:>7.3f}   {full / early:.2f}x vs its full graph "
                f"(ratio {full / early / saving:.2f}), {ms['torch full'] / early:.2f}x vs torch full"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
