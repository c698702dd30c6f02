"""A two-stage run started from a finished finetune run ends exactly like one that trained its first stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from layerexit.cli import main

from .runs import assets, max_difference, on_cpu, summary, train_args, weights

__all__ = ["assets", "on_cpu"]

DROPOUT = ("--exit-dropout", "0.1")  # the second stage draws dropout masks: its random state matters


@pytest.fixture(scope="module")
def finetuned(assets: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("finetune") / "run"
    assert main(train_args(assets, run, "--objective", "finetune", *DROPOUT)) == 0
    return run


@pytest.mark.parametrize(
    "objective", [("deebert",), ("fastbert",), ("retrofit",), ("joint-distill",), ("joint-distill", "--alternate")]
)
def test_second_stage_from_a_finetune_run_equals_training_both_stages(
    objective: tuple[str, ...], assets: tuple[Path, Path], finetuned: Path, tmp_path: Path
) -> None:
    scratch, reused = tmp_path / "scratch", tmp_path / "reused"
    assert main(train_args(assets, scratch, "--objective", *objective, *DROPOUT)) == 0
    assert (
        main(train_args(assets, reused, "--objective", *objective, *DROPOUT, "--first-stage-from", str(finetuned))) == 0
    )

    a, b = weights(scratch), weights(reused)
    assert all(torch.equal(a[k], b[k]) for k in a), f"max difference {max_difference(a, b)}"
    first, second = summary(reused)["stages"]
    assert first.pop("trained_in") == str(finetuned)
    assert [first, second] == summary(scratch)["stages"]
    assert (reused / "train_log.jsonl").read_text() == (scratch / "train_log.jsonl").read_text()
    for counts in scratch.glob("closest_exit_*.json"):
        assert (reused / counts.name).read_text() == counts.read_text()
    # the internal exits did train: they moved away from the fine-tuned model's untrained ones
    start = weights(finetuned)
    assert any(not torch.equal(start[k], b[k]) for k in b if k.startswith("exits.0."))


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_first_stage_trained_with_other_options_is_refused(
    assets: tuple[Path, Path], finetuned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = train_args(
        assets, run, "--objective", "deebert", *DROPOUT, "--lr", "1e-3", "--first-stage-from", str(finetuned)
    )
    assert main(args) == 2
    assert f"{finetuned} was trained with other options than this run (lr: 0.003 there, 0.001 here)" in _error(capsys)
    assert not run.exists()
    # options that only other objectives' losses read do not matter
    assert main([*args[:-2], "--lr", "3e-3", "--lambda", "0.7", "--first-stage-from", str(finetuned)]) == 0


def test_only_a_finished_finetune_run_starts_a_two_stage_run(
    assets: tuple[Path, Path], finetuned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one_stage = train_args(
        assets, tmp_path / "a", "--objective", "pabee", *DROPOUT, "--first-stage-from", str(finetuned)
    )
    assert main(one_stage) == 2
    assert "objective 'pabee' has one stage" in _error(capsys)

    pabee = tmp_path / "pabee"
    assert main(train_args(assets, pabee, "--objective", "pabee", *DROPOUT)) == 0
    assert (
        main(train_args(assets, tmp_path / "b", "--objective", "deebert", *DROPOUT, "--first-stage-from", str(pabee)))
        == 2
    )
    assert "trained the stages ['pabee'] ('pabee'), not only 'deebert''s first stage 'finetune'" in _error(capsys)

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps({"objective": "finetune"}))
    assert (
        main(train_args(assets, tmp_path / "c", "--objective", "fastbert", "--first-stage-from", str(unfinished))) == 2
    )
    assert f"{unfinished}: training has not finished (train_summary.json missing)" in _error(capsys)


def test_retrofit_keeps_the_fine_tuned_model_whole(assets: tuple[Path, Path], finetuned: Path, tmp_path: Path) -> None:
    """`train --objective retrofit`: the encoder and the last exit are the fine-tuned run's, bit for bit; only the
    internal exits are new, fitted on the frozen encoder's cached states, and they learned the task."""
    run = tmp_path / "run"
    assert main(train_args(assets, run, "--objective", "retrofit", *DROPOUT, "--first-stage-from", str(finetuned))) == 0
    before, after = weights(finetuned), weights(run)
    last = max(int(k.split(".")[1]) for k in after if k.startswith("exits."))
    kept = [k for k in after if not k.startswith("exits.") or k.startswith(f"exits.{last}.")]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)
    assert all(not torch.equal(before[k], after[k]) for k in after if k.startswith("exits.0."))
    stage = summary(run)["stages"][1]
    assert stage["stage"] == "exits-on-cached-states" and stage["pooling"] == "mean"
    assert len(stage["exits"]) == last and len(stage["dev_scores"]) == last + 1
    assert min(stage["dev_scores"][1:]) > 0.9, stage["dev_scores"]  # the deeper exits agree with the labels
