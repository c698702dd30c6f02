"""One object owns a run folder's layout: every path, reader and writer of a run goes through it.

A run folder (``layerexit train --output RUN``) holds::

    config.json            the resolved TrainConfig            data.json        the task: name, labels, sizes, source,
                                                                                    whether inputs are text pairs
    layerexit.json         the exits' config (ExitConfig)      model.safetensors  weights (encoder + exits)
    backbone/              the encoder's config and tokenizer  train_log.jsonl    losses during training
    train_summary.json     written when training finished      checkpoint/        while training (resumable)
    retrofit.json          `layerexit retrofit`'s options (its runs only)
    eval/                  report.json, points.csv, exit_layers.csv, tradeoff.png, probs_<split>.safetensors
    eval-onnx/, eval-onnx-int8/   the same, from the exported graphs
    calibration.json       `layerexit calibrate`               bench.json         `layerexit bench`
    agreement.safetensors  `layerexit fit-agreement`: the learned exit rule (layerexit.strategies.learned)
    onnx/, onnx-int8/      `layerexit export` (see layerexit.runtime.onnx_format)
    exit_distribution.png, ...   `layerexit analyze`

No other module spells these names, except that a runtime's registry entry
(:mod:`layerexit.runtime.registry`) names its ``eval-*`` and export folders. Every write is atomic
(:mod:`layerexit.atomic`): a crash leaves a file whole, old or new. Every JSON read fails with a message
naming the file and what it should hold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file
from torch import Tensor

from layerexit.atomic import read_json_object, replacing, save_safetensors, write_json, write_text
from layerexit.errors import LayerExitError
from layerexit.model import BACKBONE_DIR, CONFIG_NAME, WEIGHTS_NAME
from layerexit.runtime.registry import runtime_entry
from layerexit.strategies import Agreement, AgreementRule, Strategy

if TYPE_CHECKING:
    from layerexit.config import TrainConfig
    from layerexit.data.tasks import TaskData

CONFIG = "config.json"
DATA_INFO = "data.json"
TRAIN_LOG = "train_log.jsonl"
SUMMARY = "train_summary.json"
RETROFIT = "retrofit.json"
CHECKPOINT = "checkpoint"
CALIBRATION = "calibration.json"
BENCH = "bench.json"
AGREEMENT = "agreement.safetensors"


class RunFolder:
    """The files of one run. ``RunFolder(path)`` reads nothing; the readers check what they read."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ paths
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def data_file(self) -> Path:
        return self.path / DATA_INFO

    @property
    def model_config_file(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_NAME

    @property
    def backbone_dir(self) -> Path:
        """The encoder's config and the tokenizer (``AutoTokenizer.from_pretrained`` reads it)."""
        return self.path / BACKBONE_DIR

    @property
    def train_log_file(self) -> Path:
        return self.path / TRAIN_LOG

    @property
    def retrofit_file(self) -> Path:
        """The options of ``layerexit retrofit`` (a retrofitted run also has ``config.json``)."""
        return self.path / RETROFIT

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY

    def checkpoint_dir(self, suffix: str = "") -> Path:
        """``checkpoint/``; ``suffix`` ``.tmp`` / ``.old`` name the folders a checkpoint swap goes through."""
        return self.path / (CHECKPOINT + suffix)

    def eval_dir(self, runtime: str = "torch") -> Path:
        """Where a runtime's evaluation goes: ``eval/``, ``eval-onnx/``, ``eval-onnx-int8/``."""
        return self.path / runtime_entry(runtime).eval_folder

    def probs_file(self, split: str, runtime: str = "torch") -> Path:
        return self.eval_dir(runtime) / f"probs_{split}.safetensors"

    def report_file(self, runtime: str = "torch") -> Path:
        return self.eval_dir(runtime) / "report.json"

    def points_file(self, runtime: str = "torch") -> Path:
        return self.eval_dir(runtime) / "points.csv"

    def exit_layers_file(self, runtime: str = "torch") -> Path:
        return self.eval_dir(runtime) / "exit_layers.csv"

    def tradeoff_file(self, runtime: str = "torch") -> Path:
        return self.eval_dir(runtime) / "tradeoff.png"

    @property
    def calibration_file(self) -> Path:
        return self.path / CALIBRATION

    @property
    def agreement_file(self) -> Path:
        return self.path / AGREEMENT

    @property
    def bench_file(self) -> Path:
        return self.path / BENCH

    def export_dir(self, runtime: str = "onnx") -> Path:
        """The ONNX export a runtime loads: ``onnx/`` (fp32) or ``onnx-int8/``."""
        folder = runtime_entry(runtime).export_folder
        if folder is None:
            raise LayerExitError(f"the {runtime} runtime has no export folder")
        return self.path / folder

    def closest_exit_file(self, stage: str) -> Path:
        """Counts of the closest earlier exit during a training stage (the paper's Figure 6b)."""
        return self.path / f"closest_exit_{stage}.json"

    def teacher_file(self, stage: str) -> Path:
        """The training rows' teacher probabilities of a stage that distils from a frozen model
        (:func:`layerexit.training.recipe.teacher_probs`), kept so that a resumed stage learns the same targets."""
        return self.path / f"teacher_{stage}.safetensors"

    def closest_exit_files(self) -> dict[str, Path]:
        """Every stage's counts, by stage name."""
        return {p.stem.removeprefix("closest_exit_"): p for p in sorted(self.path.glob("closest_exit_*.json"))}

    def figure_file(self, name: str) -> Path:
        """A figure of ``layerexit analyze`` (``exit_distribution.png``, ...)."""
        return self.path / name

    # ------------------------------------------------------------------ state
    def is_run(self) -> bool:
        return self.model_config_file.is_file()

    def require(self, *, config: bool = False) -> RunFolder:
        """This folder, or an error if it is not a saved run (with ``config``: one trained by layerexit)."""
        if not self.is_run():
            raise LayerExitError(f"{self.path} is not a layerexit run folder ({CONFIG_NAME} missing)")
        if config and not self.config_file.is_file():
            raise LayerExitError(f"{self.path} is not a layerexit training run ({CONFIG} missing)")
        return self

    def training_finished(self) -> bool:
        return self.summary_file.is_file()

    def require_finished(self) -> RunFolder:
        """Refuse a run whose training was interrupted: its weights are not the final ones."""
        interrupted = any(self.checkpoint_dir(s).exists() for s in ("", ".old"))
        if not self.training_finished() and interrupted:
            raise LayerExitError(
                f"training of {self.path} did not finish ({SUMMARY} missing); finish it with "
                f"`layerexit train --resume --output {self.path}`"
            )
        return self

    def is_complete(self) -> bool:
        """Trained to the end and evaluated (``layerexit compare`` reuses such a run)."""
        return self.training_finished() and self.report_file().is_file()

    def require_export(self, runtime: str) -> Path:
        folder = self.export_dir(runtime)
        if not folder.is_dir():
            raise LayerExitError(
                f"{folder} does not exist; run `layerexit export {self.path} --runtime {runtime}` first"
            )
        return folder

    # ------------------------------------------------------------------ readers
    def read_json(self, path: Path, what: str, *, advice: str = "") -> dict[str, Any]:
        return read_json_object(path, what, advice=advice)

    def config(self) -> TrainConfig:
        from layerexit.config import load_train_config

        return load_train_config(self.config_file)

    def max_length(self, default: int = 128) -> int:
        """Tokens per input the run was trained with (``default`` for a model saved without a config)."""
        if not self.config_file.is_file():
            return default
        return int(self.read_json(self.config_file, "a run configuration").get("max_length", default))

    def data_info(self) -> dict[str, Any]:
        info = self.read_json(self.data_file, "the run's data description")
        if not all(k in info for k in ("label_names", "metric", "task")):
            raise LayerExitError(f"{self.data_file}: not a run's data description (label_names, metric, task expected)")
        return info

    def text_pairs(self) -> bool | None:
        """Whether the model was trained on text pairs (``None``: not recorded, as in runs before the flag)."""
        if not self.data_file.is_file():
            return None
        flag = self.data_info().get("text_pairs")
        return None if flag is None else bool(flag)

    def report(self, runtime: str = "torch") -> dict[str, Any]:
        path = self.report_file(runtime)
        report = self.read_json(path, "an evaluation report", advice=f"; run `layerexit evaluate {self.path}`")
        if not isinstance(report.get("selected"), dict) or not isinstance(report.get("splits"), dict):
            raise LayerExitError(f"{path}: not a layerexit evaluation report (selected, splits expected)")
        return report

    def summary(self) -> dict[str, Any]:
        return self.read_json(self.summary_file, "a training summary")

    def tokenizer(self) -> Any:
        from layerexit.data.encoding import load_tokenizer

        return load_tokenizer(self.backbone_dir)

    def read_probs(self, split: str, runtime: str = "torch") -> tuple[Tensor, Tensor]:
        """Stored per-layer probabilities (L, N, C) and labels (N,) of a split, shapes checked."""
        return load_probs(self.probs_file(split, runtime))

    def agreement_rule(self) -> AgreementRule:
        """The learned exit rule ``layerexit fit-agreement`` fitted for this run."""
        return AgreementRule.load(self.agreement_file)

    def bind(self, strategy: Strategy) -> Strategy:
        """``strategy`` ready to run on this run's model: a learned rule's setting gets the fitted weights it
        names (refused if this run holds another rule); any other strategy is returned as it is."""
        if isinstance(strategy, Agreement):
            return strategy.bound(self.agreement_rule())
        return strategy

    # ------------------------------------------------------------------ writers (all atomic)
    def write_probs(self, split: str, probs: Tensor, labels: Tensor, runtime: str = "torch") -> Path:
        path = self.probs_file(split, runtime)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_probs(path, probs, labels)
        return path

    def write_agreement_rule(self, rule: AgreementRule) -> Path:
        tensors, metadata = rule.to_file()
        with replacing(self.agreement_file) as tmp:
            save_safetensors(tensors, tmp, metadata=metadata)
        return self.agreement_file

    def write_json(self, path: Path, data: Any) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, data)
        return path

    def write_task(self, task: TaskData, **extra: Any) -> Path:
        """``data.json``: the task's name, label names, metric, split sizes, whether inputs are text pairs,
        a digest of each split's examples (:meth:`TaskData.digests`), its provenance, and ``extra`` (a retrofit's
        ``labels``: ``given`` or ``reference``)."""
        info = {
            "task": task.name,
            "label_names": list(task.label_names),
            "metric": task.metric,
            "sizes": {k: len(v) for k, v in task.splits.items()},
            "text_pairs": task.has_pairs,
            "digests": task.digests(),
            **extra,
            "info": task.info,
        }
        return self.write_text(self.data_file, json.dumps(info, indent=2, default=str) + "\n")

    def write_text(self, path: Path, text: str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, text)
        return path


def save_probs(path: Path, probs: Tensor, labels: Tensor) -> None:
    """Per-layer probabilities (L, N, C) and labels (N,) as safetensors, written atomically."""
    with replacing(path) as tmp:
        save_safetensors({"probs": probs.contiguous(), "labels": labels.contiguous()}, tmp)


def load_probs(path: Path) -> tuple[Tensor, Tensor]:
    """What :func:`save_probs` wrote, with its shapes checked."""
    try:
        data = load_file(str(path))
        probs, labels = data["probs"], data["labels"]
    except Exception as err:  # safetensors and KeyError both mean a damaged file
        raise LayerExitError(f"{path}: cannot read stored probabilities ({err})") from None
    if (
        probs.dim() != 3
        or not probs.is_floating_point()
        or labels.dim() != 1
        or labels.is_floating_point()
        or labels.numel() != probs.shape[1]
    ):
        raise LayerExitError(
            f"{path}: stored probabilities have the wrong shapes ({tuple(probs.shape)}, {tuple(labels.shape)}); "
            "evaluate with --fresh"
        )
    return probs, labels
