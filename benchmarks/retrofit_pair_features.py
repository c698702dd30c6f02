"""Would sentence-pair features make a pair classifier's shallow exits stronger? A measurement on cached states.

Exits of a retrofitted snli-binary classifier are weak at shallow depth (docs/retrofit.md). This script
caches, for every internal layer, the mean of the whole input's tokens (today's exits) and the means of
each sentence of the pair on its own, u and v (from the token types), then trains the same one-hidden-layer
MLP exits by distillation on either input: the mean (H values) or the pair features [u, v, |u - v|, u * v]
(4H values, as sentence-pair models compare two sentence embeddings). Scored as the retrofit sweep is: the
fastest entropy or max-prob threshold at <= 1% dev disagreement with the classifier, replayed, not certified.
The runtime cannot run pair-feature exits yet (they need the token types at every layer): this only says
whether they are worth carrying there.

    .venv/bin/python benchmarks/retrofit_pair_features.py --classifier runs/classifiers/snli-binary-minilm \\
        --max-train 20000 --out runs/retrofit-bench/pair-features.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from retrofit import fastest_at
from torch import Tensor, nn

from layerexit.data.encoding import batches, encode_split, load_tokenizer
from layerexit.model import EarlyExitModel
from layerexit.pooling import pool
from layerexit.training.retrofit import RetrofitConfig


@torch.inference_mode()
def cache(model: EarlyExitModel, data, pad: int) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[no-untyped-def]
    """(L-1, N, H) means, (L-1, N, 4H) pair features, (N, C) the classifier's logits."""
    layers, n, h = model.num_layers, len(data), model.backbone.hidden_size
    means, pairs, reference = torch.empty(layers - 1, n, h), torch.empty(layers - 1, n, 4 * h), torch.empty(n, 2)
    for batch in batches(data, 64, pad, by_length=True):
        mask, types, rows = batch["attention_mask"], batch["token_type_ids"], batch["index"]
        first, second = mask * (types == 0), mask * (types == 1)
        hidden = model.backbone.embed(batch["input_ids"], mask, types)
        kwargs = model.backbone.layer_kwargs(hidden, mask)
        for i in range(layers):
            hidden = model.backbone.layer(i, hidden, kwargs)
            if i < layers - 1:
                means[i, rows] = pool(hidden, mask, "mean")
                u, v = pool(hidden, first, "mean"), pool(hidden, second, "mean")
                pairs[i, rows] = torch.cat([u, v, (u - v).abs(), u * v], -1)
        reference[rows] = model.exits[-1](hidden, mask).float()
    return means, pairs, reference


def train(states: Tensor, reference: Tensor, epochs: int, lr: float, seed: int) -> list[nn.Module]:
    torch.manual_seed(seed)
    width, hidden = states.shape[-1], states.shape[-1] if states.shape[-1] < 1000 else states.shape[-1] // 4
    heads = [
        nn.Sequential(nn.Dropout(0.1), nn.Linear(width, hidden), nn.Tanh(), nn.Dropout(0.1), nn.Linear(hidden, 2))
        for _ in range(states.shape[0])
    ]
    optimizer = torch.optim.AdamW([p for h in heads for p in h.parameters()], lr=lr, weight_decay=0.01)
    n, size = states.shape[1], 128
    total = math.ceil(n / size) * epochs
    warm = max(1, int(0.05 * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / (total - warm))
    )
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for h in heads:
            h.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, size):
            rows = order[start : start + size]
            target = reference[rows].log_softmax(-1)
            loss = sum(
                F.kl_div(h(states[i, rows]).log_softmax(-1), target, reduction="batchmean", log_target=True)
                for i, h in enumerate(heads)
            )
            optimizer.zero_grad()
            loss.backward()  # type: ignore[union-attr]
            optimizer.step()
            schedule.step()
    for h in heads:
        h.eval()
    return heads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", type=Path, required=True)
    parser.add_argument("--task", default="snli-binary")
    parser.add_argument("--max-train", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = EarlyExitModel.from_classifier(str(args.classifier))
    tokenizer = load_tokenizer(args.classifier)
    config = RetrofitConfig(classifier=str(args.classifier), task=args.task, max_train=args.max_train)
    task = config.train_config("").load_task().relabelled(list(model.config.label_names))
    pad = tokenizer.pad_token_id or 0
    started = time.perf_counter()
    train_means, train_pairs, train_ref = cache(model, encode_split(tokenizer, task.splits["train"], 64, True), pad)
    dev_means, dev_pairs, dev_ref = cache(model, encode_split(tokenizer, task.splits["dev"], 64, True), pad)
    results: dict[str, object] = {"encoder_seconds": round(time.perf_counter() - started, 1), "args": vars(args)}
    for name, train_states, dev_states in (("mean", train_means, dev_means), ("pair", train_pairs, dev_pairs)):
        started = time.perf_counter()
        heads = train(train_states, train_ref, args.epochs, args.lr, seed=0)
        with torch.no_grad():
            probs = torch.stack([h(dev_states[i]).softmax(-1) for i, h in enumerate(heads)] + [dev_ref.softmax(-1)])
        agreement = (probs.argmax(-1) == probs[-1].argmax(-1)).float().mean(-1)
        results[name] = {
            "train_seconds": round(time.perf_counter() - started, 1),
            "dev_agreement_per_exit": [round(float(a), 4) for a in agreement],
            "dev_at_1pct": fastest_at(probs, 0.01),
        }
        print(name, json.dumps(results[name]), flush=True)
    results["args"] = {k: str(v) for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
