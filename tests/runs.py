"""Small training runs for the robustness tests: a tiny local BERT, a keyword task, one set of options."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from layerexit.cli import main

from .test_end_to_end import make_encoder, make_task


@pytest.fixture(scope="session", autouse=True)
def on_cpu() -> Iterator[None]:
    """The comparisons are bit for bit: these runs stay on the CPU (also on a machine with a GPU, whose
    embedding backward adds atomically, in no fixed order). Subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_USE_CPU", "true")
        yield


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(encoder folder, task folder). 145 training rows: batches of 8 leave a last batch of one row."""
    root = tmp_path_factory.mktemp("assets")
    return make_encoder(root / "encoder"), make_task(root / "task", {"train": 145, "dev": 48, "test": 48})


@pytest.fixture(scope="session")
def reference(assets: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """An uninterrupted run, and how many times it flushed a file to disk (the crash points below)."""
    run = tmp_path_factory.mktemp("reference") / "run"  # checkpoints every 2 steps
    return run, trained_counting_fsyncs(train_args(assets, run, "--checkpoint-every", "2"))


def trained_counting_fsyncs(args: list[str]) -> int:
    """Train with ``args`` (it must succeed); how many times the run flushed a file to disk."""
    calls = 0
    real = os.fsync

    def counting(fd: int) -> None:
        nonlocal calls
        calls += 1
        real(fd)

    os.fsync = counting
    try:
        assert main(args) == 0
    finally:
        os.fsync = real
    return calls


def train_args(assets: tuple[Path, Path], output: Path, *extra: str) -> list[str]:
    """A run that learns the task in a second on one thread; no dropout, so that runs can be compared bit for bit."""
    encoder, task = assets
    return [
        "train",
        "--model",
        str(encoder),
        "--task",
        str(task),
        "--output",
        str(output),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--head-lr",
        "3e-3",
        "--threads",
        "1",
        "--exit-dropout",
        "0",
        "--log-every",
        "3",
        "--quiet",
        "--no-evaluate",
        "--objective",
        "ensemble",  # the one-stage method these tests were written for; an --objective in extra overrides it
        *extra,
    ]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "train_summary.json").read_text())


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical weights, identical results, log and closest-exit counts."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"max difference {max_difference(wa, wb)}"
    assert summary(a)["stages"] == summary(b)["stages"]
    assert (a / "train_log.jsonl").read_text() == (b / "train_log.jsonl").read_text()
    for counts in a.glob("closest_exit_*.json"):
        assert counts.read_text() == (b / counts.name).read_text()
    assert (a / "layerexit.json").read_text() == (b / "layerexit.json").read_text()
