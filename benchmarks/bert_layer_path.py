"""BERT-like layers at inference: the module path against the plain-function path (issue 31).

In eval mode the backbone seam runs a BERT-like layer as plain tensor functions
(``backbones._bert_layer``) instead of its eight nn.Module calls; the numbers are the same bit for bit
(tests/test_backbones.py). This measures what that is worth on the clock, in one run: the full model
(the Hugging Face forward, unchanged) and early exit with the run's strategy, once through each layer
path, passes interleaved, on the first ``--samples`` test inputs.

    .venv/bin/python benchmarks/bert_layer_path.py runs/full/tweets-binary-minilm-retrofit-seed1 \\
        --samples 200 --batch-sizes 1 8 32 --repeats 5 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from layerexit.backbones import BertLikeBackbone
from layerexit.evaluation.bench import BenchInputs, _time_pass
from layerexit.evaluation.evaluate import load_run_split
from layerexit.model import EarlyExitModel
from layerexit.predictor import default_strategy
from layerexit.run_folder import RunFolder
from layerexit.runtime.loop import early_exit
from layerexit.runtime.torch_runtime import TorchRuntime
from layerexit.strategies import Static


@contextmanager
def module_path(backbone: Any) -> Iterator[None]:
    """Every layer through its nn.Module (the path before the function path existed)."""
    before = backbone.__dict__.get("_fast_weights")
    backbone.__dict__["_fast_weights"] = {i: None for i in range(backbone.num_layers)}
    try:
        yield
    finally:
        if before is None:
            backbone.__dict__.pop("_fast_weights")
        else:
            backbone.__dict__["_fast_weights"] = before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = RunFolder(args.run).require(config=True).require_finished()
    model = EarlyExitModel.from_pretrained(run.path)
    if not isinstance(model.backbone, BertLikeBackbone):
        raise SystemExit(f"{run.path} is not a BERT-like encoder: it has one layer path")
    strategy = default_strategy(run)[0]
    loaded = load_run_split(run, "test", model, limit=args.samples)
    assert loaded is not None
    inputs = BenchInputs(*loaded)
    runtime = TorchRuntime(model)
    backbone = model.backbone

    def exits(strategy_: Any, modules: bool) -> Callable[[dict[str, torch.Tensor]], Any]:
        def run_batch(b: dict[str, torch.Tensor]) -> Any:
            if modules:
                with module_path(backbone):
                    return early_exit(runtime, strategy_, b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
            return early_exit(runtime, strategy_, b["input_ids"], b["attention_mask"], b.get("token_type_ids"))

        return run_batch

    depth = Static(layer=model.num_layers)
    rows: dict[str, Callable[[dict[str, torch.Tensor]], Any]] = {
        "full (HF forward)": lambda b: runtime.full(b["input_ids"], b["attention_mask"], b.get("token_type_ids")),
        "all layers, modules": exits(depth, True),
        "all layers, functions": exits(depth, False),
        "early exit, modules": exits(strategy, True),
        "early exit, functions": exits(strategy, False),
    }
    exit_layers = torch.cat([exits(strategy, False)(b).exit_layer for b in inputs.batches(32)])
    layer_speedup = model.num_layers / float(exit_layers.float().mean())
    out: dict[str, Any] = {"run": str(run.path), "strategy": str(strategy), "samples": len(inputs.encoded)}
    out.update(threads=args.threads, layer_speedup=round(layer_speedup, 4), batch_sizes={})
    print(f"{run.path} · {strategy} · {len(inputs.encoded)} inputs · {layer_speedup:.2f}x fewer layers")
    with torch.inference_mode():
        for size in args.batch_sizes:
            batches = inputs.batches(size)
            for fn in rows.values():
                for b in batches[:5]:
                    fn(b)
            totals: dict[str, list[float]] = {name: [] for name in rows}
            for _ in range(args.repeats):
                for name, fn in rows.items():
                    totals[name].append(sum(_time_pass(fn, batches)))
            medians = {name: statistics.median(t) for name, t in totals.items()}
            full = medians["full (HF forward)"]
            entry: dict[str, Any] = {
                name: {"total_s": round(t, 4), "speedup_vs_full": round(full / t, 4)} for name, t in medians.items()
            }
            for kind in ("modules", "functions"):
                ratio = full / medians[f"early exit, {kind}"] / layer_speedup
                entry[f"ratio_{kind}"] = round(ratio, 4)
            out["batch_sizes"][str(size)] = entry
            print(f"batch {size}")
            for name, row in entry.items():
                if isinstance(row, dict):
                    print(f"  {name:<24} {row['total_s'] * 1000 / len(inputs.encoded):8.3f} ms/input  "
                          f"{row['speedup_vs_full']:.2f}x vs full")  # fmt: skip
            print(f"  early exit vs full over the layer saving: modules {entry['ratio_modules']:.2f}, "
                  f"functions {entry['ratio_functions']:.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
