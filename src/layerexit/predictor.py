"""A small object a service can hold: a trained run, its tokenizer and an exit strategy.

```python
from layerexit import Predictor
predictor = Predictor.from_run("runs/demo")             # calibrated or dev-selected strategy
predictor.predict(["what a lovely day", "this is awful"])
# [{'label': 'positive', 'probability': 0.97, 'exit_layer': 2, ...}, ...]
```
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from layerexit import strategies
from layerexit.data.encoding import collate, encode, load_tokenizer
from layerexit.errors import LayerExitError
from layerexit.model import EarlyExitModel
from layerexit.runtime.loop import early_exit_forward


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


def default_strategy(run_dir: Path) -> tuple[strategies.Strategy, str]:
    """The strategy a run uses when none is given: the calibrated one, else the voting setting selected
    on dev by ``layerexit evaluate``. Returns it with a word on where it came from."""
    calibration = run_dir / "calibration.json"
    if calibration.is_file():
        from layerexit.evaluation.calibrate import load_choice

        chosen = load_choice(run_dir)
        if chosen is not None:
            return chosen, f"calibrated ({calibration})"
    report = run_dir / "eval" / "report.json"
    if report.is_file():
        try:
            selected = json.loads(report.read_text(encoding="utf-8"))["selected"]
        except (json.JSONDecodeError, KeyError) as err:
            raise LayerExitError(f"{report}: not a layerexit evaluation report ({err})") from None
        for family in strategies.preferred_families():
            if selected.get(family):
                return strategies.parse(selected[family]["setting"]), f"selected on dev ({report})"
    raise LayerExitError(
        f"{run_dir} has no calibrated or evaluated strategy; pass one (e.g. --strategy 'voting(k=0.5, threshold=2)') "
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
        onnx: Any = None,
    ) -> None:
        """``onnx``: an :class:`layerexit.runtime.onnx_runtime.OnnxEarlyExitModel` to run instead of PyTorch."""
        if strategy.needs_labels:
            raise LayerExitError(f"strategy {strategy.name!r} needs labels and cannot be used for prediction")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.strategy = strategy
        self.max_length = max_length
        self.strategy_source = source
        self.onnx = onnx
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
        run = Path(run_dir)
        if not (run / "layerexit.json").is_file():
            raise LayerExitError(f"{run} is not a layerexit run folder (layerexit.json missing)")
        from layerexit.evaluation.evaluate import check_finished

        check_finished(run)
        if threads:
            torch.set_num_threads(threads)
        if isinstance(strategy, str):
            strategy, source = strategies.parse(strategy), "given"
        elif strategy is None:
            strategy, source = default_strategy(run)
        else:
            source = "given"
        max_length = 128
        if (run / "config.json").is_file():
            max_length = int(json.loads((run / "config.json").read_text(encoding="utf-8")).get("max_length", 128))
        model = EarlyExitModel.from_pretrained(run)
        onnx = None
        if runtime != "torch":
            from layerexit.runtime.onnx_runtime import OnnxEarlyExitModel, export_dir_for

            if runtime not in ("onnx", "onnx-int8"):
                raise LayerExitError(f"unknown runtime {runtime!r}; expected torch, onnx or onnx-int8")
            folder = export_dir_for(run, quantize=runtime == "onnx-int8")
            if not folder.is_dir():
                flag = " --quantize" if runtime == "onnx-int8" else ""
                raise LayerExitError(f"{folder} does not exist; run `layerexit export {run}{flag}` first")
            onnx = OnnxEarlyExitModel.load(folder, threads=threads)
        tokenizer = load_tokenizer(run / "backbone")
        return cls(model, tokenizer, strategy, max_length=max_length, source=source, onnx=onnx)

    def predict(
        self, texts: Sequence[str], pairs: Sequence[str] | None = None, *, batch_size: int = 32
    ) -> list[Prediction]:
        """Predictions in input order; each batch stops layer by layer as its rows exit."""
        if isinstance(texts, str):
            raise LayerExitError("predict takes a list of texts, not a single string")
        if pairs is not None and len(pairs) != len(texts):
            raise LayerExitError(f"{len(texts)} texts but {len(pairs)} text pairs")
        if batch_size < 1:
            raise LayerExitError(f"batch size must be >= 1, got {batch_size}")
        encoded = encode(
            self.tokenizer,
            texts,
            pairs,
            max_length=self.max_length,
            token_types=self.model.backbone.uses_token_type_ids,
        )
        # Batches of similar length waste less compute on padding; results go back in input order.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded.input_ids[i]))
        out: list[Prediction | None] = [None] * len(encoded)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = collate(encoded, rows, self.pad_id)
            began = time.perf_counter()
            if self.onnx is not None:
                result = self.onnx.early_exit(
                    self.strategy, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
                )
            else:
                result = early_exit_forward(
                    self.model, self.strategy, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
                )
            ms = (time.perf_counter() - began) * 1000
            for i, row in enumerate(rows):
                label = int(result.prediction[i])
                out[row] = Prediction(
                    label=self.label_names[label],
                    label_id=label,
                    probability=round(float(result.probs[i, label]), 6),
                    exit_layer=int(result.exit_layer[i]),
                    num_layers=self.model.num_layers,
                    latency_ms=round(ms, 3),
                )
        return [p for p in out if p is not None]
