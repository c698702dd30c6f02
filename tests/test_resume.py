"""Resumable training: a run killed at any point, resumed, ends exactly like a run never interrupted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerexit.cli import main

from .runs import assert_same_run, assets, on_cpu, reference, summary, train_args, trained_counting_fsyncs

__all__ = ["assets", "on_cpu", "reference"]

SRC = Path(__file__).resolve().parents[1] / "src"


class Crash(BaseException):
    """Stands for a kill: nothing in layerexit catches it."""


def crash_at(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Die at the n-th fsync: inside checkpoint and model writes, between them, before the first."""
    calls = 0
    real = os.fsync

    def crashing(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == n:
            raise Crash(n)
        real(fd)

    monkeypatch.setattr(os, "fsync", crashing)


def interrupted_run(
    assets: tuple[Path, Path], run: Path, monkeypatch: pytest.MonkeyPatch, crash: Callable[[], None]
) -> None:
    crash()
    with pytest.raises(Crash):
        main(train_args(assets, run, "--checkpoint-every", "2"))
    monkeypatch.undo()
    assert not (run / "train_summary.json").exists()


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_result(
    tmp_path: Path, assets: tuple[Path, Path], reference: tuple[Path, int]
) -> None:
    run = tmp_path / "run"
    args = train_args(assets, run, "--checkpoint-every", "2")
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "layerexit.cli", *args], env=env, stderr=subprocess.DEVNULL)
    state = run / "checkpoint" / "state.json"
    deadline = time.monotonic() + 120
    position: dict[str, Any] = {}
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                position = json.loads(state.read_text())["position"]
            except (OSError, ValueError, KeyError):
                position = {}
            if position.get("step", 0) >= 4:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed"
    assert not (run / "train_summary.json").exists()

    assert main([*args, "--resume"]) == 0
    assert_same_run(reference[0], run)
    assert not any(p.name.startswith("checkpoint") or p.name.endswith(".tmp") for p in run.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("share", [0.0, 0.03, 0.3, 0.65, 0.97])
def test_a_crash_at_any_write_resumes_to_the_same_result(
    tmp_path: Path,
    assets: tuple[Path, Path],
    reference: tuple[Path, int],
    monkeypatch: pytest.MonkeyPatch,
    share: float,
) -> None:
    run = tmp_path / "run"
    point = 1 + int(share * (reference[1] - 1))
    interrupted_run(assets, run, monkeypatch, lambda: crash_at(monkeypatch, point))
    assert main([*train_args(assets, run, "--checkpoint-every", "2"), "--resume"]) == 0
    assert_same_run(reference[0], run)


def test_a_crash_between_the_two_renames_resumes_from_the_previous_checkpoint(
    tmp_path: Path, assets: tuple[Path, Path], reference: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    renames = 0
    real = Path.rename

    def rename(self: Path, target: Any) -> Any:
        nonlocal renames
        if self.name == "checkpoint.tmp":
            renames += 1
            if renames == 4:  # the old checkpoint is moved aside, the new one not yet in place
                raise Crash()
        return real(self, target)

    interrupted_run(assets, run, monkeypatch, lambda: monkeypatch.setattr(Path, "rename", rename))
    assert (run / "checkpoint.old" / "state.json").is_file() and not (run / "checkpoint").exists()
    # the options may be left out: they come from the run's config.json
    assert main(["train", "--output", str(run), "--resume", "--quiet", "--no-evaluate"]) == 0
    assert_same_run(reference[0], run)


def test_a_distilling_stage_resumed_learns_the_targets_it_began_with(
    tmp_path: Path, assets: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """joint-distill's targets are the fine-tuned model's answers when its second stage began; a resume
    from within that stage reads them from the run folder (computing them again from the half-trained
    model would give other targets and another run)."""
    from safetensors.torch import load_file as load

    args = train_args(assets, tmp_path / "whole", "--objective", "joint-distill", "--checkpoint-every", "2")
    calls = trained_counting_fsyncs(args)
    whole = tmp_path / "whole"
    teacher = whole / "teacher_distill-every-exit.safetensors"
    assert teacher.is_file()
    crash_at(monkeypatch, int(calls * 0.85))  # within the second stage, after its first checkpoint
    run = tmp_path / "run"
    with pytest.raises(Crash):
        main([*args[: args.index("--output") + 1], str(run), *args[args.index("--output") + 2 :]])
    monkeypatch.undo()
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["position"]["stage"] == 1 and state["position"]["step"] > 0, state["position"]
    assert main(["train", "--output", str(run), "--resume", "--quiet", "--no-evaluate"]) == 0
    assert_same_run(whole, run)
    assert torch.equal(load(str(teacher))["probs"], load(str(run / teacher.name))["probs"])


@pytest.fixture(scope="module")
def halfway(assets: tuple[Path, Path], reference: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped halfway, with a checkpoint."""
    run = tmp_path_factory.mktemp("halfway") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        interrupted_run(assets, run, monkeypatch, lambda: crash_at(monkeypatch, reference[1] // 2))
    assert (run / "checkpoint" / "state.json").is_file()
    return run


@pytest.fixture
def interrupted(halfway: Path, tmp_path: Path) -> Path:
    """A copy of the halfway run, for a test to damage."""
    return Path(shutil.copytree(halfway, tmp_path / "run"))


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, repr(err)
    return err


def test_resume_refuses_other_options(
    interrupted: Path, assets: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*train_args(assets, interrupted, "--lambda", "0.5"), "--resume"]) == 2
    err = _one_line_error(capsys)
    assert "cannot resume" in err and "--lambda 0.1 (run) vs 0.5 (now)" in err


def _edit_state(run: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = run / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda run: (run / "checkpoint" / "state.json").write_text('{"format": 1, "posit'), "not valid JSON"),
        (lambda run: (run / "checkpoint" / "rng.safetensors").unlink(), "rng.safetensors is missing"),
        (lambda run: _edit_state(run, lambda s: s.update(surprise=1)), "unknown keys ['surprise']"),
        (lambda run: _edit_state(run, lambda s: s.update(world_size=2)), "--num-processes 2"),
        (lambda run: _edit_state(run, lambda s: s["config"].update(lam=0.5)), "another configuration"),
        (lambda run: _edit_state(run, lambda s: s["position"].update(epoch="2")), "damaged checkpoint"),
        (lambda run: _edit_state(run, lambda s: s.update(closest=[[1]])), "closest-exit counts"),
        (lambda run: _shrink(run / "checkpoint" / "model.safetensors"), "has shape (1,)"),
        (lambda run: _shrink(run / "checkpoint" / "optimizer.safetensors"), "optimizer"),
        (lambda run: (run / "checkpoint" / "optimizer.safetensors").write_bytes(b"\x00" * 9), "safetensors"),
    ],
    ids=[
        "truncated",
        "missing-file",
        "unknown-key",
        "processes",
        "config",
        "position",
        "counts",
        "weights",
        "optim",
        "bytes",
    ],
)
def test_a_damaged_checkpoint_is_refused_in_one_line(
    interrupted: Path,
    assets: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    damage: Callable[[Path], None],
    message: str,
) -> None:
    damage(interrupted)
    before = (interrupted / "train_log.jsonl").read_bytes()
    assert main([*train_args(assets, interrupted, "--checkpoint-every", "2"), "--resume"]) == 2
    assert message in _one_line_error(capsys)
    assert (interrupted / "train_log.jsonl").read_bytes() == before


def _shrink(path: Path) -> None:
    """Replace the largest tensor of a safetensors file by one of the wrong shape."""
    tensors = load_file(str(path))
    key = max(tensors, key=lambda k: tensors[k].numel())
    tensors[key] = tensors[key].reshape(-1)[:1].clone()
    save_file(tensors, str(path))


def test_an_interrupted_run_is_not_evaluated_or_overwritten(
    interrupted: Path, assets: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", str(interrupted), "--quiet"]) == 2
    assert f"layerexit train --resume --output {interrupted}" in _one_line_error(capsys)
    assert main(train_args(assets, interrupted)) == 2
    assert "already exists" in _one_line_error(capsys)


def test_resuming_a_finished_run_changes_nothing(
    tmp_path: Path, assets: tuple[Path, Path], reference: tuple[Path, int], capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "done"
    shutil.copytree(reference[0], run)
    stamp = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert main([*train_args(assets, run, "--checkpoint-every", "2"), "--resume"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == stamp
    assert summary(run) == summary(reference[0])


def test_resume_into_an_empty_or_foreign_folder(
    tmp_path: Path, assets: tuple[Path, Path], reference: tuple[Path, int], capsys: pytest.CaptureFixture[str]
) -> None:
    fresh = tmp_path / "never-started"  # killed before it wrote anything: it starts from the beginning
    assert main([*train_args(assets, fresh, "--checkpoint-every", "2"), "--resume"]) == 0
    assert_same_run(reference[0], fresh)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main([*train_args(assets, foreign), "--resume"]) == 2
    assert "not a layerexit run folder" in _one_line_error(capsys)
    assert (foreign / "notes.txt").read_text() == "mine"
