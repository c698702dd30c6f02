"""What a training run resolves around the loop: seeds, the ``auto`` pooling of its configuration, a
stage's parameter groups, the teacher a distilling stage learns from, and the per-exit temperatures a
method fits after training (RightTool)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from layerexit.config import TrainConfig
from layerexit.data.encoding import Encoded
from layerexit.errors import LayerExitError
from layerexit.methods import Stage
from layerexit.model import EarlyExitModel
from layerexit.run_folder import load_probs, save_probs
from layerexit.runtime.loop import model_probs


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is a dependency, but seeding must not be what breaks
        pass


def is_decoder(path: str) -> bool:
    """Whether the model at ``path`` (folder or hub name) is decoder-only, from its config alone."""
    from transformers import AutoConfig

    from layerexit.backbones import DecoderBackbone

    try:
        return AutoConfig.from_pretrained(path).model_type in DecoderBackbone.model_types
    except (OSError, ValueError):  # loading the model itself says what is wrong
        return False


def resolve_pooling(config: TrainConfig, encoder_path: str) -> str:
    """``auto``: mean pooling for sentence-transformers encoders (trained with it), else the first token.

    Why mean pooling for sentence-transformers: docs/training.md (Models).
    """
    if config.pooling != "auto":
        return config.pooling
    if is_decoder(encoder_path):
        return "last"  # causal attention: only the last token has read the whole input
    folder = Path(encoder_path)
    sentence_transformer = (folder / "modules.json").is_file() or (folder / "1_Pooling").is_dir()
    return "mean" if sentence_transformer else "first"


def parameter_groups(model: EarlyExitModel, stage: Stage, config: TrainConfig) -> list[dict[str, Any]]:
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


def calibrate_temperatures(
    model: EarlyExitModel,
    dev: Encoded,
    config: TrainConfig,
    pad_id: int,
    run_dir: Path,
    tokenizer: Any,
    fit: Callable[[torch.Tensor, torch.Tensor], list[float]],
) -> list[float]:
    """A method's after-training step (RightTool): ``fit`` one temperature per exit on dev, store them in
    the saved model."""
    model.set_temperatures([1.0] * model.num_layers)  # fitted on the raw logits, also when run again
    probs = model_probs(model, dev, config.eval_batch_size, pad_id)  # (L, N, C)
    logits = probs.clamp_min(1e-12).log()  # equal to the logits up to a per-row constant
    temperatures = fit(logits, dev.labels)
    model.set_temperatures(temperatures)
    model.save_pretrained(run_dir, tokenizer)
    return [round(t, 4) for t in temperatures]


def teacher_probs(
    model: EarlyExitModel, data: Encoded, config: TrainConfig, pad_id: int, path: Path, *, write: bool, progress: bool
) -> torch.Tensor:
    """The probabilities (N, C) that ``model``'s final exit gives each row of ``data``, dropout off: the
    targets of a stage that distils from the model as the stage before left it (``Stage.targets``).

    Computed once, when the stage begins, and kept at ``path`` (``write``: this process writes it), so that a
    stage resumed from a later checkpoint learns the same targets rather than its own half-trained answers.
    """
    if path.is_file():
        stored, labels = load_probs(path)
        if (
            stored.shape[0] != 1
            or stored.shape[1:] != (len(data), model.num_labels)
            or not torch.equal(labels, data.labels)
        ):
            raise LayerExitError(
                f"{path}: teacher probabilities for other training rows ({tuple(stored.shape[1:])}, expected "
                f"({len(data)}, {model.num_labels})); delete the file to compute them again"
            )
        return stored[0]
    probs = model_probs(model, data, config.eval_batch_size, pad_id, progress=progress)[-1].float()  # (N, C)
    if write:
        save_probs(path, probs.unsqueeze(0), data.labels)
    return probs
