"""The learned agreement rule: its features against a plain loop, its fit, its exact text form and file, online
equal to offline, and fit-agreement then calibrate on the rows the rule did not see."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from layerexit import strategies
from layerexit.cli import main
from layerexit.errors import LayerExitError
from layerexit.evaluation.agreement import fit_rows
from layerexit.predictor import Predictor
from layerexit.run_folder import RunFolder
from layerexit.runtime.loop import early_exit_forward
from layerexit.strategies.learned import NUM_STATS, THRESHOLDS, Agreement, AgreementRule, fit

from .conftest import random_batch, tiny_model
from .test_end_to_end import make_encoder, make_task
from .test_model import _peaked
from .test_reference import train


def _probs(layers: int = 6, n: int = 400, classes: int = 3, seed: int = 0) -> torch.Tensor:
    """Exits that drift from noise towards the final answer with depth, as trained exits do."""
    g = torch.Generator().manual_seed(seed)
    final = torch.randn(n, classes, generator=g) * 3
    depth = torch.arange(1, layers + 1).double().div(layers).float()[:, None, None]
    noise = torch.randn(layers, n, classes, generator=g) * 2
    return torch.softmax(final * depth + noise * (1 - depth), -1)


def _reference_exits(rule: AgreementRule, threshold: float, probs: torch.Tensor) -> list[tuple[int, int]]:
    """Exit layer and prediction per sample, the features computed by plain Python from the rule's definition."""
    num_layers, n, classes = probs.shape
    out = []
    for i in range(n):
        rows = probs[:, i].double().tolist()
        for layer in range(1, num_layers + 1):
            p = rows[layer - 1]
            c = max(range(classes), key=lambda k, p=p: p[k])
            ordered = sorted(p, reverse=True)
            h = -sum(q * math.log(max(q, 1e-12)) for q in p) / math.log(classes)
            given = [r[c] for r in rows[:layer]]
            share = sum(1 for r in rows[:layer] if max(range(classes), key=lambda k, r=r: r[k]) == c) / layer
            x = [ordered[0], ordered[0] - ordered[1], h, sum(given) / layer, min(given), share]
            x += [math.log(max(1 - ordered[0], 1e-9)), math.log(max(h, 1e-9)), math.log(max(1 - min(given), 1e-9))]
            x += [1.0 if d == layer - 1 else 0.0 for d in range(num_layers)]
            z = sum(a * b for a, b in zip(x, rule.weights.tolist(), strict=True)) + rule.bias
            if layer == num_layers or 1 / (1 + math.exp(-z)) >= threshold:
                out.append((layer, c))
                break
    return out


def test_replay_agrees_with_the_rule_written_out() -> None:
    probs = _probs()
    rows = fit_rows(400, 0.5, seed=0)
    rule = fit(probs, probs[-1].argmax(-1), rows, "dev")
    assert rule.weights.shape == (NUM_STATS + 6,)
    for threshold in (0.6, 0.9):
        exit_layer, prediction = Agreement(threshold=threshold, rule=rule.fingerprint).bound(rule).replay(probs)
        got = list(zip(exit_layer.tolist(), prediction.tolist(), strict=True))
        expected = _reference_exits(rule, threshold, probs)
        close = sum(a != b for a, b in zip(got, expected, strict=True))
        assert close <= 2, close  # float64 sums in another order may move a score that sits on the threshold
        assert len({layer for layer, _ in got}) >= 3  # rows leave at many layers: the test can tell


