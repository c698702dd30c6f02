"""The one training loop. Methods differ only in their stages (:mod:`layerexit.methods`)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from tqdm.auto import tqdm

from layerexit import losses, metrics
from layerexit.atomic import write_text
from layerexit.config import TrainConfig, save_config
from layerexit.data.encoding import Encoded, collate, encode_split, load_tokenizer, separator_id
from layerexit.errors import LayerExitError
from layerexit.methods import METHODS, Stage
from layerexit.model import EarlyExitModel, check_state
from layerexit.run_folder import RunFolder
from layerexit.runtime.loop import model_probs
from layerexit.training import checkpoint, retrofit, reuse
from layerexit.training.distributed import Processes
from layerexit.training.recipe import (
    calibrate_temperatures,
    parameter_groups,
    resolve_pooling,
    seed_everything,
    teacher_probs,
)


def train(
    config: TrainConfig, *, progress: bool = True, resume: bool = False, first_stage_from: Path | None = None
) -> Path:
    """Train an early-exit model as ``config`` says; returns the run folder.

    Run under ``accelerate launch`` (or ``layerexit train --num-processes N``), every process calls
    this; process 0 alone writes files. ``resume`` continues the run in ``config.output`` from its
    checkpoint, with the same result as a run that was never interrupted. ``first_stage_from``, a
    finished run that trained this run's first stage (a ``finetune`` run for ``deebert``), starts
    training at the second stage from its weights, with the same result (:mod:`.reuse`).
    """
    from layerexit.assets import resolve_encoder

    run_dir = Path(config.output or Path("runs") / config.run_name())
    runtime = Processes(config.mixed_precision)
    progress = progress and runtime.is_main
    start: checkpoint.Checkpoint | None = None
    if resume:
        found = checkpoint.find(run_dir, config, runtime.world)
        if found == checkpoint.FINISHED:
            if runtime.is_main:
                checkpoint.remove(run_dir)
                if progress:
                    tqdm.write(f"{run_dir}: training had finished; nothing to resume")
            return run_dir
        start = found if isinstance(found, checkpoint.Checkpoint) else None
        if progress:
            tqdm.write(f"resuming {run_dir} from {_where(start.position, config) if start else 'the beginning'}")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise LayerExitError(f"{run_dir} already exists and is not empty; choose another --output or remove it")
    runtime.barrier()  # every process has looked at the folder before process 0 writes to it
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)

    task = config.load_task()
    for split in ("train", "dev"):
        if not task.splits.get(split):
            raise LayerExitError(f"task {task.name!r} has no {split} examples")

    encoder_path = resolve_encoder(config.model)
    tokenizer = load_tokenizer(encoder_path)
    pooling = resolve_pooling(config, encoder_path)
    if pooling == "pair" and not task.has_pairs:
        raise LayerExitError(f"--pooling pair is for inputs of two texts; task {task.name!r} has single texts")
    with _transformers_progress(progress):
        model = EarlyExitModel.from_backbone(
            config.model,
            task.num_labels,
            seed=config.seed,
            head=config.head,
            pooling=pooling,
            separator_id=separator_id(tokenizer) if pooling == "pair" else None,
            label_names=list(task.label_names),
            dropout=config.exit_dropout,
        )
    positions = model.backbone.max_positions
    if positions is not None and config.max_length > positions:
        raise LayerExitError(f"--max-length {config.max_length} exceeds the encoder's {positions} positions")
    token_types = model.backbone.uses_token_type_ids
    encoded = {
        name: encode_split(tokenizer, examples, config.max_length, token_types)
        for name, examples in task.splits.items()
        if examples
    }
    method = METHODS[config.objective]
    try:
        stages = method.build(model.num_layers, config.method_options(), model.backbone.model.config.model_type)
    except ValueError as err:
        raise LayerExitError(str(err)) from None
    if start is not None and not 0 <= start.position.stage < len(stages):
        raise LayerExitError(f"{start.path}: stage {start.position.stage} does not exist in {config.objective!r}")
    source = Path(first_stage_from) if first_stage_from is not None and start is None else None
    done: list[dict[str, Any]] = list(start.state["results"]) if start else []  # finished stages
    if source is not None:
        done = [{**reuse.first_stage_result(source, config, stages), "trained_in": str(source)}]
    log_offset = int(start.state["log_offset"]) if start else 0

    if runtime.is_main and start is None:  # a resumed run's files stay as they are until it is under way
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, RunFolder(run_dir).config_file)
        RunFolder(run_dir).write_task(task)
        if source is not None:
            log_offset = reuse.copy_first_stage_files(source, run_dir, stages[0].name)
    if source is not None:
        with _transformers_progress(progress):
            model = EarlyExitModel.from_pretrained(source)
        if runtime.is_main:
            model.save_pretrained(run_dir, tokenizer)
    run = _Run(
        config=config,
        runtime=runtime,
        run_dir=run_dir,
        tokenizer=tokenizer,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        metric=task.metric,
        progress=progress,
        log_offset=log_offset,
        results=done,
        seconds=float(start.state["seconds"]) if start else 0.0,
    )
    try:
        first = start.position.stage if start is not None else len(done)
        for index, stage in enumerate(stages[first:], start=first):
            if index > 0:  # a later stage's dropout does not depend on how the one before it ran
                seed_everything(config.seed + index)
            here = start if start is not None and index == start.position.stage else None
            if stage.trainable == "cached_exits":  # minutes on process 0, no checkpoints: a resume starts it again
                result: dict[str, Any] = {}
                if runtime.is_main:
                    result = retrofit.fit_cached_stage(
                        model, stage.name, config, tokenizer, encoded["train"], encoded["dev"],
                        pairs=task.has_pairs, metric=task.metric, progress=progress,
                    )  # fmt: skip
                    model.save_pretrained(run_dir, tokenizer)
                run.results.append(result)
            else:
                run.results.append(fit_stage(model, stage, index, encoded["train"], encoded["dev"], run, resume=here))
            runtime.barrier()
            with _transformers_progress(progress):
                model = EarlyExitModel.from_pretrained(run_dir)  # continue from the stage's best checkpoint
    finally:
        run.close_log()
    if not runtime.is_main:
        return run_dir
    summary: dict[str, Any] = {"stages": run.results}
    if method.after_training is not None:
        summary["temperatures"] = calibrate_temperatures(
            model, encoded["dev"], config, run.pad_id, run_dir, tokenizer, method.after_training
        )
    summary["seconds"] = round(run.elapsed(), 1)
    summary["processes"] = runtime.world
    summary["config"] = asdict(config)
    write_text(RunFolder(run_dir).summary_file, json.dumps(summary, indent=2) + "\n")
    checkpoint.remove(run_dir)
    return run_dir


def _where(position: checkpoint.Position, config: TrainConfig) -> str:
    stage = f"stage {position.stage + 1}"
    if position.epoch > config.epochs:
        return f"the end of {stage}"
    return f"{stage}, epoch {position.epoch}, after {position.step} optimizer steps"


@contextlib.contextmanager
def _transformers_progress(show: bool) -> Iterator[None]:
    """Transformers' own progress bars (loading weights) follow ``--quiet`` too."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not show:
            hf_logging.enable_progress_bar()


