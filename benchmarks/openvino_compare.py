"""OpenVINO against ONNX Runtime on a run's exported fp32 graphs (`layerexit export RUN --runtime onnx`):
the full model, and early exit through the same per-layer graphs with the same entropy rule, at batch 1
and 32, 2 threads, the median of 3 passes over the same test inputs, in ms per input.

    .venv/bin/python benchmarks/openvino_compare.py runs/demo --out studies/runtime/openvino-demo.json

OpenVINO runs each graph at its CPU plugin's default precision, which is bf16 on a CPU with AMX or
AVX512-BF16 (this one has both), and again with `INFERENCE_PRECISION_HINT=f32`; the largest difference of
its full model's probabilities from ONNX Runtime's is printed for each. Needs `pip install openvino`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import openvino as ov
from benchtools import timed, write_results  # this folder's: run as a script

from layerexit.data.encoding import collate
from layerexit.evaluation.evaluate import load_run_split
from layerexit.model import EarlyExitModel
from layerexit.run_folder import RunFolder

Feed = dict[str, np.ndarray]


def openvino_graph(core: Any, path: Path, threads: int, precision: str | None) -> Callable[[Feed], list[np.ndarray]]:
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    names = {n for port in compiled.inputs for n in port.get_names()}  # inputs a graph does not use are pruned

    def call(feed: Feed) -> list[np.ndarray]:
        request.infer({k: v for k, v in feed.items() if k in names}, share_inputs=True)
        return [request.get_output_tensor(i).data.copy() for i in range(len(compiled.outputs))]

    return call


def onnxruntime_graph(path: Path, threads: int) -> Callable[[Feed], list[np.ndarray]]:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return lambda feed: session.run(None, {k: v for k, v in feed.items() if k in names})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--threshold", type=float, default=0.14, help="entropy(threshold=...) for early exit")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="")
    args = p.parse_args()
    run = RunFolder(args.run).require()
    folder = run.require_export("onnx")
    model = EarlyExitModel.from_pretrained(run.path)
    encoded, pad_id = load_run_split(run, "test", model, limit=args.samples)  # type: ignore[misc]
    manifest = json.loads((folder / "onnx_manifest.json").read_text())
    layers = len(manifest["layers"])
    core = ov.Core()
    makers: dict[str, Callable[[Path], Callable[[Feed], list[np.ndarray]]]] = {
        "onnxruntime": lambda path: onnxruntime_graph(path, args.threads),
        "openvino (default: bf16 here)": lambda path: openvino_graph(core, path, args.threads, None),
        "openvino f32": lambda path: openvino_graph(core, path, args.threads, "f32"),
    }
    results: dict[str, Any] = {"run": args.run, "samples": len(encoded), "threads": args.threads, "rows": {}}
    reference: dict[int, list[np.ndarray]] = {}
    for name, make in makers.items():
        full = make(folder / "full.onnx")
        embed = make(folder / "embed.onnx")
        stages = [make(folder / f"layer_{i + 1}.onnx") for i in range(layers)]
        for size in (1, 32):
            batches = [
                collate(encoded, list(range(s, min(s + size, len(encoded)))), pad_id)
                for s in range(0, len(encoded), size)
            ]
            feeds = [{k: v.numpy() for k, v in b.items() if k != "labels"} for b in batches]
            outputs = [full(f)[0] for f in feeds]
            if size == 32:
                reference.setdefault(32, outputs)
                error = max(float(np.abs(a - b).max()) for a, b in zip(outputs, reference[32], strict=True))
                results["rows"][f"{name}: largest probability difference from onnxruntime"] = error

            def full_pass(feeds: list[Feed] = feeds, full: Callable[[Feed], list[np.ndarray]] = full) -> None:
                for feed in feeds:
                    full(feed)

            def exit_pass(
                feeds: list[Feed] = feeds,
                embed: Callable[[Feed], list[np.ndarray]] = embed,
                stages: list[Callable[[Feed], list[np.ndarray]]] = stages,
            ) -> None:
                for feed in feeds:
                    hidden, mask = embed(feed)[0], feed["attention_mask"]
                    for i, stage in enumerate(stages):
                        hidden, probs = stage({"hidden": hidden, "attention_mask": mask})
                        entropy = -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(-1) / np.log(probs.shape[-1])
                        going = entropy > args.threshold
                        if i == layers - 1 or not going.any():
                            break
                        hidden, mask = hidden[going], mask[going]

            for row, fn in (("full", full_pass), ("early exit", exit_pass)):
                ms = timed(fn, len(encoded))
                results["rows"][f"{name}, batch {size}, {row}"] = ms
                print(f"{name:30} batch {size:>2} {row:10} {ms:7.3f} ms per input", flush=True)
    for key, value in results["rows"].items():
        if "difference" in key:
            print(f"{key}: {value:.2e}")
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
