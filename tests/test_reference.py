"""A reference model other than the run's own full depth: `calibrate` and `evaluate` with `--reference RUN`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from layerexit.cli import main
from layerexit.errors import LayerExitError
from layerexit.evaluation.calibrate import check_on_test, for_risk
from layerexit.evaluation.replay import GridReplay, replay_of
from layerexit.run_folder import RunFolder
from layerexit.strategies import parse

from .test_end_to_end import make_encoder, make_task


def random_probs(layers: int = 4, n: int = 400, classes: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(layers, n, classes, generator=g) * 3).softmax(-1)


def test_the_own_full_model_as_reference_changes_nothing() -> None:
    probs = random_probs()
    own = replay_of(probs, ["entropy", "maxprob"])
    given = replay_of(probs, ["entropy", "maxprob"], probs[-1].argmax(-1))
    assert torch.equal(own.losses("disagreement"), given.losses("disagreement"))
    assert for_risk(own, None, 0.2, 0.9, ["entropy"]) == for_risk(given, None, 0.2, 0.9, ["entropy"])


def test_losses_are_against_the_reference() -> None:
    probs = random_probs()
    reference = (probs[-1].argmax(-1) + (torch.arange(400) % 10 == 0)) % 3  # differs on every tenth row
    replay = replay_of(probs, ["entropy"], reference)
    assert torch.equal(replay.losses("disagreement"), (replay.prediction != reference).to(torch.uint8))
    assert torch.equal(replay.last_prediction, probs[-1].argmax(-1))
    assert torch.equal(replay.subset(torch.tensor([3, 1])).last_prediction, probs[-1].argmax(-1)[[3, 1]])
    # the full model disagrees with the reference on 10% of rows: a 1% bound is met by no setting, not even it
    (choice,) = for_risk(replay, None, 0.01, 0.9, ["entropy"])
    assert choice.full_model and choice.risk == pytest.approx(0.1) and choice.disagreement == pytest.approx(0.1)
    assert "measured, not certified" in choice.method
    check = check_on_test(choice, probs, reference=reference)
    assert check.disagreement == pytest.approx(0.1) and not check.meets


@pytest.mark.parametrize("bad", [torch.zeros(399, dtype=torch.long), torch.full((400,), 3), torch.zeros(400)])
def test_a_reference_of_the_wrong_shape_or_classes_is_refused(bad: torch.Tensor) -> None:
    with pytest.raises(LayerExitError, match="the reference's answers must be"):
        GridReplay.of(random_probs(), replay_of(random_probs(), ["entropy"]).grid, bad)


def train(encoder: Path, task: Path, run: Path, objective: str, *extra: str) -> None:
    args = ["train", "--model", str(encoder), "--task", str(task), "--output", str(run), "--objective", objective,
            "--epochs", "2", "--batch-size", "8", "--exit-dropout", "0", "--lr", "3e-3", "--head-lr", "3e-3",
            "--max-length", "24", "--threads", "1", "--quiet", *extra]  # fmt: skip
    assert main(args) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a PABEE run, a plain fine-tuned run) on the same examples; the fine-tuned run reads 8 tokens of each text
    only, so it often misses the keyword and disagrees with the PABEE run."""
    root = tmp_path_factory.mktemp("reference")
    encoder = make_encoder(root / "encoder")
    task = make_task(root / "task", {"train": 160, "dev": 200, "test": 200})
    train(encoder, task, root / "pabee", "pabee")
    train(encoder, task, root / "finetune", "finetune", "--seed", "1", "--max-length", "8")
    return root / "pabee", root / "finetune"


def test_calibrate_against_a_fine_tuned_run(runs: tuple[Path, Path]) -> None:
    run, finetuned = runs
    assert RunFolder(run).data_info()["digests"] == RunFolder(finetuned).data_info()["digests"]
    args = ["calibrate", str(run), "--max-drop", "0.2", "--confidence", "0.9", "--strategies", "entropy", "--quiet"]
    assert main([*args, "--reference", str(finetuned)]) == 0
    record = json.loads(RunFolder(run).calibration_file.read_text())
    assert record["reference"] == str(finetuned)
    test_probs, _ = RunFolder(run).read_probs("test")
    reference_probs, _ = RunFolder(finetuned).read_probs("test")
    (check,) = record["test"]
    _, prediction = parse(check["strategy"]).replay(test_probs)
    expected = float((prediction != reference_probs[-1].argmax(-1)).double().mean())
    assert check["disagreement"] == pytest.approx(expected) and expected > 0.05
    assert main(args) == 0  # without it: the run's own full depth again
    assert json.loads(RunFolder(run).calibration_file.read_text())["reference"] is None


