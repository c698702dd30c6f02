"""Where ONNX Runtime's one-call early exit loses against the layer saving at batch 1.

Times, on the same test inputs one at a time (2 threads, median of 5 passes, ms per input): the full
graph; the one-call graph with a strategy under which no input leaves before the last layer
(`entropy(threshold=0)`: every layer, every exit and every decision runs), whose excess over the full
graph is what the exits and branches cost over all layers; and the one-call graph with the strategy
given. Then ONNX Runtime's own profile of the never-leaving graph, kernel time per input by operator
type (profiling slows every operator down; read the shares, not the times).

    .venv/bin/python benchmarks/onnx_one_call_overhead.py runs/demo --runtime onnx-int8 \
        --out studies/runtime/onnx-one-call-overhead-demo-int8.json
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchtools import timed, write_results  # this folder's: run as a script

from layerexit.data.encoding import collate
from layerexit.evaluation.evaluate import load_run_split
from layerexit.model import EarlyExitModel
from layerexit.run_folder import RunFolder
from layerexit.runtime.loop import early_exit
from layerexit.runtime.onnx_runtime import OnnxRuntime, _session_options, require_onnx
from layerexit.strategies import parse


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--runtime", default="onnx-int8")
    p.add_argument("--strategy", default="entropy(threshold=0.14)")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="")
    args = p.parse_args()
    run = RunFolder(args.run).require()
    runtime = OnnxRuntime.load(run.require_export(args.runtime), threads=args.threads)
    model = EarlyExitModel.from_pretrained(run.path)
    encoded, pad_id = load_run_split(run, "test", model, limit=args.samples)  # type: ignore[misc]
    rows = [collate(encoded, [i], pad_id) for i in range(len(encoded))]
    never, given = parse("entropy(threshold=0)"), parse(args.strategy)
    results: dict[str, Any] = {"run": args.run, "runtime": args.runtime, "samples": len(rows), "ms": {}}

    def through(strategy: Any) -> Callable[[], None]:
        return lambda: [early_exit(runtime, strategy, b["input_ids"], b["attention_mask"]) for b in rows] and None

    layers = [int(early_exit(runtime, given, b["input_ids"], b["attention_mask"]).exit_layer[0]) for b in rows]
    results["layer_saving"] = round(runtime.num_layers * len(layers) / sum(layers), 3)
    for name, fn in (
        ("full graph", lambda: [runtime.full(b["input_ids"], b["attention_mask"]) for b in rows] and None),
        ("one call, no input leaves early", through(never)),
        (f"one call, {args.strategy}", through(given)),
    ):
        results["ms"][name] = timed(fn, len(rows), repeats=5)
        print(f"{name:45} {results['ms'][name]:7.3f} ms per input", flush=True)

    _, ort = require_onnx()
    with tempfile.TemporaryDirectory(prefix="layerexit-profile-") as tmp:
        options = _session_options(ort, args.threads, spin=True)
        options.enable_profiling, options.profile_file_prefix = True, str(Path(tmp) / "profile")
        graph = runtime.one_call_graph(never, batched=False).SerializeToString()
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        for b in rows:
            session.run(None, {n: b[n].numpy() for n in names if n in b})
        events = json.loads(Path(session.end_profiling()).read_text())
    time_of: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["args"]["op_name"] != "If":
            time_of[event["args"]["op_name"]] += event["dur"]  # If's own time holds its branches': left out
    total = sum(time_of.values())
    results["profile_share"] = {op: round(t / total, 4) for op, t in time_of.most_common()}
    for op, share in list(results["profile_share"].items())[:12]:
        print(f"  {op:28} {100 * share:5.1f}% of kernel time")
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
