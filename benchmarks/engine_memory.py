"""Does the pooled engine keep anything per request? Python allocations (tracemalloc) and resident memory
after 2,000 and after 12,000 single-text requests to an in-process engine on `runs/demo`.

    .venv/bin/python benchmarks/engine_memory.py

Python allocations that grew with requests would show here by line; resident memory that grows while they
do not is the native side (PyTorch's allocator and kernel caches for new batch shapes)."""

import gc
import random
import tracemalloc

import torch

from layerexit.predictor import Predictor
from layerexit.serving.engine import Engine

torch.set_num_threads(1)
p = Predictor.from_run("runs/demo", "maxprob(threshold=0.93)", threads=1, runtime="torch")
words = "the service was great but the delay was long and nobody answered my calls today again".split()  # noqa: SIM905
rng = random.Random(0)
texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) for _ in range(3000)]
rows = [(ids, None) for ids in p.encode(texts).input_ids]
e = Engine(p.runtime, p.strategy, scheduler="pooled", max_queue=2000, threads=1)


def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024


def burst(n):
    reqs = []
    for _ in range(n):
        reqs.append(e.submit([rows[rng.randrange(len(rows))]]))
        if len(reqs) >= 64:
            for r in reqs:
                r.future.result(60)
            reqs = []
    for r in reqs:
        r.future.result(60)


burst(2000)
gc.collect()
tracemalloc.start()
s1 = tracemalloc.take_snapshot()
r1 = rss()
burst(10000)
gc.collect()
s2 = tracemalloc.take_snapshot()
r2 = rss()
stats = s2.compare_to(s1, "lineno")
print("RSS MB after 2k:", r1, "after 12k:", r2)
print("python allocations grown (top 5):")
for st in stats[:5]:
    print("  ", st)
print("total python growth KB:", sum(st.size_diff for st in stats) // 1024)
print("held:", len(e.scheduler.rows), e.runner.held, len(e.runner._blocks))
e.close()