def test_evaluate_against_a_fine_tuned_run(runs: tuple[Path, Path]) -> None:
    run, finetuned = runs
    assert main(["evaluate", str(run), "--reference", str(finetuned), "--quiet"]) == 0
    report = RunFolder(run).report()
    own, _ = RunFolder(run).read_probs("dev")
    reference, _ = RunFolder(finetuned).read_probs("dev")
    agreement = report["splits"]["dev"]["agreement_with_reference"]
    expected = (own.argmax(-1) == reference[-1].argmax(-1)).double().mean(1)
    assert agreement == pytest.approx(expected.tolist(), abs=1e-5) and agreement[-1] < 0.95
    assert report["reference"] == str(finetuned)
    selected = [entry for entry in report["selected"].values() if entry is not None]
    assert selected and all("agreement_with_reference" in entry["test"] for entry in selected)


def test_a_reference_on_other_examples_is_refused(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, finetuned = runs
    other = tmp_path / "other"
    train(make_encoder(tmp_path / "encoder"), make_task(tmp_path / "task", {"train": 64, "dev": 50, "test": 50}),
          other, "finetune", "--no-evaluate")  # fmt: skip
    capsys.readouterr()
    assert main(["calibrate", str(run), "--max-drop", "0.2", "--reference", str(other), "--quiet"]) == 2
    assert "its dev split has 50 examples, this run's has 200" in capsys.readouterr().err
    # the same sizes, other texts: the digests tell
    folder = RunFolder(other)
    info = folder.data_info()
    info["sizes"] = RunFolder(finetuned).data_info()["sizes"]
    folder.write_json(folder.data_file, info)
    assert main(["evaluate", str(run), "--reference", str(other), "--quiet"]) == 2
    assert "its dev examples differ from this run's (data.json digests)" in capsys.readouterr().err


def test_calibrate_tests_the_runs_own_family_by_default(runs: tuple[Path, Path]) -> None:
    """With a bound, only the family the run's method was made for shares the confidence (patience for PABEE);
    a method without one (plain fine-tuning), or a target speed-up, gets every family."""
    from layerexit.evaluation.sweep import FAMILIES

    pabee, finetuned = runs

    def families(run: Path, *args: str) -> list[str]:
        assert main(["calibrate", str(run), *args, "--quiet"]) == 0
        return [c["family"] for c in json.loads(RunFolder(run).calibration_file.read_text())["choices"]]

    assert families(pabee, "--max-drop", "0.2") == ["patience"]
    assert families(finetuned, "--max-drop", "0.2") == list(FAMILIES)
    assert set(families(pabee, "--target-speedup", "1.2")) > {"patience"}
    assert families(pabee, "--max-drop", "0.2", "--strategies", "entropy,maxprob") == ["entropy", "maxprob"]
    # an opt-in family is tested when named, and never by default
    assert "pcee" not in FAMILIES and "pcee" not in families(pabee, "--target-speedup", "1.2")
    assert families(pabee, "--max-drop", "0.2", "--strategies", "pcee") == ["pcee"]
    chosen = json.loads(RunFolder(pabee).calibration_file.read_text())["choices"][0]["strategy"]
    assert chosen.startswith("pcee("), chosen


def test_the_agreement_rule_learns_the_reference_answers(runs: tuple[Path, Path]) -> None:
    """`fit-agreement --reference RUN`: the rule learns when an exit agrees with the reference's answers, not with
    the run's own last exit."""
    from layerexit.evaluation.agreement import fit_rows
    from layerexit.evaluation.evaluate import SplitSource
    from layerexit.strategies.learned import fit

    run, finetuned = runs
    assert main(["fit-agreement", str(run), "--quiet"]) == 0
    own = RunFolder(run).agreement_rule()
    assert main(["fit-agreement", str(run), "--reference", str(finetuned), "--quiet"]) == 0
    theirs = RunFolder(run).agreement_rule()
    mine, other = SplitSource(RunFolder(run)).probs("dev"), SplitSource(RunFolder(finetuned)).probs("dev")
    assert mine is not None and other is not None
    probs, answers = mine[0].float(), other[0].float()[-1].argmax(-1)
    assert bool((answers != probs[-1].argmax(-1)).any())  # the two runs disagree somewhere: the test can tell
    expected = fit(probs, answers, fit_rows(probs.shape[1], 0.5, 0), "dev")
    assert theirs.fingerprint == expected.fingerprint != own.fingerprint
