"""Wall-clock measurement of early exit against the full model, on the same inputs, in one run.

Rows measured for each batch size:
* ``full``: the plain Hugging Face encoder forward (its own fused path) and the final exit, which is
  what a user would deploy without early exit;
* ``all_layers``: early exit's own path made to run every layer (``static(layer=L)``): exit heads and
  decisions included, with no layer saved (layer by layer on PyTorch; on ONNX Runtime the one-call graph
  of :mod:`layerexit.runtime.onnx_fused`);
* ``early_exit``: the exit loop (:func:`layerexit.runtime.loop.early_exit`) with the chosen strategy;
* ``onnx_full`` / ``onnx_all_layers`` / ``onnx_early_exit``, ``onnx_int8_...``: the same three on each
  further runtime given (ONNX Runtime fp32, int8), each with its own early-exit-vs-full ratio.

Speed-ups: ``layer_speedup`` is the paper's L / mean exit layer of the PyTorch exits, and
``onnx_int8_layer_speedup`` and so on each further runtime's own (its exits at that batch size: int8 exits
can differ, dynamic int8's with the batch); ``wallclock_speedup`` is the full
model's total time over early exit's total time for the same inputs (medians over repeats);
their ratio is what the exits, the decision and the Python loop cost, net of any difference between
the runtime's layers and the full model's own forward. ``all_layers`` separates the two: early exit
against it (``early_exit_vs_all_layers``) is the layer saving alone on the clock. ``..._full_passes`` gives
the lowest and highest early-exit speed-up of single passes, each against the full model's pass of the same
repeat: how far the machine's drift moves the figure.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from layerexit.data.encoding import Encoded, collate
from layerexit.runtime.base import Runtime
from layerexit.runtime.loop import ExitResult, early_exit
from layerexit.runtime.registry import REFERENCE
from layerexit.strategies import Static, Strategy

Batch = dict[str, Tensor]


@dataclass
class BenchInputs:
    encoded: Encoded
    pad_id: int

    def batches(self, batch_size: int) -> list[Batch]:
        n = len(self.encoded)
        return [
            collate(self.encoded, list(range(s, min(s + batch_size, n))), self.pad_id) for s in range(0, n, batch_size)
        ]


def long_inputs(tokenizer: Any, texts: Sequence[str], tokens: int, samples: int, token_types: bool) -> Encoded:
    """``samples`` inputs of exactly ``tokens`` tokens each (special tokens included), each made of the
    given texts joined in order until it is long enough, then truncated: how a model serves long
    documents, timed at a chosen length."""
    from layerexit.data.encoding import encode
    from layerexit.errors import LayerExitError

    joined: list[str] = []
    current: list[str] = []
    count = 0
    for text in texts:
        current.append(text)
        count += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if count >= tokens:
            joined.append(" ".join(current))
            current, count = [], 0
            if len(joined) == samples:
                break
    if len(joined) < samples:
        raise LayerExitError(
            f"the split's texts make only {len(joined)} inputs of {tokens} tokens; ask for fewer --samples"
        )
    encoded = encode(tokenizer, joined, max_length=tokens, token_types=token_types)
    assert all(len(ids) == tokens for ids in encoded.input_ids)
    return encoded


def _time_pass(fn: Callable[[Batch], Any], batches: Sequence[Batch]) -> list[float]:
    """Seconds per batch for one pass over ``batches``."""
    times = []
    for batch in batches:
        start = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - start)
    return times


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def row_prefix(runtime: Runtime) -> str:
    """``""`` for the reference runtime, PyTorch (rows ``full``, ``early_exit``); ``onnx_`` / ``onnx_int8_``
    and so on for the others."""
    return "" if runtime.name == REFERENCE else runtime.name.replace("-", "_") + "_"


def bench(
    runtime: Runtime,
    strategy: Strategy,
    inputs: BenchInputs,
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    repeats: int = 3,
    warmup: int = 5,
    threads: int = 2,
    progress: bool = True,
    others: Sequence[Runtime] = (),
) -> dict[str, Any]:
    """Measure the full model and early exit on ``runtime`` (the PyTorch baseline) and on each of
    ``others``, at every batch size; passes alternate between rows to share the machine's drift."""
    torch.set_num_threads(threads)
    rows: dict[str, Callable[[Batch], Any]] = {}
    for rt in (runtime, *others):
        prefix = row_prefix(rt)
        rows[f"{prefix}full"] = _full_row(rt)
        rows[f"{prefix}all_layers"] = _early_exit_row(rt, Static(layer=rt.num_layers))
        rows[f"{prefix}early_exit"] = _early_exit_row(rt, strategy)
    # exit layers come from one early-exit pass (they do not depend on the batch size)
    exit_layers = torch.cat([_early_exit_row(runtime, strategy)(b).exit_layer for b in inputs.batches(32)])
    layer_speedup = runtime.num_layers / float(exit_layers.float().mean())
    # the same saving weighted by each input's length: what it saves in token-layers, the work a layer
    # does growing with its input (linearly, attention aside). Below layer_speedup when long inputs exit late.
    tokens = torch.tensor([len(ids) for ids in inputs.encoded.input_ids], dtype=torch.float64)
    token_speedup = runtime.num_layers * float(tokens.sum()) / float((tokens * exit_layers).sum())
    results: dict[str, Any] = {
        "strategy": str(strategy),
        "num_layers": runtime.num_layers,
        "samples": len(inputs.encoded),
        "mean_tokens": round(statistics.mean(len(x) for x in inputs.encoded.input_ids), 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "repeats": repeats,
        "mean_exit_layer": round(float(exit_layers.float().mean()), 4),
        "token_layer_speedup": round(token_speedup, 4),
        "batch_sizes": {},
    }
    bar = tqdm(total=len(batch_sizes) * repeats * len(rows), desc="bench", disable=not progress, leave=False)
    with torch.inference_mode():
        for batch_size in batch_sizes:
            batches = inputs.batches(batch_size)
            for fn in rows.values():
                for b in batches[:warmup]:
                    fn(b)
            entry: dict[str, Any] = {"layer_speedup": round(layer_speedup, 4)}
            for rt in others:  # each runtime's own exits at this batch size (int8 ones can differ, and
                # dynamic int8's depend on the batch): its ratio is to the layers it saved itself
                prefix = row_prefix(rt)
                own = torch.cat([rows[f"{prefix}early_exit"](b).exit_layer for b in batches])
                entry[f"{prefix}layer_speedup"] = round(rt.num_layers / float(own.float().mean()), 4)
            per_row: dict[str, list[list[float]]] = {name: [] for name in rows}
            for _ in range(repeats):
                for name, fn in rows.items():
                    per_row[name].append(_time_pass(fn, batches))
                    bar.update(1)
            totals = {name: statistics.median(sum(p) for p in passes) for name, passes in per_row.items()}
            for name, passes in per_row.items():
                per_batch = [statistics.median(ts) for ts in zip(*passes, strict=True)]  # median over repeats
                entry[name] = {
                    "total_s": round(totals[name], 4),
                    "median_ms": round(statistics.median(per_batch) * 1000, 3),
                    "p90_ms": round(_percentile(per_batch, 0.9) * 1000, 3),
                    "throughput_per_s": round(len(inputs.encoded) / totals[name], 1),
                }
            for name in rows:
                if name != "full":
                    entry[f"{name}_wallclock_speedup"] = round(totals["full"] / totals[name], 4)
            entry["wallclock_speedup"] = entry["early_exit_wallclock_speedup"]
            for rt in (runtime, *others):
                prefix = row_prefix(rt)
                early = totals[f"{prefix}early_exit"]
                if rt is not runtime:
                    entry[f"{prefix}early_exit_vs_{prefix}full"] = round(totals[f"{prefix}full"] / early, 4)
                # the same speed-up in each pass alone: the machine's drift between passes, as a range
                pairs = zip(per_row[f"{prefix}full"], per_row[f"{prefix}early_exit"], strict=True)
                by_pass = [sum(full) / sum(exits) for full, exits in pairs]
                entry[f"{prefix}early_exit_vs_{prefix}full_passes"] = [round(min(by_pass), 4), round(max(by_pass), 4)]
                entry[f"{prefix}early_exit_vs_{prefix}all_layers"] = round(totals[f"{prefix}all_layers"] / early, 4)
            entry["wallclock_over_layer"] = round(entry["wallclock_speedup"] / layer_speedup, 4)
            results["batch_sizes"][str(batch_size)] = entry
    bar.close()
    return results


def format_bench(results: dict[str, Any]) -> str:
    lines = [
        f"strategy {results['strategy']}  ·  {results['samples']} inputs, {results['mean_tokens']} tokens on average"
        f"  ·  {results['threads']} threads"
        f"  ·  mean exit layer {results['mean_exit_layer']} of {results['num_layers']}",
        f"token-layers saved: {results['token_layer_speedup']:.2f}x (each input's layers weighted by its length; "
        "below the layer speed-up when long inputs leave late)",
        "",
        f"{'batch':>5}  {'row':<16} {'median ms':>10} {'p90 ms':>9} {'inputs/s':>9} {'wall-clock':>11} {'layers':>7} "
        f"{'ratio':>6}",
    ]
    for batch_size, entry in results["batch_sizes"].items():
        for name, row in entry.items():
            if not isinstance(row, dict):
                continue
            speed = "1.00x" if name == "full" else f"{entry[f'{name}_wallclock_speedup']:.2f}x"
            is_full = name.endswith(("full", "all_layers"))  # runs every layer
            saving = own_layer_speedup(entry, name.removesuffix("early_exit")) or math.nan
            layers = "1.00x" if is_full else f"{saving:.2f}x"
            ratio = "" if is_full else f"{entry[f'{name}_wallclock_speedup'] / saving:.2f}"
            lines.append(
                f"{batch_size:>5}  {name:<16} {row['median_ms']:>10.2f} {row['p90_ms']:>9.2f} "
                f"{row['throughput_per_s']:>9.1f} {speed:>11} {layers:>7} {ratio:>6}"
            )
        for key, value in entry.items():
            if "early_exit_vs_" not in key:
                continue
            prefix = key.split("early_exit_vs_")[0]
            name = prefix.rstrip("_").replace("_", "-") or "torch"
            saving = own_layer_speedup(entry, prefix) or math.nan
            if key.endswith("_full_passes"):
                low, high = (v / saving for v in value)
                lines.append(
                    f"{'':>5}  {name} early exit vs {name} full model, pass by pass: {value[0]:.2f}-{value[1]:.2f}x "
                    f"(ratio {low:.2f}-{high:.2f})"
                )
            elif key.endswith("_full"):
                lines.append(
                    f"{'':>5}  {name} early exit vs {name} full model: {value:.2f}x "
                    f"(ratio {value / saving:.2f} of its {saving:.2f}x layer saving)"
                )
            else:
                lines.append(
                    f"{'':>5}  {name} early exit vs its loop at full depth: {value:.2f}x "
                    f"(ratio {value / saving:.2f} of the layer saving)"
                )
    lines.append("")
    lines.append(
        "median/p90: per batch; wall-clock: full model's total time / this row's; layers: L / mean exit layer;"
    )
    lines.append("ratio: wall-clock / layer speed-up (1.00 = the layer saving shows up fully on the clock); each")
    lines.append("runtime's layer speed-up is from its own exits at that batch size (int8 exits can differ)")
    lines.append("pass by pass: the lowest and highest speed-up of one timed pass against the full model's pass")
    lines.append("beside it (the machine's drift between passes; the figures above are medians over passes)")
    lines.append("all_layers: early exit's own path made to run every layer (exit heads and decisions, no exit)")
    return "\n".join(lines)


def own_layer_speedup(entry: dict[str, Any], prefix: str) -> float | None:
    """The layer speed-up of the runtime whose rows start with ``prefix`` (``""``: PyTorch), from its own
    exits; results written before each runtime had its own fall back to PyTorch's. None when neither is a
    number (a results file edited by hand: the report page reads such files too)."""
    value = entry.get(f"{prefix}layer_speedup", entry.get("layer_speedup"))
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _full_row(runtime: Runtime) -> Callable[[Batch], Any]:
    return lambda b: runtime.full(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))


def _early_exit_row(runtime: Runtime, strategy: Strategy) -> Callable[[Batch], ExitResult]:
    return lambda b: early_exit(runtime, strategy, b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
