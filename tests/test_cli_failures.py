"""Clean failures on the command line: one line, a non-zero status, and no earlier result harmed."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from layerexit import atomic
from layerexit.cli import main
from layerexit.model import EarlyExitModel

from .runs import assert_same_run, assets, on_cpu, reference, train_args

__all__ = ["assets", "on_cpu", "reference"]


@pytest.fixture(scope="module")
def evaluated(assets: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("evaluated") / "run"
    assert main([*train_args(assets, run, "--epochs", "1"), "--evaluate"]) == 0
    return run


def one_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, repr(err)
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--lambda", "-0.5"], "--lambda must be >= 0"),
        (["train", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["train", "--epochs", "0"], "--epochs must be >= 1"),
        (["train", "--lr", "nan"], "--lr must be a finite number"),
        (["train", "--warmup-ratio", "1"], "--warmup-ratio must be in [0, 1)"),
        (["train", "--grad-accum", "0"], "--grad-accum must be >= 1"),
        (["train", "--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
        (["train", "--exit-dropout", "1"], "--exit-dropout must be in [0, 1)"),
        (["train", "--seed", "-1"], "--seed must be in [0, 2**32)"),
        (["train", "--log-every", "0"], "--log-every must be >= 1"),
        (["train", "--num-processes", "0"], "--num-processes must be >= 1"),
        (["train", "--epochs", "two"], "invalid int value: 'two'"),
        (["train", "--mixed-precision", "fp8"], "invalid choice: 'fp8'"),
        (["evaluate", "RUN", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["predict", "RUN", "text", "--strategy", "voting(k=1, threshold=2)"], "k must be in [0, 1)"),
        (["predict", "RUN", "text", "--strategy", "voting(k=1.5, threshold=2)"], "k must be in [0, 1)"),
        (["predict", "RUN", "text", "--strategy", "entropy(threshold=-0.1)"], "non-negative"),
        (["predict", "RUN", "text", "--strategy", "maxprob(threshold=-1)"], "non-negative"),
        (["predict", "RUN", "text", "--strategy", "patience(patience=nan)"], "must be an integer"),
        (["predict", "RUN", "text", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["bench", "RUN", "--batch-sizes", "8", "0"], "--batch-sizes must be >= 1"),
        (["bench", "RUN", "--repeats", "0"], "--repeats must be >= 1"),
        (["calibrate", "RUN", "--target-speedup", "-2"], "target speed-up must be between 1"),
        (["calibrate", "RUN", "--max-drop", "0.01", "--confidence", "1.5"], "confidence must be strictly between"),
        (["compare", "--seeds", "-1"], "--seeds must be >= 0"),
        (["evaluate", "NOWHERE"], "not a layerexit run folder"),
    ],
)
def test_out_of_range_options_fail_in_one_line(
    args: list[str], message: str, evaluated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [str(evaluated) if a == "RUN" else str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in args]
    if args[0] in ("train", "compare"):
        args += ["--output", str(tmp_path / "out")]
    try:
        code = main([*args, "--quiet"] if args[0] != "predict" else args)
    except SystemExit as exited:  # argparse: a value of the wrong type
        code = int(exited.code or 0)
    assert code == 2
    assert message in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failed_write_keeps_the_earlier_results_whole(
    code: int, evaluated: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p.name: p.read_bytes() for p in (evaluated / "eval").iterdir()}

    def full(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", full)
    assert main(["evaluate", str(evaluated), "--fresh", "--quiet"]) == 1
    err = one_line(capsys.readouterr().err)
    assert f"{evaluated / 'eval'}/" in err and f".safetensors: {os.strerror(code)}" in err and ".tmp" not in err
    assert {p.name: p.read_bytes() for p in (evaluated / "eval").iterdir()} == before  # no *.tmp left either


def test_a_full_disk_during_training_then_resume(
    tmp_path: Path,
    assets: tuple[Path, Path],
    reference: tuple[Path, int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    calls = 0
    real = os.fsync

    def filling(fd: int) -> None:  # the disk fills up two thirds of the way through
        nonlocal calls
        calls += 1
        if calls >= reference[1] * 2 // 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", filling)
    args = train_args(assets, run, "--checkpoint-every", "2")
    assert main(args) == 1
    err = one_line(capsys.readouterr().err)
    assert f"error: {run}/" in err and err.endswith(": No space left on device\n")
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    EarlyExitModel.from_pretrained(run)  # the best model so far is whole
    assert (run / "checkpoint" / "state.json").is_file()  # and so is the last checkpoint

    monkeypatch.undo()  # space freed
    assert main([*args, "--resume"]) == 0
    assert_same_run(reference[0], run)


def test_half_written_run_folders_fail_in_one_line(
    evaluated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    for missing, message in [
        ("model.safetensors", "model.safetensors is missing"),
        ("data.json", "data.json: cannot read"),
        ("layerexit.json", "not a layerexit run folder"),
    ]:
        run = Path(shutil.copytree(evaluated, tmp_path / missing))
        shutil.rmtree(run / "eval")
        (run / missing).unlink()
        assert main(["evaluate", str(run), "--quiet"]) == 2
        assert message in one_line(capsys.readouterr().err)


def test_safetensors_io_errors_become_os_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def failing(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    target = tmp_path / "x.safetensors"
    with pytest.raises(OSError) as caught, atomic.replacing(target) as tmp:
        atomic.save_safetensors({"a": torch.zeros(1)}, tmp)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["train", "compare"])
def test_help_gives_each_default_once(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 'minilm-l6')" in text and "(default: 0.1)" in text
    assert "(default: True)" in text  # a boolean option
    assert "(default: 'minilm-l6') (default" not in text
    assert "(default: True) (default" not in text and "(default: 0.1) (default" not in text
