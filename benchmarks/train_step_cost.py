"""Seconds per optimizer step of plain fine-tuning, PABEE and the ensemble objective, on the same batches
in one run (issue 12, point 4): is the diversity term cheap?

Each method gets its own copy of the same freshly built MiniLM-L6 model with exits, the training loop's
own stage (``methods.build``), parameter groups and AdamW, and the same batches of the real task.
Rounds alternate between the methods so that they share the machine's drift; the figure per method is
the median over its timed steps (forward, loss, backward, clipping, optimizer step), after warm-up steps.

    .venv/bin/python benchmarks/train_step_cost.py --threads 1 --steps 20 --out studies/results/train_step_cost.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from layerexit import methods
from layerexit.atomic import write_json
from layerexit.config import TrainConfig
from layerexit.data.encoding import collate, encode_split, load_tokenizer
from layerexit.model import EarlyExitModel
from layerexit.training.loop import _parameter_groups

METHODS = {
    "finetune": {"objective": "finetune"},
    "pabee": {"objective": "pabee"},
    "ensemble": {"objective": "ensemble", "lam": 0.2},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--task", default="tweets-binary")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = TrainConfig(model=args.model, task=args.task, max_length=args.max_length, batch_size=args.batch_size)
    task = config.load_task()
    torch.manual_seed(0)
    base = EarlyExitModel.from_backbone(args.model, len(task.label_names), seed=0, pooling="mean")
    from layerexit.assets import resolve_encoder

    tokenizer = load_tokenizer(resolve_encoder(args.model))
    pad_id = tokenizer.pad_token_id or 0
    examples = task.splits["train"][: args.batch_size * (args.steps + args.warmup)]
    data = encode_split(tokenizer, examples, args.max_length, base.backbone.uses_token_type_ids)
    batches = [
        collate(data, list(range(i * args.batch_size, (i + 1) * args.batch_size)), pad_id)
        for i in range(args.steps + args.warmup)
    ]
    model_type = base.backbone.model.config.model_type

    runs = {}
    for name, options in METHODS.items():
        method = TrainConfig(**{**vars(config), **options})
        stage = methods.build(method.objective, base.num_layers, method.method_options(), model_type)[0]
        model = copy.deepcopy(base).train()
        optimizer = torch.optim.AdamW(_parameter_groups(model, stage, method))
        runs[name] = (model, stage, optimizer)

    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for step, batch in enumerate(batches):
        for name, (model, stage, optimizer) in runs.items():
            start = time.perf_counter()
            logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), depth=stage.depth)
            loss = stage.loss(logits.logits, batch["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    result = {
        "model": args.model,
        "task": args.task,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "mean_tokens": round(sum(len(x) for x in data.input_ids) / len(data), 1),
        "timed_steps": args.steps,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "seconds_per_step": {k: round(v, 4) for k, v in medians.items()},
        "ratio_to_finetune": {k: round(v / medians["finetune"], 3) for k, v in medians.items()},
        "lambda": METHODS["ensemble"]["lam"],
        "weighting": methods.resolve_weighting(methods.EnsembleOptions(weighting=config.weighting), model_type),
    }
    print(f"{'method':<10} {'s/step (median)':>16} {'x finetune':>11}")
    for name in METHODS:
        print(f"{name:<10} {medians[name]:>16.3f} {medians[name] / medians['finetune']:>10.3f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)
        print(f"wrote {args.out}")
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