@dataclass
class _Run:
    """What the stages of one run share."""

    config: TrainConfig
    runtime: Processes
    run_dir: Path
    tokenizer: Any
    pad_id: int
    metric: str
    progress: bool
    log_offset: int
    """Where ``train_log.jsonl`` is cut back to when it is first opened (a resumed run's checkpoint)."""
    results: list[dict[str, Any]]
    """Finished stages."""
    seconds: float
    """Training time before this process took over (a resumed run)."""
    started: float = field(default_factory=time.perf_counter)
    _log: BinaryIO | None = None

    def log_file(self) -> BinaryIO:
        """``train_log.jsonl`` (process 0), opened on first use: after a resumed checkpoint proved sound."""
        if self._log is None:
            self._log = _open_log(RunFolder(self.run_dir).train_log_file, self.log_offset)
        return self._log

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self.started

    def write_log(self, record: dict[str, Any]) -> None:
        if self.runtime.is_main:
            try:
                log = self.log_file()
                log.write((json.dumps(record) + "\n").encode("utf-8"))
                log.flush()
            except OSError as err:
                raise OSError(err.errno, err.strerror, str(RunFolder(self.run_dir).train_log_file)) from err


def _open_log(path: Path, offset: int) -> BinaryIO:
    """The training log, cut back to ``offset`` bytes (where the checkpoint being resumed had it)."""
    size = path.stat().st_size if path.exists() else 0
    if size < offset:
        raise LayerExitError(f"{path} is shorter ({size} bytes) than its checkpoint says ({offset}); cannot resume")
    if path.exists():
        os.truncate(path, offset)
    return path.open("ab")


