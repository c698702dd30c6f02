"""PyTorch in bf16 (``torch.autocast("cpu", torch.bfloat16)``) against fp32 on a run, full model and early
exit, batch 1 and 32, 2 threads, median of 3 passes over the same test inputs, ms per input; and how far
bf16's probabilities are from fp32's. On a CPU with AMX (this one) bf16 matrix products run on it.

    .venv/bin/python benchmarks/torch_bf16.py runs/demo
"""

import statistics
import sys
import time

import torch

from layerexit.data.encoding import collate
from layerexit.evaluation.evaluate import load_run_split
from layerexit.model import EarlyExitModel
from layerexit.run_folder import RunFolder
from layerexit.runtime.loop import early_exit
from layerexit.runtime.torch_runtime import TorchRuntime
from layerexit.strategies import parse

torch.set_num_threads(2)
run = RunFolder(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
model = EarlyExitModel.from_pretrained(run.path).eval()
enc, pad = load_run_split(run, "test", model, limit=200)
rt = TorchRuntime(model)
strategy = parse("entropy(threshold=0.14)")


def timed(fn):
    fn()
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) / len(enc) * 1000


for bs in (1, 32):
    batches = [collate(enc, list(range(s, min(s + bs, len(enc)))), pad) for s in range(0, len(enc), bs)]
    for name, ctx in (("fp32", None), ("bf16", torch.bfloat16)):

        def full(ctx=ctx, batches=batches):
            with torch.inference_mode(), torch.autocast("cpu", dtype=ctx, enabled=ctx is not None):
                for b in batches:
                    rt.full(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))

        def ee(ctx=ctx, batches=batches):
            with torch.inference_mode(), torch.autocast("cpu", dtype=ctx, enabled=ctx is not None):
                for b in batches:
                    early_exit(rt, strategy, b["input_ids"], b["attention_mask"], b.get("token_type_ids"))

        print(f"batch {bs:>2} {name}: full {timed(full):.3f} ms/input, early exit {timed(ee):.3f} ms/input", flush=True)
with torch.inference_mode():
    b = collate(enc, list(range(64)), pad)
    a = rt.full(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = rt.full(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
    print(
        "max prob diff bf16 vs fp32:",
        float((a - c.float()).abs().max()),
        "label agreement:",
        float((a.argmax(-1) == c.argmax(-1)).float().mean()),
    )
