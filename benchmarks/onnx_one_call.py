"""ONNX Runtime: the per-layer exit loop against the one-call graph (the whole early exit in one call per
batch, the strategy's decision inside it; :mod:`layerexit.runtime.onnx_fused`).

For each runtime and batch size, on the first ``--samples`` test inputs of RUN in consecutive batches,
it times the runtime's full graph, early exit's path run to full depth and early exit with the run's
strategy, each with the one-call graph off (``fuse=False``, one call per layer) and on, plus the PyTorch
full model; passes interleaved, medians over ``--repeats``, in one process on a quiet machine. Exits are
checked to be identical both ways.

    .venv/bin/python benchmarks/onnx_one_call.py runs/demo --runtime onnx onnx-int8 --batch-sizes 1 8 32
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
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shared-pool", action="store_true", help="one ONNX Runtime thread pool for every session")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.shared_pool:
        from layerexit.runtime.onnx_runtime import share_thread_pool

        assert share_thread_pool(args.threads)

    from layerexit.evaluation.bench import BenchInputs
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
    strategy = run.bind(parse(args.strategy)) if args.strategy else default_strategy(run)[0]  # weights attached
    loaded = load_run_split(run, "test", model, limit=args.samples)
    assert loaded is not None
    inputs = BenchInputs(*loaded)
    torch_full = TorchRuntime(model)
    runtimes = {name: load_runtime(run, name, threads=args.threads) for name in args.runtime}
    depth = Static(layer=model.num_layers)
    pools = "one shared thread pool" if args.shared_pool else "a thread pool per session"
    print(f"{args.run} · {strategy} · {len(inputs.encoded)} inputs · {args.threads} threads, {pools} · ms per input")
    results: dict[str, Any] = {"run": args.run, "strategy": str(strategy), "samples": len(inputs.encoded)}
    results["threads"], results["shared_pool"] = args.threads, args.shared_pool

    def tokens(b: dict[str, Any]) -> tuple[Any, Any, Any]:
        return b["input_ids"], b["attention_mask"], b.get("token_type_ids")

    def path(runtime: Any, on: bool, rule: Any) -> Callable[[Any], Any]:
        def call(b: Any) -> Any:
            runtime.fuse = on
            return early_exit(runtime, rule, *tokens(b))

        return call

    for size in args.batch_sizes:
        batches = inputs.batches(size)
        timings: dict[str, Callable[[Any], Any]] = {"torch full": lambda b: torch_full.full(*tokens(b))}
        figures: dict[str, Any] = {}
        for name, runtime in runtimes.items():
            timings[f"{name} full"] = lambda b, runtime=runtime: runtime.full(*tokens(b))
            exits = {}
            for on, label in ((False, "per-layer"), (True, "one call")):
                timings[f"{name} all layers, {label}"] = path(runtime, on, depth)
                timings[f"{name} early exit, {label}"] = path(runtime, on, strategy)
                exits[label] = torch.cat([path(runtime, on, strategy)(b).exit_layer for b in batches])
            assert torch.equal(exits["per-layer"], exits["one call"]), f"{name}: exits differ"
            figures[f"{name} layer saving"] = model.num_layers / float(exits["one call"].float().mean())
        totals: dict[str, list[float]] = {key: [] for key in timings}
        for fn in timings.values():
            for b in batches[:3]:
                fn(b)
        for _ in range(args.repeats):
            for key, fn in timings.items():
                start = time.perf_counter()
                for b in batches:
                    fn(b)
                totals[key].append((time.perf_counter() - start) * 1000 / len(inputs.encoded))
        ms = {key: statistics.median(t) for key, t in totals.items()}
        figures["ms"] = ms
        results[str(size)] = figures
        print(f"batch {size}")
        print(f"  {'torch full':<38} {ms['torch full']:>7.3f}")
        for name in runtimes:
            saving = figures[f"{name} layer saving"]
            full = ms[f"{name} full"]
            print(f"  {name} ({saving:.2f}x fewer layers)")
            print(f"    {'full graph':<36} {full:>7.3f}")
            for label in ("per-layer", "one call"):
                early = ms[f"{name} early exit, {label}"]
                print(f"    {'all layers, ' + label:<36} {ms[f'{name} all layers, {label}']:>7.3f}")
                print(
                    f"    {'early exit, ' + label:<36} {early:>7.3f}   {full / early:.2f}x vs its full graph "
                    f"(ratio {full / early / saving:.2f}), {ms['torch full'] / early:.2f}x vs torch full"
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
