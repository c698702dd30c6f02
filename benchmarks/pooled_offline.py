"""Regrouping rows by depth over many inputs, measured against fixed batches: not kept, it does not pay here.

In a fixed batch, the rows that stay deep run their last layers a few at a time. Over many inputs that can be
avoided: rows that went on past layer l wait, with rows of later batches that reach the same point, until a
full batch of them is there (the serving engine's ``pooled`` scheduler does this for requests arriving over
time). This script's :func:`pooled_early_exit` does it for a known list of inputs: the deepest layer with
a full batch waiting runs next; else the next ``batch_size`` inputs are embedded; once none are left, the
deepest layer where rows wait. Every call but the final drain then runs ``batch_size`` rows.

Timed on the same inputs, in the same order, alternating passes (median of ``--repeats``): the full model
in fixed batches, the exit loop on the same batches (``early_exit``; on ONNX Runtime its one-call graph),
the per-layer loop (ONNX Runtime only: the one-call graph off), and the pooled driver. Every input's exit
layer from the pooled driver is compared with the exit loop's; the count that differ is reported (zero
on an exact runtime; PyTorch fp32 and dynamic int8 may round a row differently in another batch).

    .venv/bin/python benchmarks/pooled_offline.py runs/demo --runtime torch onnx onnx-int8 \
        --batch-sizes 8 32 --json studies/runtime/pooled-offline-demo.json
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from benchtools import exit_loop_inputs, exit_loop_parser, write_results  # this folder's: run as a script
from torch import Tensor

from layerexit.data.encoding import Encoded, collate
from layerexit.runtime import load_runtime
from layerexit.runtime.base import Rows, Runtime
from layerexit.runtime.loop import ExitResult, early_exit, exit_step
from layerexit.strategies import State, Strategy, select_state


@dataclass
class _Block:
    """Rows that wait together for the same layer: the runtime's rows, the strategy's state of those rows and
    their input positions, in the same order."""

    rows: Rows
    state: State
    positions: Tensor

    def __len__(self) -> int:
        return len(self.positions)


def _split(runtime: Runtime, block: _Block, n: int) -> tuple[_Block, _Block]:
    """The first ``n`` rows of ``block`` and the rest (each with the padding no row of it uses cut)."""
    head, tail = torch.arange(n), torch.arange(n, len(block))
    return (
        _Block(runtime.take(block.rows, head), select_state(block.state, head), block.positions[:n]),
        _Block(runtime.take(block.rows, tail), select_state(block.state, tail), block.positions[n:]),
    )


def _join(runtime: Runtime, blocks: list[_Block]) -> _Block:
    if len(blocks) == 1:
        return blocks[0]
    state = {key: torch.cat([b.state[key] for b in blocks]) for key in blocks[0].state}
    return _Block(runtime.join([b.rows for b in blocks]), state, torch.cat([b.positions for b in blocks]))


def pooled_early_exit(
    runtime: Runtime,
    strategy: Strategy,
    data: Encoded,
    pad_id: int,
    *,
    batch_size: int,
    order: list[int],
) -> ExitResult:
    """Every input of ``data`` through early exit, ``batch_size`` rows per call, regrouped by depth, embedded
    in ``order``; results in input order. Fewer than ``batch_size`` rows wait at each layer while inputs
    remain, so at most ``batch_size * (layers + 1)`` rows' hidden states are held."""
    depth, n = runtime.num_layers, len(data)
    pending = deque(order)
    waiting: list[deque[_Block]] = [deque() for _ in range(depth + 1)]  # waiting[l]: rows before layer l
    exit_layer = torch.zeros(n, dtype=torch.long)
    prediction = torch.zeros(n, dtype=torch.long)
    exit_probs = torch.zeros(n, runtime.num_labels)
    while True:
        count = [sum(len(block) for block in queue) for queue in waiting]
        if not pending and not any(count):
            break
        full = [layer for layer in range(1, depth + 1) if count[layer] >= batch_size]
        if not full and pending:
            rows = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
            batch = collate(data, rows, pad_id)
            embedded = runtime.embed(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            state = strategy.init(len(rows), runtime.num_labels, "cpu")
            waiting[1].append(_Block(embedded, state, torch.tensor(rows, dtype=torch.long)))
            continue
        layer = full[-1] if full else max(i for i in range(1, depth + 1) if count[i])
        parts: list[_Block] = []
        room = batch_size
        while room and waiting[layer]:
            block = waiting[layer].popleft()
            if len(block) > room:
                block, rest = _split(runtime, block, room)
                waiting[layer].appendleft(rest)
            parts.append(block)
            room -= len(block)
        step = _join(runtime, parts)
        rows_out, probs, fire, pred = exit_step(runtime, strategy, layer, step.rows, step.state)
        done = fire.nonzero().squeeze(1)
        gone = step.positions[done]
        exit_layer[gone], prediction[gone], exit_probs[gone] = layer, pred[done], probs[done]
        if len(done) < len(step):
            keep = (~fire).nonzero().squeeze(1)
            kept = _Block(runtime.take(rows_out, keep), select_state(step.state, keep), step.positions[keep])
            waiting[layer + 1].append(kept)
    return ExitResult(exit_layer, prediction, exit_probs, layers_run=int(exit_layer.max()) if n else 0)


def main() -> None:
    parser = exit_loop_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args()
    run, data, pad_id, strategy, results = exit_loop_inputs(args)
    order = list(range(len(data)))
    for name in args.runtime:
        runtime = load_runtime(run, name, threads=args.threads)
        for size in args.batch_sizes:
            batches = [collate(data, order[s : s + size], pad_id) for s in range(0, len(data), size)]

            def loop(fuse: bool, runtime: Any = runtime, batches: list[Any] = batches) -> ExitResult:
                if hasattr(runtime, "fuse"):
                    runtime.fuse = fuse
                parts = [early_exit(runtime, strategy, b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
                         for b in batches]  # fmt: skip
                layers = torch.cat([p.exit_layer for p in parts])
                return ExitResult(layers, torch.cat([p.prediction for p in parts]), torch.empty(0), int(layers.max()))

            rows: dict[str, Callable[[], Any]] = {
                "full": lambda runtime=runtime, batches=batches: [
                    runtime.full(b["input_ids"], b["attention_mask"], b.get("token_type_ids")) for b in batches
                ],
                "early_exit": lambda: loop(True),
                "pooled": lambda runtime=runtime, size=size: pooled_early_exit(
                    runtime, strategy, data, pad_id, batch_size=size, order=order
                ),
            }
            if hasattr(runtime, "fuse"):
                rows["per_layer_loop"] = lambda: loop(False)
            with torch.inference_mode():
                outputs = {row: fn() for row, fn in rows.items()}  # warm-up, and the exits compared below
                times: dict[str, list[float]] = {row: [] for row in rows}
                for _ in range(args.repeats):
                    for row, fn in rows.items():
                        start = time.perf_counter()
                        fn()
                        times[row].append(time.perf_counter() - start)
            if hasattr(runtime, "fuse"):
                runtime.fuse = True
            layers = outputs["early_exit"].exit_layer
            saving = runtime.num_layers / float(layers.float().mean())
            medians = {row: statistics.median(t) for row, t in times.items()}
            entry = {
                "layer_saving": round(saving, 3),
                "seconds": {row: round(t, 4) for row, t in medians.items()},
                "ratio_to_layer_saving": {
                    row: round(medians["full"] / t / saving, 3) for row, t in medians.items() if row != "full"
                },
                "pooled_exits_differing": int((outputs["pooled"].exit_layer != layers).sum()),
            }
            results[f"{name} batch {size}"] = entry
            print(name, size, entry)
    write_results(args.json or None, results)


if __name__ == "__main__":
    main()
