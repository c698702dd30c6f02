"""``torch.compile`` of the PyTorch runtime's layer step (one encoder layer and its exit), against the eager
step the runtime runs: six layers with their exits on the same hidden states, batch 1 and 8, 32 tokens,
2 threads, median of ``--repeats`` passes. One compiled function per layer (``dynamic=True``: rows leave
and padding is cut, so shapes change), compiled before timing; dynamo's graph and graph-break counts of
layer 1 are reported with the times.

    .venv/bin/python benchmarks/torch_compile.py runs/demo --json studies/runtime/torch-compile-demo.json
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from benchtools import write_results

from layerexit.model import EarlyExitModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch._dynamo.config.recompile_limit = 64
    model = EarlyExitModel.from_pretrained(args.run).eval()
    backbone = model.backbone

    def step(i: int, hidden: torch.Tensor, mask: torch.Tensor, kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        out = backbone.layer(i, hidden, kwargs)
        return out, model.exits[i](out, mask, None).float().softmax(-1)

    eager = [functools.partial(step, i) for i in range(model.num_layers)]
    compiled = [torch.compile(f, dynamic=True) for f in eager]
    results: dict[str, object] = {"run": args.run, "tokens": args.tokens, "torch": torch.__version__, "batches": {}}
    for batch in (1, 8):
        ids = torch.randint(1000, 20000, (batch, args.tokens), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            hidden = backbone.embed(ids, mask, None)
            kwargs = backbone.layer_kwargs(hidden, mask)
            start = time.perf_counter()
            for f in compiled:
                f(hidden, mask, kwargs)
            compile_s = time.perf_counter() - start
            explained = torch._dynamo.explain(eager[0])(hidden, mask, kwargs)
            row: dict[str, object] = {
                "compile_s": compile_s,
                "graphs": explained.graph_count,
                "graph_breaks": explained.graph_break_count,
            }
            for name, steps in (("eager", eager), ("compiled", compiled)):
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    h = hidden
                    for f in steps:
                        h, _ = f(h, mask, kwargs)
                    times.append(time.perf_counter() - t)
                row[f"{name}_ms"] = statistics.median(times) * 1000
        results["batches"][batch] = row  # type: ignore[index]
        print(
            f"batch {batch}: six layers with exits, eager {row['eager_ms']:.2f} ms, "
            f"compiled {row['compiled_ms']:.2f} ms "
            f"(compiled in {compile_s:.1f} s; {row['graphs']} graph(s), {row['graph_breaks']} break(s))",
            flush=True,
        )
    write_results(args.json or None, results)


if __name__ == "__main__":
    main()
