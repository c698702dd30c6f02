"""What a training run resolves around the loop: seeds, the ``auto`` choices of its configuration, and
RightTool's per-exit temperatures fitted after training."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from layerexit import losses
from layerexit.config import TrainConfig
from layerexit.data.encoding import Encoded
from layerexit.model import EarlyExitModel
from layerexit.runtime.loop import model_probs


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is a dependency, but seeding must not be what breaks
        pass


def resolve_weighting(config: TrainConfig, model_type: str) -> losses.Weighting:
    """``auto``: uniform exit weights for ALBERT (one layer shared across depth), linear i / sum(i) for
    every other encoder: the paper's recipe (its Appendix A.4 found uniform weights poor on BERT)."""
    if config.weighting != "auto":
        return config.weighting
    return "uniform" if model_type == "albert" else "linear"


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

    Measured on MiniLM-L6 (a sentence-transformer): first-token exits on layers 1-3 stayed at the
    majority class after 2 epochs, mean-pooled ones learned (docs/design.md section 1).
    """
    if config.pooling != "auto":
        return config.pooling
    if is_decoder(encoder_path):
        return "last"  # causal attention: only the last token has read the whole input
    folder = Path(encoder_path)
    sentence_transformer = (folder / "modules.json").is_file() or (folder / "1_Pooling").is_dir()
    return "mean" if sentence_transformer else "first"


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
    model.set_temperatures([1.0] * model.num_layers)  # fitted on the raw logits, also when run again
    probs = model_probs(model, dev, config.eval_batch_size, pad_id)  # (L, N, C)
    logits = probs.clamp_min(1e-12).log()  # equal to the logits up to a per-row constant
    temperatures = [fit_temperature(layer_logits, dev.labels) for layer_logits in logits]
    model.set_temperatures(temperatures)
    model.save_pretrained(run_dir, tokenizer)
    return [round(t, 4) for t in temperatures]
