"""The one training loop. Methods differ only in their stages (:mod:`layerexit.objectives`)."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from layerexit import losses, objectives
from layerexit.config import TrainConfig, save_config
from layerexit.encoding import Encoded, batches, encode, load_tokenizer
from layerexit.errors import LayerExitError
from layerexit.evaluate import collect_probs, per_layer_scores
from layerexit.model import EarlyExitModel

TRAIN_LOG = "train_log.jsonl"
SUMMARY = "train_summary.json"
DATA_INFO = "data.json"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is a dependency, but seeding must not be what breaks
        pass


def resolve_pooling(config: TrainConfig, encoder_path: str) -> str:
    """``auto``: mean pooling for sentence-transformers encoders (trained with it), else the first token.

    Measured on MiniLM-L6 (a sentence-transformer): first-token exits on layers 1-3 stayed at the
    majority class after 2 epochs, mean-pooled ones learned (DESIGN.md section 1).
    """
    if config.pooling != "auto":
        return config.pooling
    folder = Path(encoder_path)
    sentence_transformer = (folder / "modules.json").is_file() or (folder / "1_Pooling").is_dir()
    return "mean" if sentence_transformer else "first"


def encode_split(tokenizer: Any, examples: list[Any], max_length: int, token_types: bool) -> Encoded:
    return encode(
        tokenizer,
        [e.text for e in examples],
        [e.text_pair for e in examples] if any(e.text_pair is not None for e in examples) else None,
        [e.label for e in examples],
        max_length=max_length,
        token_types=token_types,
    )


def train(config: TrainConfig, *, progress: bool = True) -> Path:
    """Train an early-exit model as ``config`` says; returns the run folder."""
    from layerexit.assets import resolve_encoder

    run_dir = Path(config.output or Path("runs") / config.run_name())
    if run_dir.exists() and any(run_dir.iterdir()):
        raise LayerExitError(f"{run_dir} already exists and is not empty; choose another --output or remove it")
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)

    task = config.load_task()
    for split in ("train", "dev"):
        if not task.splits.get(split):
            raise LayerExitError(f"task {task.name!r} has no {split} examples")

    encoder_path = resolve_encoder(config.model)
    tokenizer = load_tokenizer(encoder_path)
    model = EarlyExitModel.from_backbone(
        config.model,
        task.num_labels,
        seed=config.seed,
        head=config.head,
        pooling=resolve_pooling(config, encoder_path),
        label_names=list(task.label_names),
    )
    token_types = model.backbone.uses_token_type_ids
    encoded = {
        name: encode_split(tokenizer, examples, config.max_length, token_types)
        for name, examples in task.splits.items()
        if examples
    }

    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.json")
    info = {
        "task": task.name,
        "label_names": list(task.label_names),
        "metric": task.metric,
        "sizes": {k: len(v) for k, v in task.splits.items()},
        "info": task.info,
    }
    (run_dir / DATA_INFO).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")

    stages = objectives.build(
        config.objective,
        model.num_layers,
        lam=config.lam,
        weighting=config.weighting,
        drop_last_diversity=config.drop_last_diversity,
        detach_target=config.detach_teacher,
        min_over=config.min_over,
        static_layers=config.static_layers or None,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    started = time.perf_counter()
    summary: dict[str, Any] = {"stages": []}
    with (run_dir / TRAIN_LOG).open("a", encoding="utf-8") as log:
        for stage in stages:
            result = fit_stage(
                model,
                stage,
                encoded["train"],
                encoded["dev"],
                config,
                pad_id,
                run_dir,
                tokenizer,
                log,
                task.metric,
                progress,
            )
            summary["stages"].append(result)
            model = EarlyExitModel.from_pretrained(run_dir)  # continue from the stage's best checkpoint
    if config.objective == "righttool":
        summary["temperatures"] = calibrate_temperatures(model, encoded["dev"], config, pad_id, run_dir, tokenizer)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["config"] = asdict(config)
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return run_dir


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> float:
    """The temperature T minimising the dev NLL of softmax(logits / T) (Guo et al., 2017). logits: (N, C)."""
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def calibrate_temperatures(
    model: EarlyExitModel, dev: Encoded, config: TrainConfig, pad_id: int, run_dir: Path, tokenizer: Any
) -> list[float]:
    """RightTool: fit one temperature per exit on dev, store it in the saved model."""
    probs = collect_probs(model, dev, config.eval_batch_size, pad_id)  # (L, N, C)
    logits = probs.clamp_min(1e-12).log()  # equal to the logits up to a per-row constant
    temperatures = [fit_temperature(layer_logits, dev.labels) for layer_logits in logits]
    model.set_temperatures(temperatures)
    model.save_pretrained(run_dir, tokenizer)
    return [round(t, 4) for t in temperatures]


def _parameter_groups(model: EarlyExitModel, stage: objectives.Stage, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: encoder and exits at their own rates, no decay on biases and norms."""
    frozen_encoder = stage.trainable == "internal_exits"
    trainable_exits = range(model.num_layers - 1) if frozen_encoder else range(stage.depth)
    for p in model.parameters():
        p.requires_grad_(False)
    groups: list[dict[str, Any]] = []

    def add(named: list[tuple[str, torch.nn.Parameter]], lr: float) -> None:
        for p in (p for _, p in named):
            p.requires_grad_(True)
        decay = [p for n, p in named if p.dim() > 1]
        no_decay = [p for n, p in named if p.dim() <= 1]
        groups.extend(
            g
            for g in (
                {"params": decay, "lr": lr, "weight_decay": config.weight_decay},
                {"params": no_decay, "lr": lr, "weight_decay": 0.0},
            )
            if g["params"]
        )

    if not frozen_encoder:
        add(list(model.backbone.named_parameters()), config.lr)
    add([(n, p) for i in trainable_exits for n, p in model.exits[i].named_parameters()], config.head_lr)
    return groups


