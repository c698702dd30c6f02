"""Where the time of a layer-by-layer loop goes, at batch 1 on MiniLM-L6 (issue: the naive loop was
slower than the whole model). Prints medians over interleaved rounds, in milliseconds.

    .venv/bin/python benchmarks/layer_loop.py --threads 2 --tokens 32 --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoModel

from layerexit import strategies
from layerexit.assets import resolve_encoder
from layerexit.backbones import wrap
from layerexit.model import EarlyExitModel, ExitConfig
from layerexit.runtime.loop import early_exit_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of the early-exit loop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder = AutoModel.from_pretrained(resolve_encoder("minilm-l6")).eval()
    encoder.pooler = None
    backbone = wrap(encoder)
    model = EarlyExitModel(backbone, ExitConfig(backbone="minilm-l6", num_labels=2)).eval()
    ids = torch.randint(1000, 20000, (1, args.tokens))
    ids[0, 0], ids[0, -1] = 101, 102
    mask = torch.ones_like(ids)

    def naive_float_mask() -> None:
        hidden = backbone.embed(ids, mask)
        additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min  # (1, 1, 1, T) zeros
        for layer in encoder.encoder.layer:
            hidden = layer(hidden, additive)

    rows: dict[str, Callable[[], object]] = {
        "HF forward, mask given": lambda: encoder(input_ids=ids, attention_mask=mask),
        "HF forward, no mask": lambda: encoder(input_ids=ids),
        "naive loop, additive float mask": naive_float_mask,
        "layerexit loop (model's own mask)": lambda: backbone.forward_all(ids, mask),
        "early exit, all 6 layers + exits": lambda: early_exit_forward(model, strategies.Static(layer=6), ids, mask),
        "early exit, voting to layer 6": lambda: early_exit_forward(
            model, strategies.Voting(k=0.5, threshold=99.0), ids, mask
        ),
        "early exit at layer 4": lambda: early_exit_forward(model, strategies.Static(layer=4), ids, mask),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    with torch.inference_mode():
        for fn in rows.values():
            for _ in range(5):
                fn()
        for _ in range(args.rounds):
            for name, fn in rows.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1000)
    base = statistics.median(times["HF forward, mask given"])
    print(f"MiniLM-L6, batch 1, {args.tokens} tokens, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"attention implementation: {encoder.config._attn_implementation}")
    print(f"{'row':<36} {'median ms':>10} {'p90 ms':>8} {'vs HF':>7}")
    for name, values in times.items():
        values.sort()
        med = statistics.median(values)
        print(f"{name:<36} {med:>10.2f} {values[int(0.9 * (len(values) - 1))]:>8.2f} {med / base:>6.2f}x")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                early_exit_forward(model, strategies.Voting(k=0.5, threshold=99.0), ids, mask)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
