"""Why the serving engine runs in a process of its own: the GIL convoy, timed.

PyTorch lets go of the GIL around each operator and takes it back after. Beside a thread that is busy in
Python (an HTTP event loop under load), taking it back waits for that thread's switch interval
(``sys.getswitchinterval()``, 5 ms by default), at almost every operator. This times MiniLM-L6's embeddings
and six layers with their exits at batch 1 through the PyTorch runtime (the serving engine's step):

* alone;
* beside a thread of the same process busy with JSON (what uvicorn does per request), at the default
  switch interval and at a tenth of it;
* beside the same busy work in another process (what ``layerexit serve --engine process`` does).

    .venv/bin/python benchmarks/gil_convoy.py --out studies/serving/gil_convoy.json

Medians over ``--repeats`` passes, one torch thread; run it on a quiet machine (two cores: the busy
thread takes one).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from layerexit.atomic import write_json
from layerexit.model import EarlyExitModel
from layerexit.runtime.torch_runtime import TorchRuntime


def busy(stop: Any) -> None:
    body = {"texts": ["a tweet of a dozen words or so, as the load test sends"] * 4}
    while not stop.is_set():
        json.loads(json.dumps(body))


def passes(runtime: TorchRuntime, ids: torch.Tensor, repeats: int) -> float:
    mask = torch.ones_like(ids)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            rows = runtime.embed(ids, mask)
            for layer in range(1, runtime.num_layers + 1):
                rows, _ = runtime.layer(layer, rows)
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--tokens", type=int, default=24, help="input length (a tweet is about 24 tokens)")
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    runtime = TorchRuntime(EarlyExitModel.from_backbone(args.model, 2, seed=0))
    ids = torch.randint(1000, 2000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    passes(runtime, ids, 10)  # warm-up
    default = sys.getswitchinterval()
    results: dict[str, float] = {"alone": passes(runtime, ids, args.repeats)}
    for name, interval in (("busy thread, switch interval 5 ms", default), ("busy thread, 0.5 ms", default / 10)):
        sys.setswitchinterval(interval)
        stop = threading.Event()
        worker = threading.Thread(target=busy, args=(stop,))
        worker.start()
        results[name] = passes(runtime, ids, args.repeats)
        stop.set()
        worker.join()
    sys.setswitchinterval(default)
    context = multiprocessing.get_context("spawn")
    stop_process = context.Event()
    other = context.Process(target=busy, args=(stop_process,))
    other.start()
    time.sleep(1.0)
    results["busy process"] = passes(runtime, ids, args.repeats)
    stop_process.set()
    other.join()
    width = max(map(len, results))
    print(f"{args.model}, batch 1, {args.tokens} tokens, embeddings + {runtime.num_layers} layers, median ms:")
    for name, ms in results.items():
        print(f"  {name:<{width}}  {ms:8.1f}  ({ms / results['alone']:.1f}x)")
    if args.out:
        write_json(
            args.out, {"model": args.model, "tokens": args.tokens, "repeats": args.repeats, "median_ms": results}
        )


if __name__ == "__main__":
    main()