def test_fit_is_deterministic_and_learns_agreement() -> None:
    """Exits that agree with the final one when confident: the rule's score must rank agreeing exits higher."""
    probs = _probs(n=600, seed=1)
    answers = probs[-1].argmax(-1)
    rows = fit_rows(600, 0.5, seed=3)
    a, b = fit(probs, answers, rows, "dev"), fit(probs, answers, rows, "dev")
    assert torch.equal(a.weights, b.weights) and a.bias == b.bias and a.fingerprint == b.fingerprint
    other = fit(probs, answers, fit_rows(600, 0.5, seed=4), "dev")
    assert other.fingerprint != a.fingerprint
    # deeper and more confident exits agree more often: on the rows it did not see, the rule predicts agreement
    # far better than the base rate does
    from layerexit.evaluation.agreement import held_out_log_loss

    rest = torch.ones(600, dtype=torch.bool)
    rest[rows] = False
    agree = (probs[:-1, rest].argmax(-1) == answers[rest]).double().mean()
    base_rate = float(-(agree * agree.log() + (1 - agree) * (1 - agree).log()))
    assert held_out_log_loss(a, probs[:, rest], answers[rest]) < base_rate - 0.1  # 0.47 against 0.61
    assert len(fit_rows(600, 0.5, seed=3)) == 300 and fit_rows(600, 0.5, seed=3).unique().numel() == 300


def test_text_form_binding_and_refusals() -> None:
    probs = _probs()
    rule = fit(probs, probs[-1].argmax(-1), fit_rows(400, 0.5, 0), "dev")
    setting = Agreement(threshold=THRESHOLDS[7], rule=rule.fingerprint)
    text = str(setting)
    assert text == f"agreement(threshold={THRESHOLDS[7]!r}, rule={rule.fingerprint})"
    assert strategies.parse(text) == setting
    with pytest.raises(LayerExitError, match="no weights attached"):
        setting.replay(probs)
    other = fit(probs, probs[-1].argmax(-1), fit_rows(400, 0.5, 1), "dev")
    with pytest.raises(LayerExitError, match="names rule"):
        setting.bound(other)
    assert not hasattr(setting, "_rule")  # binding returns a copy
    for bad, message in [
        ("agreement(threshold=1.5, rule=0123456789ab)", r"in \[0, 1\]"),
        ("agreement(threshold=0.9, rule=xyz)", "fingerprint"),
        ("agreement(threshold=0.9)", "rule"),
    ]:
        with pytest.raises(LayerExitError, match=message):
            strategies.parse(bad)
    with pytest.raises(LayerExitError, match="fit-agreement"):
        strategies.Agreement.default_grid(6, 3)
    assert "agreement" not in strategies.FAMILIES and "agreement" in strategies.KNOWN_FAMILIES