def fit_stage(
    model: EarlyExitModel,
    stage: Stage,
    index: int,
    train_data: Encoded,
    dev_data: Encoded,
    run: _Run,
    *,
    resume: checkpoint.Checkpoint | None = None,
) -> dict[str, Any]:
    """Train one stage for ``config.epochs`` epochs; keep the checkpoint with the best dev score.

    Each optimizer step takes ``grad_accum`` batches of ``batch_size`` rows; every batch is shared
    out among the processes (:mod:`layerexit.training.distributed`). Returns the stage's result on process 0.
    """
    config, runtime = run.config, run.runtime
    model.to(runtime.device)
    targets = train_data.labels
    if stage.targets == "teacher":  # the model as the stage before left it, before any step of this one
        where = RunFolder(run.run_dir).teacher_file(stage.name)
        targets = teacher_probs(
            model, train_data, config, run.pad_id, where, write=runtime.is_main, progress=run.progress
        )
    groups = parameter_groups(model, stage, config)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups)
    n, size = len(train_data), config.batch_size
    batches_per_epoch = math.ceil(n / size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
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
    step, first_epoch, skip, running = 0, 1, 0, 0.0
    model.zero_grad(set_to_none=True)

    def save(position: checkpoint.Position, data_order: torch.Tensor) -> None:
        _save_checkpoint(run, position, model, optimizer, scheduler, data_order, running, best, closest)

    if resume is None:
        save(checkpoint.Position(index, 1, 0, 0), generator.get_state())
    else:
        position = resume.position
        if not (1 <= position.epoch <= config.epochs + 1 and 0 <= position.batch <= batches_per_epoch):
            raise LayerExitError(f"{resume.path}: position {position} does not fit this run")
        try:
            _restore(resume, model, optimizer, scheduler, runtime)
            generator.set_state(resume.rng["data_order"])
            closest = torch.tensor(resume.state["closest"], dtype=torch.long)
            if closest.shape != (model.num_layers, model.num_layers):
                raise ValueError(f"closest-exit counts have shape {tuple(closest.shape)}")
            best = checkpoint.best_from_json(resume.state["best"])
            running = float(resume.state["running"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise LayerExitError(f"{resume.path}: damaged checkpoint ({err})") from None
        step, first_epoch, skip = position.step, position.epoch, position.batch

    for epoch in range(first_epoch, config.epochs + 1):
        model.train()
        if stage.trainable == "internal_exits":
            model.backbone.eval()  # a frozen encoder also keeps its dropout off
        epoch_start = generator.get_state()
        order = torch.randperm(n, generator=generator).tolist()
        if epoch != first_epoch or skip == 0:
            skip, running = 0, 0.0
        bar = tqdm(
            total=batches_per_epoch,
            initial=skip,
            desc=f"{stage.name} epoch {epoch}/{config.epochs}",
            disable=not run.progress,
            leave=False,
        )
        window_loss = 0.0
        for b in range(skip, batches_per_epoch):
            window = b // config.grad_accum
            window_end = min((window + 1) * config.grad_accum, batches_per_epoch)
            window_rows = min(window_end * size, n) - window * config.grad_accum * size
            rows = order[b * size : (b + 1) * size]
            local, sizes = runtime.shard(rows)
            local_logits = None
            if local:
                batch = {k: v.to(runtime.device) for k, v in collate(train_data, local, run.pad_id).items()}
                with runtime.autocast():
                    local_logits = model(
                        batch["input_ids"],
                        batch["attention_mask"],
                        batch.get("token_type_ids"),
                        depth=stage.depth,
                        equilibrium=stage.equilibrium,
                    ).logits  # (depth, b_r, C)
            logits = runtime.gather_rows(local_logits, sizes, (stage.depth, model.num_labels))  # (depth, B, C)
            loss_fn = stage.alternate if stage.alternate is not None and step % 2 == 1 else stage.loss
            assert loss_fn is not None  # a stage without one trains on cached states, not here
            loss = loss_fn(logits, targets[rows].to(runtime.device))
            weight = len(rows) / window_rows  # the step's loss is the mean over its rows
            if local:
                runtime.backward(loss if weight == 1.0 else loss * weight)
            window_loss += float(loss.detach()) * weight
            if logits.shape[0] > 1:
                pick = losses.closest_earlier_exit(logits.detach()).cpu()  # (depth - 1,)
                closest[torch.arange(1, logits.shape[0]), pick - 1] += 1
            bar.update(1)
            if b + 1 < window_end:
                continue
            _optimizer_step(runtime, optimizer, scheduler, params, config.max_grad_norm)
            step += 1
            running += window_loss
            window_loss = 0.0
            if step % config.log_every == 0:
                bar.set_postfix(loss=f"{running / config.log_every:.4f}")
                run.write_log(
                    {"stage": stage.name, "epoch": epoch, "step": step, "loss": round(running / config.log_every, 5)}
                )
                running = 0.0
            if config.checkpoint_every and step % config.checkpoint_every == 0 and b + 1 < batches_per_epoch:
                save(checkpoint.Position(index, epoch, b + 1, step), epoch_start)
        bar.close()
        if runtime.is_main:
            probs = model_probs(
                model, dev_data, config.eval_batch_size, run.pad_id, progress=run.progress, depth=stage.depth
            )
            scores = metrics.per_layer_scores(probs, dev_data.labels, run.metric)
            score = sum(scores[i - 1] for i in stage.exits) / len(stage.exits)
            run.write_log(
                {
                    "stage": stage.name,
                    "epoch": epoch,
                    "step": step,
                    "dev_" + run.metric: [round(s, 4) for s in scores],
                    "selection_score": round(score, 5),
                }
            )
            if run.progress:
                tqdm.write(
                    f"{stage.name} epoch {epoch}: dev {run.metric} per exit " + " ".join(f"{s:.3f}" for s in scores)
                )
            if score > best["score"]:
                best = {"score": score, "epoch": epoch, "dev_scores": scores}
                model.save_pretrained(run.run_dir, run.tokenizer)
        save(checkpoint.Position(index, epoch + 1, 0, step), generator.get_state())
    if not runtime.is_main:
        return {}
    write_text(
        RunFolder(run.run_dir).closest_exit_file(stage.name),
        json.dumps(
            {"counts": closest.tolist(), "note": "row i (1-based i+1): times exit j+1 was the closest earlier exit"}
        )
        + "\n",
    )
    return {
        "stage": stage.name,
        "best_epoch": best["epoch"],
        "selection_score": round(best["score"], 5),
        "dev_scores": [round(s, 4) for s in best["dev_scores"]],
        "steps": step,
    }


def _optimizer_step(
    runtime: Processes,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: list[torch.nn.Parameter],
    max_grad_norm: float,
) -> None:
    """Sum the processes' gradients, clip, step (through the fp16 scaler where there is one)."""
    runtime.sum_gradients(params)
    scaler = runtime.scaler
    if scaler is None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
    else:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if scaler.get_scale() >= scale:  # the step was not skipped for an overflow
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _save_checkpoint(
    run: _Run,
    position: checkpoint.Position,
    model: EarlyExitModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data_order: torch.Tensor,
    running: float,
    best: dict[str, Any],
    closest: torch.Tensor,
) -> None:
    """Every process hands in its random generators; process 0 writes ``<run>/checkpoint/``."""
    runtime = run.runtime
    rng: dict[str, torch.Tensor] = {"data_order": data_order}
    for name, tensor in sorted(checkpoint.capture_rng(cuda=runtime.device.type == "cuda").items()):
        for rank, value in enumerate(runtime.all_gather(tensor)):
            rng[f"{name}.rank{rank}"] = value
    if runtime.is_main:
        log = run.log_file()
        log.flush()
        state = {
            "config": asdict(run.config),
            "world_size": runtime.world,
            "running": running,
            "best": checkpoint.best_to_json(best),
            "closest": closest.tolist(),
            "results": run.results,
            "log_offset": log.tell(),
            "seconds": run.elapsed(),
            "scheduler": scheduler.state_dict(),
            "scaler": runtime.scaler.state_dict() if runtime.scaler is not None else None,
        }
        checkpoint.save(run.run_dir, position=position, state=state, model=model, optimizer=optimizer, rng=rng)
    runtime.barrier()


def _restore(
    saved: checkpoint.Checkpoint,
    model: EarlyExitModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    runtime: Processes,
) -> None:
    check_state(model, saved.model, saved.path / "model.safetensors")
    model.load_state_dict(saved.model)
    checkpoint.check_optimizer_state(saved.optimizer, optimizer, saved.path / "optimizer.safetensors")
    optimizer.load_state_dict(saved.optimizer)
    scheduler.load_state_dict(saved.state["scheduler"])
    if runtime.scaler is not None and saved.state["scaler"] is not None:
        runtime.scaler.load_state_dict(saved.state["scaler"])
    checkpoint.restore_rng(checkpoint.rng_for(saved, runtime.rank))
