"""Data-parallel training (Accelerate, gloo on CPU): two processes give the one-process result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from layerexit.cli import main
from layerexit.training.distributed import Processes, launch

from .runs import assets, on_cpu, summary, train_args, weights

__all__ = ["assets", "on_cpu"]

TOLERANCE = 1e-6
"""Largest weight difference allowed between 2 processes and 1 (measured: 2e-7; floating-point summation order).

Attention key biases are the exception: their true gradient is exactly zero (a shift of every key
score by the same amount leaves the softmax unchanged), so what they get is rounding noise, which Adam
scales up to steps of the learning rate's size. They moved by ~1e-5 either way on one machine and by 1.1e-4
on another (the retrofit test, 2026-12-06), and change no output; so their bound is one step of the tests'
learning rate (3e-3). Every other weight, held to 1e-6, is what catches a real difference in the gradients.
"""
NOISE_ONLY = "attention.self.key.bias"
NOISE_LIMIT = 3e-3


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        limit = NOISE_LIMIT if key.endswith(NOISE_ONLY) else TOLERANCE
        assert float((a[key] - b[key]).abs().max()) < limit, key


@pytest.mark.slow
def test_two_processes_train_like_one(
    tmp_path: Path, assets: tuple[Path, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    # the ensemble objective (a minimum over batch means: not a sum over rows), gradient accumulation,
    # and a last batch of one row, so that the second process has no rows at all in that step
    options = ("--objective", "ensemble", "--grad-accum", "2")
    assert main(train_args(assets, tmp_path / "one", *options)) == 0
    assert main([*train_args(assets, tmp_path / "two", *options), "--num-processes", "2"]) == 0
    out = capfd.readouterr().out
    assert out.count(f"run folder: {tmp_path / 'two'}") == 1

    assert_close_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))
    assert summary(tmp_path / "two")["processes"] == 2
    assert summary(tmp_path / "one")["stages"] == summary(tmp_path / "two")["stages"]  # dev metrics, best epoch
    dev = [line for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines() if "dev_" in line]
    assert dev == [line for line in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines() if "dev_" in line]
    assert json.loads((tmp_path / "one" / "closest_exit_ensemble.json").read_text()) == json.loads(
        (tmp_path / "two" / "closest_exit_ensemble.json").read_text()
    )
    losses = [
        [
            json.loads(line)["loss"]
            for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()
            if "loss" in line
        ]
        for run in ("one", "two")
    ]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)
    assert not (tmp_path / "two" / "checkpoint").exists()


@pytest.mark.slow
def test_two_processes_retrofit_like_one(tmp_path: Path, assets: tuple[Path, Path]) -> None:
    """The default method: fine-tuning shared out among the processes, then the exits on cached states on
    process 0 while the others wait; the same model as one process trains."""
    options = ("--objective", "retrofit", "--exit-epochs", "5")
    assert main(train_args(assets, tmp_path / "one", *options)) == 0
    assert main([*train_args(assets, tmp_path / "two", *options), "--num-processes", "2"]) == 0
    assert_close_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))
    assert [s["stage"] for s in summary(tmp_path / "two")["stages"]] == ["finetune", "exits-on-cached-states"]


def test_launch_stops_every_process_when_one_fails(capfd: pytest.CaptureFixture[str]) -> None:
    code = "import os, sys, time; r = os.environ['RANK']; {}"
    quick = [sys.executable, "-c", code.format("sys.exit(0)")]
    assert launch(3, [], command=quick) == 0
    # process 0 fails: its status comes back (it prints its own error); process 1 would wait forever
    rank0 = code.format("print('error: boom', file=sys.stderr); sys.exit(2) if r == '0' else time.sleep(600)")
    assert launch(2, [], command=[sys.executable, "-c", rank0]) == 2
    assert capfd.readouterr().err.strip() == "error: boom"
    # another process fails: the last line of its output is shown, in one line
    rank1 = code.format(
        "(print('Traceback...\\nRuntimeError: gloo', file=sys.stderr), sys.exit(3)) if r == '1' else time.sleep(600)"
    )
    assert launch(2, [], command=[sys.executable, "-c", rank1]) == 3
    assert capfd.readouterr().err.strip() == "error: process 1 failed (exit 3): RuntimeError: gloo"


def test_gradient_accumulation_equals_a_larger_batch(tmp_path: Path, assets: tuple[Path, Path]) -> None:
    """Two batches of 8 per step make the step of one batch of 16 (for a loss that is a mean over rows)."""
    common = ("--objective", "relevancy", "--epochs", "1")
    assert main([*train_args(assets, tmp_path / "big", *common), "--batch-size", "16"]) == 0
    assert main([*train_args(assets, tmp_path / "acc", *common), "--batch-size", "8", "--grad-accum", "2"]) == 0
    assert_close_weights(weights(tmp_path / "big"), weights(tmp_path / "acc"))
    assert summary(tmp_path / "big")["stages"][0]["steps"] == summary(tmp_path / "acc")["stages"][0]["steps"] == 10


def test_bf16_on_cpu_trains(tmp_path: Path, assets: tuple[Path, Path]) -> None:
    assert main(train_args(assets, tmp_path / "bf16", "--mixed-precision", "bf16", "--epochs", "1")) == 0
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "bf16").values())
    assert summary(tmp_path / "bf16")["config"]["mixed_precision"] == "bf16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only where there is no GPU")
def test_fp16_without_a_gpu_is_refused_in_one_line(
    tmp_path: Path, assets: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(train_args(assets, tmp_path / "fp16", "--mixed-precision", "fp16")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fp16 needs a CUDA GPU" in err
    assert not (tmp_path / "fp16").exists()


def test_shards_cover_each_batch_once() -> None:
    runtime = Processes()
    for world in (1, 2, 3):
        for n in range(1, 9):
            rows = list(range(100, 100 + n))
            parts = []
            for rank in range(world):
                runtime.rank, runtime.world = rank, world
                part, sizes = runtime.shard(rows)
                assert sizes[rank] == len(part) and sum(sizes) == n and max(sizes) - min(sizes) <= 1
                parts += part
            assert parts == rows