def fit_stage(
    model: EarlyExitModel,
    stage: objectives.Stage,
    train_data: Encoded,
    dev_data: Encoded,
    config: TrainConfig,
    pad_id: int,
    run_dir: Path,
    tokenizer: Any,
    log: Any,
    metric: str,
    progress: bool,
) -> dict[str, Any]:
    """Train one stage for ``config.epochs`` epochs; keep the checkpoint with the best dev score."""
    groups = _parameter_groups(model, stage, config)
    optimizer = torch.optim.AdamW(groups)
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = int(total * config.warmup_ratio)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(config.seed)
    closest = torch.zeros(model.num_layers, model.num_layers, dtype=torch.long)  # (i, j) counts, Figure 6b
    best: dict[str, Any] = {"score": -math.inf}
    step = 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        if stage.trainable == "internal_exits":
            model.backbone.eval()  # a frozen encoder also keeps its dropout off
        bar = tqdm(
            total=steps_per_epoch, desc=f"{stage.name} epoch {epoch}/{config.epochs}", disable=not progress, leave=False
        )
        running = 0.0
        for batch in batches(train_data, config.batch_size, pad_id, shuffle=True, generator=generator):
            logits = model(
                batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), depth=stage.depth
            ).logits  # (depth, B, C)
            loss = stage.loss(logits, batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            if logits.shape[0] > 1:
                pick = losses.closest_earlier_exit(logits.detach())  # (depth - 1,)
                closest[torch.arange(1, logits.shape[0]), pick - 1] += 1
            running += float(loss.detach())
            bar.update(1)
            if step % config.log_every == 0:
                bar.set_postfix(loss=f"{running / config.log_every:.4f}")
                log.write(
                    json.dumps(
                        {
                            "stage": stage.name,
                            "epoch": epoch,
                            "step": step,
                            "loss": round(running / config.log_every, 5),
                        }
                    )
                    + "\n"
                )
                log.flush()
                running = 0.0
        bar.close()
        probs = collect_probs(model, dev_data, config.eval_batch_size, pad_id, progress=progress, depth=stage.depth)
        scores = per_layer_scores(probs, dev_data.labels, metric)
        score = sum(scores[i - 1] for i in stage.exits) / len(stage.exits)
        record = {
            "stage": stage.name,
            "epoch": epoch,
            "step": step,
            "dev_" + metric: [round(s, 4) for s in scores],
            "selection_score": round(score, 5),
        }
        log.write(json.dumps(record) + "\n")
        log.flush()
        if progress:
            tqdm.write(f"{stage.name} epoch {epoch}: dev {metric} per exit " + " ".join(f"{s:.3f}" for s in scores))
        if score > best["score"]:
            best = {"score": score, "epoch": epoch, "dev_scores": scores}
            model.save_pretrained(run_dir, tokenizer)
    (run_dir / f"closest_exit_{stage.name}.json").write_text(
        json.dumps(
            {"counts": closest.tolist(), "note": "row i (1-based i+1): times exit j+1 was the closest earlier exit"}
        )
        + "\n",
        encoding="utf-8",
    )
    return {
        "stage": stage.name,
        "best_epoch": best["epoch"],
        "selection_score": round(best["score"], 5),
        "dev_scores": [round(s, 4) for s in best["dev_scores"]],
        "steps": step,
    }
