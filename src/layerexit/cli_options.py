"""The options of every ``layerexit`` command that is not generated from a run configuration, one dataclass
per command; the parser is generated from them (:func:`layerexit.config.add_arguments`).

An option that several commands take (the run folder, ``--runtime``, ``--strategy``, ``--threads``,
``--strategies``, ``--output``) is declared once here, by a function that returns its field, so it has one
spelling, one default and one help text everywhere. ``train``, ``retrofit`` and ``serve`` take their
configurations (``TrainConfig``, ``RetrofitConfig``, ``EngineConfig``) plus the few command options below.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Literal

from layerexit.errors import LayerExitError
from layerexit.evaluation.sweep import FAMILIES, KNOWN_FAMILIES
from layerexit.options import option
from layerexit.runtime.base import RUNTIMES
from layerexit.runtime.registry import exportable


def families(text: str) -> list[str]:
    """``--strategies``: comma-separated strategy families, each checked."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in KNOWN_FAMILIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown strategy {unknown[0] if unknown else text!r}; known: {', '.join(KNOWN_FAMILIES)}"
        )
    return names


# ----------------------------------------------------------------------------- shared options
def run_folder() -> Any:
    return option("", "run folder written by `layerexit train` or `layerexit retrofit`", positional=True)


def runtime() -> Any:
    return option("torch", "the PyTorch model or the graphs `layerexit export --runtime NAME` wrote", choices=RUNTIMES)


def strategy() -> Any:
    return option(
        None, "exit strategy, e.g. 'voting(k=0.5, threshold=2)'; none: the calibrated one, else the dev-selected one"
    )


def threads() -> Any:
    return option(0, "threads of the runtime (0: its default, one per core)")


def shared_pool() -> Any:
    return option(
        False,
        "ONNX Runtime: run every layer's session on one shared thread pool that stays warm between layers "
        "(faster at batch 1, can be slower in batches: docs/performance.md)",
    )


FAMILIES_HELP = (
    "comma-separated strategy families: "
    + ",".join(FAMILIES)
    + "".join(f", and {name} when named" for name in KNOWN_FAMILIES if name not in FAMILIES)
)


def strategies() -> Any:
    return option(list(FAMILIES), FAMILIES_HELP + " (default: all but those named only)", parse=families)


# ----------------------------------------------------------------------------- commands
@dataclass
class TrainCommand:
    """``train``'s options besides its TrainConfig."""

    evaluate: bool = option(True, "evaluate on dev and test after training")
    resume: bool = option(False, "continue the run in --output from its checkpoint")
    first_stage_from: str = option(
        "",
        "deebert, fastbert: start at the second stage from RUN, a finished finetune run with the same options",
        metavar="RUN",
    )
    num_processes: int = option(1, "data-parallel processes on this machine (Accelerate, gloo/NCCL)")


@dataclass
class RetrofitCommand:
    """``retrofit``'s options besides its RetrofitConfig."""

    evaluate: bool = option(True, "evaluate on dev and test afterwards")


@dataclass
class EvaluateOptions:
    run: str = run_folder()
    splits: list[str] = option(["dev", "test"], "splits to evaluate")
    strategies: list[str] = strategies()
    batch_size: int = option(64, "evaluation batch size")
    fresh: bool = option(False, "recompute stored probabilities instead of reusing them")
    runtime: str = runtime()
    reference: str = option(
        "",
        "another run folder on the same examples (a plain `--objective finetune` run, say) whose full model the "
        "answers are compared with (default: this run's own full depth)",
        metavar="RUN",
    )


@dataclass
class PredictOptions:
    run: str = run_folder()
    texts: list[str] = option([], "texts to classify (else --file, else standard input)", positional=True, nargs="*")
    file: str = option("", "CSV, TSV or JSONL file with the inputs")
    text_column: str = option("text", "column of the text in --file")
    pair_column: str = option("", "column of the second text of a pair in --file")
    strategy: str | None = strategy()
    batch_size: int = option(32, "inputs per batch (exited rows leave the batch)")
    threads: int = threads()
    runtime: str = runtime()
    shared_pool: bool = shared_pool()


