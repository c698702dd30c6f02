"""Run configurations as validated dataclasses, and the command-line options built from them.

Every field carries its help text in ``metadata["help"]``; :func:`add_arguments` turns a
dataclass into argparse options, so the command line and the saved ``config.json`` of a run
cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from layerexit.errors import LayerExitError
from layerexit.methods import (
    METHODS,
    EnsembleOptions,
    JointDistillOptions,
    MethodOptions,
    RetrofitOptions,
    StaticOptions,
)
from layerexit.methods import objective_help as objective_help
from layerexit.options import option, option_of


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``config.json`` in the run folder."""

    model: str = option("minilm-l6", "encoder: a built-in alias (minilm-l6, mpnet-base), a local folder or a hub name")
    task: str = option(
        "tweets-binary", "built-in task name (see `layerexit tasks`), a data file or folder, or glue:TASK:FOLDER"
    )
    output: str = option("", "run folder to create (default: runs/<task>-<model>-<objective>-seed<seed>)")
    objective: str = option(
        "retrofit",
        "training method (the default keeps the plain fine-tuned model as the full depth and certifies the largest "
        "speed-ups against it: docs/results.md)",
        choices=tuple(METHODS),
    )
    # the methods' own options (layerexit.methods), one flat field each: their defaults and help live there
    lam: float = option_of(EnsembleOptions, "lam")
    weighting: Literal["auto", "uniform", "linear"] = option_of(EnsembleOptions, "weighting")
    drop_last_diversity: bool = option_of(EnsembleOptions, "drop_last_diversity")
    detach_teacher: bool = option_of(EnsembleOptions, "detach_teacher")
    min_over: Literal["batch", "sample"] = option_of(EnsembleOptions, "min_over")
    static_layers: int = option_of(StaticOptions, "static_layers")
    equilibrium: bool = option_of(JointDistillOptions, "equilibrium")
    alternate: bool = option_of(JointDistillOptions, "alternate")
    exit_epochs: int = option_of(RetrofitOptions, "exit_epochs")
    exit_lr: float = option_of(RetrofitOptions, "exit_lr")
    exit_loss: Literal["distill", "labels", "both"] = option_of(RetrofitOptions, "exit_loss")
    exit_pooling: Literal["auto", "mean", "first", "last", "pair"] = option_of(RetrofitOptions, "exit_pooling")
    head: Literal["mlp", "linear"] = option(
        "mlp", "internal classifier: one-hidden-layer MLP (paper) or linear (PABEE)"
    )
    pooling: Literal["auto", "mean", "first", "last", "pair"] = option(
        "auto",
        "exit pooling; auto = mean for sentence-transformers encoders, the last token for decoders, else first "
        "token; pair = [u, v, |u-v|, u*v] of the two texts' means, for text-pair tasks",
    )
    epochs: int = option(2, "training epochs (per stage for two-stage methods)")
    lr: float = option(5e-5, "peak learning rate of AdamW for the encoder")
    head_lr: float = option(
        5e-4,
        "peak learning rate of AdamW for the exits (chosen on dev: docs/results.md)",
    )
    batch_size: int = option(32, "training batch size")
    eval_batch_size: int = option(64, "evaluation batch size")
    max_length: int = option(64, "tokens per input (longer inputs are truncated)")
    warmup_ratio: float = option(0.1, "share of steps with a linear learning-rate warm-up")
    weight_decay: float = option(0.01, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    max_train: int = option(0, "use at most this many training examples (0: all)")
    max_eval: int = option(0, "use at most this many dev and test examples each (0: all)")
    text_column: str = option("text", "column of the text, for data files")
    text_pair_column: str = option("", "column of the second text of a pair, for data files")
    label_column: str = option("label", "column of the label, for data files")
    seed: int = option(0, "random seed (weights of the exits, data order, dropout)")
    data_seed: int = option(
        0, "seed of the --max-train / --max-eval subsets: runs that differ only in --seed see the same examples"
    )
    threads: int = option(0, "torch threads (0: torch's default)")
    log_every: int = option(20, "log the training loss every this many steps")
    exit_dropout: float = option(0.1, "dropout inside the exits (the encoder keeps its own)")
    grad_accum: int = option(1, "batches per optimizer step (gradient accumulation)")
    mixed_precision: Literal["no", "bf16", "fp16"] = option(
        "no", "autocast the forward pass: bf16 (CPU or a GPU that has it) or fp16 (CUDA GPU)"
    )
    checkpoint_every: int = option(
        500, "also checkpoint every this many optimizer steps within an epoch (0: only at each epoch's end)"
    )

    def __post_init__(self) -> None:
        check_types(self)
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0 and self.head_lr > 0, "learning rates must be > 0"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {self.eval_batch_size}"),
            (self.max_length >= 8, f"--max-length must be >= 8, got {self.max_length}"),
            (0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.max_grad_norm > 0, "--max-grad-norm must be > 0"),
            (self.max_train >= 0 and self.max_eval >= 0, "--max-train and --max-eval must be >= 0"),
            (self.objective in METHODS, f"unknown objective {self.objective!r}; known: {', '.join(METHODS)}"),
            (self.threads >= 0, "--threads must be >= 0"),
            (self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}"),
            (0 <= self.seed < 2**32, f"--seed must be in [0, 2**32), got {self.seed}"),
            (0 <= self.data_seed < 2**32, f"--data-seed must be in [0, 2**32), got {self.data_seed}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.exit_dropout < 1, f"--exit-dropout must be in [0, 1), got {self.exit_dropout}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (self.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {self.checkpoint_every}"),
        ]
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise LayerExitError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        for ok, message in checks:
            if not ok:
                raise LayerExitError(message)
        for f in fields(self):
            choices = _choices(f)
            if choices and getattr(self, f.name) not in choices:
                raise LayerExitError(f"--{f.name.replace('_', '-')} must be one of {list(choices)}")
        for method in METHODS.values():  # every method's options hold (compare trains them all from one config)
            method.options_of(self)
        self.method_options().check()

    def method_options(self) -> MethodOptions:
        """The options of this run's method (:mod:`layerexit.methods`), read from the flat fields."""
        return METHODS[self.objective].options_of(self)

    def load_task(self) -> Any:
        """The task this configuration trains on, with its column names and sample caps."""
        from layerexit.data import load_task

        return load_task(
            self.task,
            text_column=self.text_column,
            text_pair_column=self.text_pair_column or None,
            label_column=self.label_column,
            max_train=self.max_train or None,
            max_eval=self.max_eval or None,
            seed=self.data_seed,
        )

    def slug(self) -> str:
        """``<task>-<model>``, for default folder names."""
        model = Path(self.model).name or self.model
        task = Path(self.task).name if os.sep in self.task else self.task.replace(":", "-")
        return f"{task}-{model}"

    def run_name(self) -> str:
        return f"{self.slug()}-{self.objective}-seed{self.seed}"


def check_types(config: Any) -> None:
    """Each field holds its declared type (a config read from JSON may not)."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        hint, value = hints[f.name], getattr(config, f.name)
        if typing.get_origin(hint) is Literal:
            expected: tuple[type, ...] = tuple({type(a) for a in typing.get_args(hint)})
        elif hint is float:
            expected = (int, float)
        elif isinstance(hint, type):
            expected = (hint,)
        else:
            continue
        if not isinstance(value, expected) or (isinstance(value, bool) and hint is not bool):
            names = " or ".join(t.__name__ for t in expected)
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            raise LayerExitError(f"{flag} must be {names}, got {value!r}")


def _choices(f: dataclasses.Field[Any]) -> tuple[Any, ...] | None:
    if f.metadata.get("choices"):
        return tuple(f.metadata["choices"])
    hint = typing.get_type_hints(TrainConfig).get(f.name) if f.name in TrainConfig.__dataclass_fields__ else None
    if hint is not None and typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return None


def _default(f: dataclasses.Field[Any]) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[operator]


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One ``--option`` (or positional argument) per dataclass field, typed, with its default and help text."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        help_text = f.metadata.get("help", "").replace("%", "%%")
        nargs = f.metadata.get("nargs")
        if f.metadata.get("positional"):
            default = {"default": _default(f)} if nargs in ("*", "?") else {}
            parser.add_argument(f.name, help=help_text, nargs=nargs, **default)
            continue
        if hint is bool:  # BooleanOptionalAction adds "(default: ...)" itself
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
            continue
        # once, whatever the formatter: ArgumentDefaultsHelpFormatter adds nothing when %(default) is there
        if "(default:" not in help_text:  # a help text that says its default in words keeps its words
            help_text += " (default: %(default)r)"
        choices = f.metadata.get("choices")
        if typing.get_origin(hint) is Literal:
            choices = typing.get_args(hint)
            kind: Any = type(choices[0])
        elif typing.get_origin(hint) is list:
            kind = typing.get_args(hint)[0]
            nargs = nargs or (None if f.metadata.get("parse") else "+")  # a parser reads the whole list
        elif isinstance(hint, types.UnionType):
            kind = next(a for a in typing.get_args(hint) if a is not type(None))
        else:
            kind = hint
        parser.add_argument(
            flag,
            dest=f.name,
            type=f.metadata.get("parse") or kind,
            default=_default(f),
            choices=choices,
            help=help_text,
            nargs=nargs,
            metavar=f.metadata.get("metavar"),
            required=bool(f.metadata.get("required")),
        )


def from_namespace(cls: type, namespace: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)})


def given_options(cls: type, argv: Sequence[str]) -> dict[str, Any]:
    """The fields of ``cls`` that ``argv`` sets explicitly (whatever their value), parsed."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser, cls)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    namespace, _ = parser.parse_known_args(list(argv))
    return vars(namespace)


def save_config(config: Any, path: Path) -> None:
    from layerexit.atomic import write_json

    write_json(path, dataclasses.asdict(config))


def load_train_config(path: Path) -> TrainConfig:
    from layerexit.atomic import read_json_object

    data = read_json_object(path, "the run configuration")
    if "data_seed" not in data and "seed" in data:
        data["data_seed"] = data["seed"]  # runs written before --data-seed drew their subsets with --seed
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LayerExitError(f"{path}: unknown keys {unknown}")
    try:
        return TrainConfig(**data)
    except LayerExitError as err:
        raise LayerExitError(f"{path}: {err}") from None
