"""A small object a service can hold: a trained run, its tokenizer and an exit strategy.

```python
from layerexit import Predictor
predictor = Predictor.from_run("runs/demo")             # calibrated or dev-selected strategy
predictor.predict(["what a lovely day", "this is awful"])
# [{'label': 'positive', 'probability': 0.97, 'exit_layer': 2, ...}, ...]
```
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from layerexit import strategies
from layerexit.data.encoding import Encoded, collate, encode, pairs_problem
from layerexit.errors import LayerExitError
from layerexit.model import EarlyExitModel
from layerexit.run_folder import RunFolder
from layerexit.runtime import Runtime, load_runtime, parse_runtime
from layerexit.runtime.loop import early_exit
from layerexit.runtime.torch_runtime import TorchRuntime


@dataclass
class Prediction:
    label: str
    label_id: int
    probability: float
    """Probability of ``label`` under the exit the input left at."""
    exit_layer: int
    num_layers: int
    latency_ms: float
    """Wall time of the batch this input was part of."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_strategy(run_dir: Path | RunFolder) -> tuple[strategies.Strategy, str]:
    """The strategy a run uses when none is given: the calibrated one, else the voting setting selected
    on dev by ``layerexit evaluate``. Returns it with a word on where it came from."""
    run = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
    if run.calibration_file.is_file():
        from layerexit.evaluation.calibrate import load_choice

        chosen = load_choice(run.path)
        if chosen is not None:
            return chosen, f"calibrated ({run.calibration_file})"
    if run.report_file().is_file():
        selected = run.report()["selected"]
        for family in strategies.preferred_families():
            if selected.get(family):
                return strategies.parse(selected[family]["setting"]), f"selected on dev ({run.report_file()})"
    raise LayerExitError(
        f"{run} has no calibrated or evaluated strategy; pass one (e.g. --strategy 'voting(k=0.5, threshold=2)') "
        "or run `layerexit evaluate` / `layerexit calibrate` first"
    )


class Predictor:
    """Early-exit predictions for raw texts."""

    def __init__(
        self,
        model: EarlyExitModel,
        tokenizer: Any,
        strategy: strategies.Strategy,
        *,
        max_length: int = 128,
        source: str = "given",
        runtime: Runtime | None = None,
        text_pairs: bool | None = None,
    ) -> None:
        """``runtime``: how to run the model (default: PyTorch); e.g. ``load_runtime(run, "onnx")``.
        ``text_pairs``: whether the model was trained on text pairs, so that inputs of the other kind
        are refused (``None``: not known, either is accepted)."""
        if strategy.needs_labels:
            raise LayerExitError(f"strategy {strategy.name!r} needs labels and cannot be used for prediction")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.strategy = strategy
        self.max_length = max_length
        self.strategy_source = source
        self.text_pairs = text_pairs
        self.runtime: Runtime = runtime if runtime is not None else TorchRuntime(model)
        names = model.config.label_names
        self.label_names = names or [str(i) for i in range(model.num_labels)]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        strategy: strategies.Strategy | str | None = None,
        *,
        threads: int | None = None,
        runtime: str = "torch",
    ) -> Predictor:
        """``runtime``: ``torch``, ``onnx`` or ``onnx-int8`` (the graphs `layerexit export` wrote)."""
        run = RunFolder(run_dir).require()
        run.require_finished()
        runtime = parse_runtime(runtime)
        if threads:
            torch.set_num_threads(threads)
        if isinstance(strategy, str):
            strategy, source = run.bind(strategies.parse(strategy)), "given"
        elif strategy is None:
            strategy, source = default_strategy(run)
        else:
            strategy, source = run.bind(strategy), "given"
        model = EarlyExitModel.from_pretrained(run.path)
        backend = load_runtime(run, runtime, model=model, threads=threads)
        return cls(
            model,
            run.tokenizer(),
            strategy,
            max_length=run.max_length(),
            source=source,
            runtime=backend,
            text_pairs=run.text_pairs(),
        )

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> Encoded:
        """Tokenise raw inputs as the model was trained (truncated to ``max_length`` tokens)."""
        if isinstance(texts, str):
            raise LayerExitError("predict takes a list of texts, not a single string")
        if pairs is not None and len(pairs) != len(texts):
            raise LayerExitError(f"{len(texts)} texts but {len(pairs)} text pairs")
        problem = pairs_problem(self.text_pairs, pairs is not None)
        if problem:
            raise LayerExitError(problem)
        return encode(
            self.tokenizer,
            texts,
            pairs,
            max_length=self.max_length,
            token_types=self.model.backbone.uses_token_type_ids,
        )

    def prediction(self, label: int, probs: Tensor, exit_layer: int, ms: float) -> Prediction:
        return Prediction(
            label=self.label_names[label],
            label_id=label,
            probability=round(float(probs[label]), 6),
            exit_layer=exit_layer,
            num_layers=self.model.num_layers,
            latency_ms=round(ms, 3),
        )

    def warm_up(self) -> None:
        """One input, then a batch of two, through the exit loop: what a runtime builds on first use (ONNX
        Runtime's one-call graphs, one for single rows and one for batches) is built before a caller waits
        for it."""
        texts = ["warm up", "warming up the runtime"]
        pairs = ["a second text", "a second text of the pair"] if self.text_pairs else None
        self.predict(texts[:1], pairs[:1] if pairs else None)
        self.predict(texts, pairs)

    def predict(
        self, texts: Sequence[str], pairs: Sequence[str] | None = None, *, batch_size: int = 32
    ) -> list[Prediction]:
        """Predictions in input order; each batch stops layer by layer as its rows exit."""
        if batch_size < 1:
            raise LayerExitError(f"batch size must be >= 1, got {batch_size}")
        encoded = self.encode(texts, pairs)
        # Batches of similar length waste less compute on padding; results go back in input order.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded.input_ids[i]))
        out: list[Prediction | None] = [None] * len(encoded)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = collate(encoded, rows, self.pad_id)
            began = time.perf_counter()
            result = early_exit(
                self.runtime, self.strategy, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
            )
            ms = (time.perf_counter() - began) * 1000
            for i, row in enumerate(rows):
                out[row] = self.prediction(int(result.prediction[i]), result.probs[i], int(result.exit_layer[i]), ms)
        return [p for p in out if p is not None]