def test_the_rule_file_reads_back_and_refuses_damage(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    probs = _probs()
    rule = fit(probs, probs[-1].argmax(-1), fit_rows(400, 0.5, 0), "dev")
    run = RunFolder(tmp_path)
    with pytest.raises(LayerExitError, match="fit-agreement"):
        run.agreement_rule()
    run.write_agreement_rule(rule)
    back = run.agreement_rule()
    assert back.fingerprint == rule.fingerprint and torch.equal(back.fit_rows, rule.fit_rows)
    setting = strategies.parse(str(Agreement(threshold=0.9, rule=rule.fingerprint)))
    assert torch.equal(run.bind(setting).replay(probs)[0], setting.bound(rule).replay(probs)[0])
    tensors = load_file(str(run.agreement_file))
    tensors["weights"] = tensors["weights"] + 1e-9  # the recorded fingerprint no longer matches
    meta = {"format": "1", "features": "probs-v2", "num_layers": "6", "num_classes": "3", "fit_split": "dev"}
    save_file(tensors, str(run.agreement_file), metadata={**meta, "fingerprint": rule.fingerprint})
    with pytest.raises(LayerExitError, match="damaged"):
        run.agreement_rule()
    save_file(tensors, str(run.agreement_file), metadata={**meta, "format": "0"})
    with pytest.raises(LayerExitError, match="format"):
        run.agreement_rule()
    run.agreement_file.write_bytes(b"not a safetensors file")
    with pytest.raises(LayerExitError, match="cannot be read"):
        run.agreement_rule()


def test_online_equals_offline() -> None:
    model = _peaked(tiny_model("bert", num_labels=3))
    ids, mask = random_batch(batch=24, length=13, seed=4)
    with torch.no_grad():
        probs = model(ids, mask).probs
    rule = fit(probs, probs[-1].argmax(-1), torch.arange(24), "dev")
    for threshold in THRESHOLDS[::8]:
        strategy = Agreement(threshold=threshold, rule=rule.fingerprint).bound(rule)
        offline = strategy.replay(probs)
        online = early_exit_forward(model, strategy, ids, mask)
        assert torch.equal(online.exit_layer, offline[0]) and torch.equal(online.prediction, offline[1])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("agreement")
    encoder = make_encoder(root / "encoder")
    task = make_task(root / "task", {"train": 160, "dev": 240, "test": 120})
    train(encoder, task, root / "run", "pabee")
    return root / "run"


def test_fit_then_calibrate_on_the_other_rows_then_predict(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit-agreement", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    rule = RunFolder(run).agreement_rule()
    assert f"fitted agreement rule {rule.fingerprint} on 120 dev rows" in out and rule.fit_split == "dev"
    args = ["calibrate", str(run), "--max-drop", "0.3", "--confidence", "0.9", "--quiet"]
    assert main([*args, "--strategies", "agreement,entropy"]) == 0
    record = json.loads(RunFolder(run).calibration_file.read_text())
    assert record["n_calibration"] == 120  # the 120 rows that fitted the rule are left out, for every family
    assert record["split"]["left_out"] == "120 of the 240 dev rows fitted the agreement rule and are left out"
    families = [c["family"] for c in record["choices"]]
    assert families == ["agreement", "entropy"]
    agreement = record["choices"][0]
    assert not agreement["full_model"] and agreement["strategy"].endswith(f"rule={rule.fingerprint})")
    assert agreement["speedup"] > 1.0
    # the Predictor and `predict` run a given setting with the rule's weights attached
    predictor = Predictor.from_run(run, agreement["strategy"])
    assert isinstance(predictor.strategy, Agreement) and predictor.strategy.fitted.fingerprint == rule.fingerprint
    assert len(predictor.predict(["alpha good beta", "bad gamma"])) == 2
    assert main(["predict", str(run), "alpha good beta", "--strategy", agreement["strategy"]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["label"] in ("pos", "neg")
    # evaluate sweeps its grid beside the others; analyze and report run its selected setting
    assert main(["evaluate", str(run), "--strategies", "entropy,agreement", "--quiet"]) == 0
    report = RunFolder(run).report()
    assert report["agreement_rule"] == {"rule": rule.fingerprint, "fit_split": "dev", "fit_rows": 120}
    assert "agreement" in report["selected"]  # None here: the tiny model's rule jumps from 1x to 4x, past the band
    points = (run / "eval" / "points.csv").read_text()
    assert points.count("agreement(") == 2 * 41  # every threshold, on dev and test
    assert main(["analyze", str(run), "--quiet"]) == 0
    assert main(["report", str(run), "--quiet"]) == 0  # shows the calibrated agreement setting, weights attached
    assert f"rule={rule.fingerprint}" in (run / "report.html").read_text()
    # without fit rows of its split left out (another split fitted the rule), all rows calibrate
    assert main(["fit-agreement", str(run), "--split", "test", "--quiet"]) == 0
    assert "warning: the rule learned from 60 test rows" in capsys.readouterr().err
    assert main([*args, "--strategies", "agreement"]) == 0
    assert json.loads(RunFolder(run).calibration_file.read_text())["n_calibration"] == 240
    assert main(["evaluate", str(run), "--strategies", "agreement", "--quiet"]) == 0
    assert "fitted on 60 of these test rows" in capsys.readouterr().err
    # a rule fitted for another run's shape is refused by name
    assert main(["fit-agreement", str(run), "--fraction", "1.5", "--quiet"]) == 2
    assert "--fraction must be between 0 and 1" in capsys.readouterr().err
