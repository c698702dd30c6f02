"""Where one exported layer graph spends its time, by operator type: ONNX Runtime's own profiler on one
layer+exit graph of each named export, at batch 1 on inputs of ``--tokens`` tokens.

    .venv/bin/python benchmarks/onnx_op_profile.py runs/demo --runtime onnx onnx-int8 onnx-int8-token \\
        --layer 2 --json studies/runtime/onnx-op-profile-demo.json

Kernel microseconds per run, summed by operator type over ``--runs`` runs, 2 threads
(``--threads``); run it on a quiet machine. Kernel times leave out ONNX Runtime's own work between
operators, so a graph's total here is below its wall-clock time.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
from benchtools import write_results

from layerexit.run_folder import RunFolder


def profile(path: Path, tokens: int, runs: int, threads: int) -> dict[str, object]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed: dict[str, np.ndarray] = {}
        for graph_input in session.get_inputs():
            if graph_input.name == "hidden":
                width = int(graph_input.shape[-1])
                feed["hidden"] = np.random.default_rng(0).normal(size=(1, tokens, width)).astype(np.float32)
            else:  # the padding mask, or which tokens are the second text: none here
                feed[graph_input.name] = np.ones((1, tokens), np.int64) * (graph_input.name == "attention_mask")
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    total: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            total[event["args"]["op_name"]] += event["dur"]
            count[event["args"]["op_name"]] += 1
    return {
        "kernel_us_per_run": sum(total.values()) / runs,
        "operators_per_run": sum(count.values()) // runs,
        "by_operator": {op: {"us": t / runs, "count": count[op] // runs} for op, t in total.most_common()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--runtime", nargs="+", default=["onnx", "onnx-int8", "onnx-int8-token"])
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    run = RunFolder(args.run)
    results: dict[str, object] = {"run": args.run, "layer": args.layer, "tokens": args.tokens, "runtimes": {}}
    for name in args.runtime:
        found = profile(run.export_dir(name) / f"layer_{args.layer}.onnx", args.tokens, args.runs, args.threads)
        results["runtimes"][name] = found  # type: ignore[index]
        print(f"{name}: {found['kernel_us_per_run']:.0f} us in {found['operators_per_run']} operators per run")
        for op, row in list(found["by_operator"].items())[:10]:  # type: ignore[union-attr]
            print(f"  {op:28s} {row['us']:7.1f} us  x{row['count']}")
    write_results(args.json or None, results)


if __name__ == "__main__":
    main()
