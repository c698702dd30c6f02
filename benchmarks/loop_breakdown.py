"""Where the exit loop's time goes in batches, and why its ratio to the layer saving falls below 1.

Times, on the same test inputs in fixed batches (passes alternate; seconds summed over ``--repeats``
passes): the full model (F), the exit loop made to run every layer (A: ``static(layer=L)``, every exit and
decision, no row leaves) and the exit loop with the strategy (E). Inside A and E it also times each runtime
call (``embed``, ``layer``, ``take``, ``join``; the clock adds about a microsecond a call) and counts the rows
and padded width of each layer call. With S the layer saving, the ratio ``bench`` prints splits exactly into
three factors:

    F / E / S  =  F / A                      what the exits and decisions cost when every layer runs
               x  (c_A / c_E)                a row-layer's cost in full batches against its cost in E,
                                             where rows leave and later layers run on fewer rows
               x  (s_E / s_A)                the share of each pass spent in layer calls (the rest:
                                             embeddings, dropping rows, the strategy's step in Python)

where c is layer-call seconds per row-layer and s the layer calls' share of the pass; the middle factor is
in turn the padded width per row (A over E) times the cost per padded token (A over E). ONNX runtimes are
timed on their per-layer path (their one-call graph has no calls to time inside).

    .venv/bin/python benchmarks/loop_breakdown.py runs/demo --runtime torch --batch-sizes 8 32 \\
        --json studies/runtime/loop-breakdown-demo.json
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from benchtools import exit_loop_inputs, exit_loop_parser, write_results  # this folder's: run as a script

from layerexit.data.encoding import collate
from layerexit.runtime import load_runtime
from layerexit.runtime.base import Runtime
from layerexit.runtime.loop import early_exit
from layerexit.strategies import Static, Strategy

CALLS = ("embed", "layer", "take", "join")


class _Clock:
    """Wraps a runtime's calls (on the instance) to sum their seconds, count them and count layer rows."""

    def __init__(self, runtime: Runtime) -> None:
        self.on = False
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.row_layers = 0
        self.token_layers = 0  # rows x padded width of each layer call
        for name in CALLS:
            setattr(runtime, name, self._wrap(name, getattr(runtime, name)))

    def _wrap(self, name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return call(*args, **kwargs)
            start = time.perf_counter()
            out = call(*args, **kwargs)
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1
            if name == "layer":
                self.row_layers += len(args[1])
                self.token_layers += len(args[1]) * args[1].mask.shape[1]
            return out

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.row_layers = 0
        self.token_layers = 0


def breakdown(runtime: Runtime, strategy: Strategy, batches: list[Any], repeats: int) -> dict[str, Any]:
    """One runtime at one batch size: the three timed rows and the factors of the module docstring, from
    seconds summed over all timed passes (so the three factors multiply to the ratio exactly)."""
    if hasattr(runtime, "fuse"):
        runtime.fuse = False  # the per-layer path: its calls can be timed
    clock = _Clock(runtime)
    strategies: dict[str, Strategy | None] = {
        "full": None,
        "all_layers": Static(layer=runtime.num_layers),
        "early_exit": strategy,
    }

    def run(which: Strategy | None) -> None:
        for b in batches:
            ids, mask, types = b["input_ids"], b["attention_mask"], b.get("token_type_ids")
            if which is None:
                runtime.full(ids, mask, types)
            else:
                early_exit(runtime, which, ids, mask, types)

    total: Counter[str] = Counter()  # seconds over all timed passes, per row
    inside: dict[str, Counter[str]] = {name: Counter() for name in strategies}  # of which in each call
    counts: dict[str, dict[str, Any]] = {}
    by_pass: list[float] = []
    with torch.inference_mode():
        for which in strategies.values():
            run(which)  # warm-up
        for _ in range(repeats):
            took: dict[str, float] = {}
            for name, which in strategies.items():
                clock.reset()
                clock.on = which is not None
                start = time.perf_counter()
                run(which)
                took[name] = time.perf_counter() - start
                clock.on = False
                total[name] += took[name]
                inside[name].update(clock.seconds)
                counts[name] = {
                    "calls": dict(clock.calls),
                    "row_layers": clock.row_layers,
                    "token_layers": clock.token_layers,
                }  # the same each pass
            by_pass.append(took["full"] / took["early_exit"])
    row_layers_a, row_layers_e = counts["all_layers"]["row_layers"], counts["early_exit"]["row_layers"]
    saving = row_layers_a / row_layers_e
    full, every, early = total["full"], total["all_layers"], total["early_exit"]
    share_a, share_e = inside["all_layers"]["layer"] / every, inside["early_exit"]["layer"] / early
    cost_a, cost_e = inside["all_layers"]["layer"] / row_layers_a, inside["early_exit"]["layer"] / row_layers_e
    width_a = counts["all_layers"]["token_layers"] / row_layers_a  # padded tokens per row, layer calls' mean
    width_e = counts["early_exit"]["token_layers"] / row_layers_e
    return {
        "layer_saving": round(saving, 4),
        "seconds_per_pass": {name: round(t / repeats, 4) for name, t in total.items()},
        "ratio_to_layer_saving": round(full / early / saving, 3),
        "ratio_single_passes": [round(min(by_pass) / saving, 3), round(max(by_pass) / saving, 3)],
        "exits_and_decisions": round(full / every, 3),
        "row_layer_cost": round(cost_a / cost_e, 3),
        "padded_width": round(width_a / width_e, 3),
        "token_layer_cost": round(cost_a / width_a / (cost_e / width_e), 3),
        "padded_tokens_per_row": {"all_layers": round(width_a, 2), "early_exit": round(width_e, 2)},
        "layer_call_share": round(share_e / share_a, 3),
        "layer_call_share_all_layers": round(share_a, 3),
        "layer_call_share_early_exit": round(share_e, 3),
        "ms_per_row_layer": {
            "all_layers": round(cost_a / repeats * 1000, 4),
            "early_exit": round(cost_e / repeats * 1000, 4),
        },
        "seconds_in_calls_per_pass": {
            name: {call: round(t / repeats, 4) for call, t in inside[name].items()}
            for name in ("all_layers", "early_exit")
        },
        "counts_per_pass": {name: counts[name] for name in ("all_layers", "early_exit")},
    }


def main() -> None:
    parser = exit_loop_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args()
    run, data, pad_id, strategy, results = exit_loop_inputs(args)
    for name in args.runtime:
        runtime = load_runtime(run, name, threads=args.threads)
        for size in args.batch_sizes:
            batches = [
                collate(data, list(range(s, min(s + size, len(data)))), pad_id) for s in range(0, len(data), size)
            ]
            entry = breakdown(runtime, strategy, batches, args.repeats)
            results[f"{name} batch {size}"] = entry
            calls = {row: entry["counts_per_pass"][row]["calls"]["layer"] for row in ("all_layers", "early_exit")}
            cost = entry["ms_per_row_layer"]
            print(
                f"{name} batch {size}: ratio {entry['ratio_to_layer_saving']:.3f} = exits and decisions "
                f"{entry['exits_and_decisions']:.3f} x row-layer cost {entry['row_layer_cost']:.3f} "
                f"x layer-call share {entry['layer_call_share']:.3f}; row-layer cost = padded width "
                f"{entry['padded_width']:.3f} x cost per padded token {entry['token_layer_cost']:.3f}  "
                f"(layer saving {entry['layer_saving']:.3f}x; "
                f"ms per row-layer {cost['all_layers']} with every layer, {cost['early_exit']} in early exit; "
                f"layer calls {calls['all_layers']} and {calls['early_exit']})"
            )
    write_results(args.json or None, results)


if __name__ == "__main__":
    main()
