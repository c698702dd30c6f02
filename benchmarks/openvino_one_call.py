"""OpenVINO running the whole early exit in one call, against ONNX Runtime's one-call path.

`benchmarks/openvino_compare.py` found OpenVINO's full model faster than ONNX Runtime's here but its early
exit slower, because it went layer by layer and each OpenVINO call costs more fixed time. This one gives
OpenVINO the same one-call graph ONNX Runtime runs (`OnnxRuntime.one_call_graph(..., optimised=False)`:
the export's graphs as they are, without ONNX Runtime's session rewrites, every layer in an `If` branch), at batch 1 and
32, 2 threads, the median of 3 passes over the same test inputs, in ms per input. It prints how often
OpenVINO's exit layer and answer differ from ONNX Runtime's (which equal the per-layer loop's bit for bit).

    .venv/bin/python benchmarks/openvino_one_call.py runs/demo --out studies/runtime/openvino-one-call-demo.json

Needs `pip install openvino` and an fp32 export (`layerexit export RUN --runtime onnx`).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import torch
from benchtools import timed, write_results  # this folder's: run as a script
from openvino_compare import openvino_graph

from layerexit.data.encoding import collate
from layerexit.evaluation.evaluate import load_run_split
from layerexit.model import EarlyExitModel
from layerexit.run_folder import RunFolder
from layerexit.runtime.loop import early_exit
from layerexit.runtime.onnx_runtime import OnnxRuntime
from layerexit.strategies import parse as parse_strategy

Feed = dict[str, np.ndarray]


def decisions(call: Callable[[Feed], list[np.ndarray]], feed: Feed, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(exit layer, prediction) per row from a one-call graph's outputs, in input order."""
    positions, _, layers, prediction, _ = call(feed)
    exit_layer, answer = np.empty(rows, dtype=np.int64), np.empty(rows, dtype=np.int64)
    exit_layer[positions.astype(np.int64)], answer[positions.astype(np.int64)] = layers, prediction
    return exit_layer, answer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--strategy", default="entropy(threshold=0.14)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="")
    args = p.parse_args()
    run = RunFolder(args.run).require()
    folder = run.require_export("onnx")
    model = EarlyExitModel.from_pretrained(run.path)
    encoded, pad_id = load_run_split(run, "test", model, limit=args.samples)  # type: ignore[misc]
    strategy = parse_strategy(args.strategy)
    ort_runtime = OnnxRuntime.load(folder, threads=args.threads)
    ort_runtimes = {"onnxruntime fp32": ort_runtime}
    if (run.path / "onnx-int8").is_dir():  # the fastest ONNX Runtime setup, where the run has it
        ort_runtimes["onnxruntime int8 (dynamic)"] = OnnxRuntime.load(run.export_dir("onnx-int8"), threads=args.threads)
    core = ov.Core()
    results: dict[str, Any] = {"run": args.run, "samples": len(encoded), "threads": args.threads, "rows": {}}
    with tempfile.TemporaryDirectory(prefix="openvino-one-call-") as tmp:
        graphs = {}
        for batched in (False, True):
            path = Path(tmp) / f"one_call_{'batched' if batched else 'single'}.onnx"
            path.write_bytes(ort_runtime.one_call_graph(strategy, batched=batched, optimised=False).SerializeToString())
            graphs[batched] = path
        for size in (1, 32):
            batches = [
                collate(encoded, list(range(s, min(s + size, len(encoded)))), pad_id)
                for s in range(0, len(encoded), size)
            ]
            feeds = [{k: v.numpy() for k, v in b.items() if k != "labels"} for b in batches]
            reference = [
                early_exit(ort_runtime, strategy, b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
                for b in batches
            ]

            timings: dict[str, Callable[[], None]] = {}
            for label, runtime in ort_runtimes.items():

                def ort_full(batches: list[dict[str, torch.Tensor]] = batches, runtime: OnnxRuntime = runtime) -> None:
                    for b in batches:
                        runtime.full(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))

                def ort_exit(batches: list[dict[str, torch.Tensor]] = batches, runtime: OnnxRuntime = runtime) -> None:
                    for b in batches:
                        early_exit(runtime, strategy, b["input_ids"], b["attention_mask"], b.get("token_type_ids"))

                timings[f"{label}, full"] = ort_full
                timings[f"{label}, early exit in one call"] = ort_exit
            for precision in (None, "f32"):
                name = f"openvino {precision or 'default (bf16 here)'}"
                full = openvino_graph(core, folder / "full.onnx", args.threads, precision)
                whole = openvino_graph(core, graphs[size > 1], args.threads, precision)
                moved = sum(
                    int((decisions(whole, f, len(r.exit_layer))[0] != r.exit_layer.numpy()).sum())
                    for f, r in zip(feeds, reference, strict=True)
                )
                changed = sum(
                    int((decisions(whole, f, len(r.prediction))[1] != r.prediction.numpy()).sum())
                    for f, r in zip(feeds, reference, strict=True)
                )
                results["rows"][f"{name}, batch {size}: rows whose exit layer differs from onnxruntime"] = moved
                results["rows"][f"{name}, batch {size}: rows whose answer differs from onnxruntime"] = changed
                print(f"{name:30} batch {size:>2}: exit layer differs on {moved}, answer on {changed} rows", flush=True)

                def ov_full(feeds: list[Feed] = feeds, full: Callable[[Feed], list[np.ndarray]] = full) -> None:
                    for feed in feeds:
                        full(feed)

                def ov_exit(feeds: list[Feed] = feeds, whole: Callable[[Feed], list[np.ndarray]] = whole) -> None:
                    for feed in feeds:
                        whole(feed)

                timings[f"{name}, full"] = ov_full
                timings[f"{name}, early exit in one call"] = ov_exit
            for row, fn in timings.items():
                ms = timed(fn, len(encoded))
                results["rows"][f"{row}, batch {size}"] = ms
                print(f"{row:54} batch {size:>2} {ms:7.3f} ms per input", flush=True)
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