@dataclass
class BenchOptions:
    run: str = run_folder()
    strategy: str | None = strategy()
    split: str = option("test", "split of the run's task to take inputs from")
    samples: int = option(200, "number of inputs")
    tokens: int = option(
        0, "inputs of exactly this many tokens, made by joining the split's texts (0: the texts as they are)"
    )
    batch_sizes: list[int] = option([1, 8, 32], "batch sizes to measure")
    repeats: int = option(3, "timed passes per row (medians are reported)")
    threads: int = threads()
    output: str = option("", "JSON file to write (default: RUN/bench.json)")
    runtime: list[str] = option(
        ["torch"],
        "runtimes to measure (full model and early exit on each; PyTorch is always the baseline), "
        "e.g. --runtime torch onnx onnx-int8",
        choices=RUNTIMES,
    )
    shared_pool: bool = shared_pool()


@dataclass
class ExportOptions:
    run: str = run_folder()
    runtime: str = option(
        "onnx",
        "the graphs to write: onnx (fp32), onnx-int8 (int8, dynamic quantization), onnx-int8-static (int8, "
        "scales fixed on training texts) or onnx-int8-token (int8, one scale per token); each into RUN/<runtime>",
        choices=exportable(),
    )
    opset: int = option(17, "ONNX opset")
    calibration_texts: int = option(512, "onnx-int8-static: training texts its activation scales are fixed on")
    output: str = option("", "folder to write (default: RUN/<runtime>)")


@dataclass
class CalibrateOptions:
    run: str = run_folder()
    target_speedup: float | None = option(None, "speed-up to reach on the calibration split")
    max_drop: float | None = option(None, "largest tolerated loss (e.g. 0.01 = 1 point)")
    confidence: float = option(0.9, "probability that the bound holds")
    loss: Literal["disagreement", "accuracy_drop"] = option(
        "disagreement", "what --max-drop bounds: disagreement with the full model (no labels) or lost accuracy"
    )
    strategies: list[str] = option(
        [],
        FAMILIES_HELP + ". Default with --max-drop: the run's own "
        "family (its method's: entropy for retrofit, DeeBERT and FastBERT, voting for ensemble, patience for PABEE, "
        "maxprob for RightTool), since the confidence is split over the families tested; with --target-speedup, "
        "all of them",
        parse=families,
    )
    calibration_split: str = option("dev", "split the setting is chosen on")
    test_split: str = option("test", "split the choice is checked on")
    reference: str = option(
        "",
        "another run folder on the same examples (a plain `--objective finetune` run, say) whose full model the "
        "risk is measured against (its disagreement or lost accuracy) (default: this run's own full depth)",
        metavar="RUN",
    )

    def __post_init__(self) -> None:
        if (self.target_speedup is None) == (self.max_drop is None):
            raise LayerExitError("give either --target-speedup or --max-drop (with --confidence)")


@dataclass
class CompareCommand:
    """``compare``'s options besides the TrainConfig every method shares."""

    methods: str = option(
        "",
        "comma-separated: finetune, static:N, deebert, fastbert, retrofit, pabee, righttool, relevancy, ensemble"
        " (default: finetune,static:3,static:4,deebert,fastbert,retrofit,pabee,righttool,ensemble)",
    )
    seeds: list[int] = option([0], "seeds; every method runs with each")
    output: str = option("", "folder of the comparison (default: runs/compare-<task>-...)")
    finetune_from: str = option(
        "",
        "a comparison folder whose finished finetune-seed<N> runs DeeBERT and FastBERT start their second "
        "stage from (default: this comparison's own, trained when missing)",
        metavar="DIR",
    )


@dataclass
class AnalyzeOptions:
    run: str = option("", "an evaluated run folder", positional=True)
    split: str = option("test", "split of the stored probabilities to analyse")
