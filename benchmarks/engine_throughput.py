"""The engine's own throughput, with no HTTP: 600 single-text requests submitted at once to an in-process
engine on `runs/demo` (PyTorch, 2 threads), the time until all are answered, per scheduler, median of 3.
Used to check that a change to the engine's structure costs no speed (run it before and after).

    .venv/bin/python benchmarks/engine_throughput.py
"""

import statistics
import time

import torch

from layerexit.predictor import Predictor
from layerexit.serving.engine import Engine

torch.set_num_threads(2)
p = Predictor.from_run("runs/demo", "entropy(threshold=0.14)", threads=2, runtime="torch")
words = "the service was great but the delay was long and nobody answered my calls today again".split()  # noqa: SIM905
texts = [" ".join(words[i % 7 : i % 7 + 5 + i % 9]) for i in range(600)]
enc = p.encode(texts)
rows = [(ids, None) for ids in enc.input_ids]
for sched in ["pooled", "batch"]:
    times = []
    for _ in range(3):
        e = Engine(p.runtime, p.strategy, scheduler=sched, max_queue=1000, threads=2)
        t = time.perf_counter()
        reqs = [e.submit([r]) for r in rows]
        for r in reqs:
            r.future.result(60)
        times.append(time.perf_counter() - t)
        e.close()
    print(sched, "median s", round(statistics.median(times), 3), [round(x, 3) for x in times])
