"""What one encoder layer costs per row, by batch size: why small layer steps cost more on a CPU.

A serving engine that pools rows layer by layer runs many small steps when the load is light, and steps
that visit the layers in turn. At batch 1 a layer's cost is mostly reading its weights (a MiniLM layer
holds 1.8 M parameters, 7 MB in fp32), not arithmetic, so the cost per row falls as rows share a step;
and when the six layers take turns, each step finds its weights out of cache. This times the PyTorch
runtime's layer step (layer and exit) per row, for batch sizes 1-32, two ways:

* ``same layer``: one layer again and again (its weights stay in cache: the best case);
* ``layers in turn``: layers 1, 2, ..., 6, 1, ... (what the engine does).

    .venv/bin/python benchmarks/layer_cost.py --out studies/serving/layer_cost.json

Medians of ``--repeats`` steps, one thread, inputs of ``--tokens`` tokens; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from layerexit.atomic import write_json
from layerexit.model import EarlyExitModel
from layerexit.runtime.torch_runtime import TorchRuntime


def per_row_ms(runtime: TorchRuntime, batch: int, tokens: int, repeats: int, cycle: bool) -> float:
    ids = torch.randint(1000, 2000, (batch, tokens), generator=torch.Generator().manual_seed(batch))
    rows = runtime.embed(ids, torch.ones_like(ids))
    layers = runtime.num_layers
    times = []
    with torch.inference_mode():
        for i in range(repeats * (layers if cycle else 1)):
            layer = i % layers + 1 if cycle else 1
            started = time.perf_counter()
            runtime.layer(layer, rows)
            times.append((time.perf_counter() - started) * 1000 / batch)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--tokens", type=int, default=32, help="input length (the demo's test tweets average 33)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    runtime = TorchRuntime(EarlyExitModel.from_backbone(args.model, 2, seed=0))
    per_row_ms(runtime, 4, args.tokens, 5, cycle=True)  # warm-up
    rows = []
    print(f"{args.model}, {args.tokens} tokens, one thread: ms per row of one layer step (layer + exit)")
    print(f"{'batch':>5}  {'same layer':>10}  {'layers in turn':>14}")
    for batch in args.batch_sizes:
        same = per_row_ms(runtime, batch, args.tokens, args.repeats, cycle=False)
        turn = per_row_ms(runtime, batch, args.tokens, args.repeats, cycle=True)
        rows.append(
            {"batch": batch, "same_layer_ms_per_row": round(same, 3), "layers_in_turn_ms_per_row": round(turn, 3)}
        )
        print(f"{batch:>5}  {same:>10.2f}  {turn:>14.2f}")
    if args.out:
        write_json(args.out, {"model": args.model, "tokens": args.tokens, "threads": 1, "rows": rows})


if __name__ == "__main__":
    main()
