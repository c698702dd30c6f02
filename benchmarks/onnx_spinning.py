"""ONNX Runtime at batch 1: thread-pool spinning on and off for the sessions that run a whole input in one call.

Times, on the first ``--samples`` test inputs of RUN one at a time, the export's full graph and the
single-row early-exit graph (:mod:`layerexit.runtime.onnx_fused`, built for ``--strategy``), each in a
session whose intra-op threads spin between operators (ONNX Runtime's default) and one whose threads
sleep; passes interleaved, medians of ``--repeats``, one process, quiet machine.

    .venv/bin/python benchmarks/onnx_spinning.py runs/demo --runtime onnx-int8 --strategy "entropy(threshold=0.14)"
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--runtime", default="onnx-int8")
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from layerexit.evaluation.evaluate import load_run_split
    from layerexit.model import EarlyExitModel
    from layerexit.run_folder import RunFolder
    from layerexit.runtime import load_runtime
    from layerexit.runtime.onnx_runtime import _session_options
    from layerexit.strategies import parse

    run = RunFolder(args.run).require(config=True).require_finished()
    model = EarlyExitModel.from_pretrained(run.path)
    loaded = load_run_split(run, "test", model, limit=args.samples)
    assert loaded is not None
    data = loaded[0]
    runtime: Any = load_runtime(run, args.runtime, threads=args.threads)
    strategy = parse(args.strategy)
    ort = runtime._ort
    graphs = {
        "full graph": str(runtime.folder / runtime._full_entry.file),
        "single-row graph": runtime.one_call_graph(strategy, batched=False).SerializeToString(),
    }
    sessions = {}
    for name, source in graphs.items():
        for spin in (False, True):
            options = _session_options(ort, args.threads, spin=spin)
            options.log_severity_level = 3
            key = f"{name}, spinning {'on' if spin else 'off'}"
            sessions[key] = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    import numpy as np

    feeds = []
    for i in range(len(data)):
        row = {"input_ids": [data.input_ids[i]], "attention_mask": [[1] * len(data.input_ids[i])]}
        if data.token_type_ids is not None:
            row["token_type_ids"] = [data.token_type_ids[i]]
        feeds.append(row)

    def feed_for(session: Any, row: dict[str, Any]) -> dict[str, Any]:
        return {i.name: np.asarray(row[i.name], dtype=np.int64) for i in session.get_inputs()}

    prepared = {key: [feed_for(s, r) for r in feeds] for key, s in sessions.items()}
    totals: dict[str, list[float]] = {key: [] for key in sessions}
    for key, s in sessions.items():
        for f in prepared[key][:10]:
            s.run(None, f)
    for _ in range(args.repeats):
        for key, s in sessions.items():
            start = time.perf_counter()
            for f in prepared[key]:
                s.run(None, f)
            totals[key].append((time.perf_counter() - start) * 1000 / len(feeds))
    ms = {key: statistics.median(t) for key, t in totals.items()}
    print(f"{args.run} · {args.runtime} · {strategy} · batch 1 · {len(feeds)} inputs · {args.threads} threads")
    for key, value in ms.items():
        print(f"  {key:<36} {value:7.3f} ms")
    if args.json:
        out = {"run": args.run, "runtime": args.runtime, "strategy": str(strategy), "threads": args.threads, "ms": ms}
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
