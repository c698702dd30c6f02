"""Safe loading: weights only from safetensors, and every damaged or mismatched file refused in plain words."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerexit.config import TrainConfig, load_train_config, save_config
from layerexit.errors import LayerExitError
from layerexit.model import EarlyExitModel
from layerexit.run_folder import load_probs, save_probs

from .conftest import tiny_model

SRC = Path(__file__).resolve().parents[1] / "src" / "layerexit"


def test_no_pickle_anywhere_in_the_package() -> None:
    """Nothing in layerexit can unpickle: no torch.load, no pickle, no torch.save either."""
    pattern = re.compile(
        r"torch\.(load|save)\(|^\s*(import|from)\s+(c?pickle|_pickle|dill|joblib|marshal|shelve)\b"
        r"|\bpickle\.(loads?|Unpickler)|weights_only|numpy\.load|np\.load\(.*allow_pickle"
    )
    offenders = [
        f"{path.name}:{number}"
        for path in sorted(SRC.glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_an_encoder_with_pickled_weights_only_is_refused(tmp_path: Path) -> None:
    encoder = tmp_path / "encoder"
    tiny_model().backbone.model.config.save_pretrained(encoder)
    (encoder / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n")  # would run code if unpickled
    with pytest.raises(LayerExitError, match=r"model\.safetensors"):
        EarlyExitModel.from_backbone(str(encoder), 3)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    tiny_model().save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _edit_weights(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _more_layers(folder: Path) -> None:
    _edit_json(folder / "backbone" / "config.json", lambda c: c.update(num_hidden_layers=2))
    _edit_json(folder / "layerexit.json", lambda c: c.update(num_layers=2))


def _huge_encoder(folder: Path) -> None:
    """A configuration that would need terabytes: it must be refused before anything is allocated."""
    _edit_json(folder / "backbone" / "config.json", lambda c: c.update(num_hidden_layers=100_000))
    _edit_json(folder / "layerexit.json", lambda c: c.update(num_layers=100_000))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: _truncate(m / "layerexit.json"), "layerexit.json: not valid JSON"),
        (lambda m: _truncate(m / "backbone" / "config.json"), "config.json: not valid JSON"),
        (lambda m: _truncate(m / "model.safetensors"), "not a readable safetensors file"),
        (lambda m: (m / "model.safetensors").write_bytes(b""), "not a readable safetensors file"),
        (lambda m: (m / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda m: _edit_json(m / "layerexit.json", lambda c: c.update(num_labels=2)), "for 3 labels"),
        (lambda m: _edit_json(m / "layerexit.json", lambda c: c.update(num_labels="3")), "wrong type"),
        (lambda m: _edit_json(m / "layerexit.json", lambda c: c.update(num_layers=6)), "6 exits"),
        (lambda m: _edit_json(m / "layerexit.json", lambda c: c.update(extra=1)), "unknown keys ['extra']"),
        (lambda m: _edit_json(m / "layerexit.json", lambda c: c.update(temperatures=["1"] * 4)), "numbers"),
        (lambda m: (m / "layerexit.json").write_text("[1, 2]"), "expected a JSON object"),
        (lambda m: _edit_json(m / "backbone" / "config.json", lambda c: c.update(model_type="nope")), "encoder"),
        (_more_layers, "the weights have 4 exits, the model has 2"),
        (lambda m: _edit_json(m / "layerexit.json", lambda c: c.update(num_labels=10**9)), "for 3 labels"),
        (lambda m: _edit_json(m / "backbone" / "config.json", lambda c: c.update(hidden_size=2**20)), "has shape"),
        (lambda m: _huge_encoder(m), "the weights have 4 exits, the model has 100000"),
        (lambda m: _edit_weights(m / "model.safetensors", lambda s: s.update(extra=torch.zeros(1))), "unexpected"),
        (
            lambda m: _edit_weights(
                m / "model.safetensors",
                lambda s: s.update({"exits.0.classifier.bias": torch.zeros(3, dtype=torch.long)}),
            ),
            "torch.int64",
        ),
        (
            lambda m: _edit_weights(
                m / "model.safetensors", lambda s: s.update({"exits.1.hidden.weight": torch.zeros(32, 31)})
            ),
            "has shape (32, 31)",
        ),
    ],
    ids=[
        "config-truncated",
        "backbone-truncated",
        "weights-truncated",
        "weights-empty",
        "weights-missing",
        "labels",
        "label-type",
        "exits-config",
        "unknown-key",
        "temperature-type",
        "not-object",
        "unknown-encoder",
        "exits-weights",
        "a-billion-labels",
        "huge-hidden",
        "huge-depth",
        "extra-tensor",
        "dtype",
        "shape",
    ],
)
def test_a_damaged_or_mismatched_model_is_refused(saved: Path, damage: Callable[[Path], None], message: str) -> None:
    damage(saved)
    with pytest.raises(LayerExitError) as caught:
        EarlyExitModel.from_pretrained(saved)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"lam": 0.3, "epo', "cannot read the run configuration"),
        ("[]", "expected a JSON object"),
        ('{"lambda": 0.3}', "unknown keys ['lambda']"),
        ('{"lam": "0.3"}', "--lambda must be int or float"),
        ('{"epochs": 1.5}', "--epochs must be int"),
        ('{"lam": -1}', "--lambda must be >= 0"),
        ('{"mixed_precision": "fp8"}', "--mixed-precision must be one of"),
        (b"\xff\xfe\x00", "cannot read the run configuration"),
    ],
)
def test_a_damaged_run_configuration_is_refused(tmp_path: Path, content: str | bytes, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(LayerExitError) as caught:
        load_train_config(path)
    assert message in str(caught.value)


def test_run_configuration_round_trip(tmp_path: Path) -> None:
    config = TrainConfig(lam=0.2, grad_accum=2, mixed_precision="bf16", checkpoint_every=7, exit_dropout=0.0)
    save_config(config, tmp_path / "config.json")
    assert load_train_config(tmp_path / "config.json") == config
    assert not list(tmp_path.glob("*.tmp"))


def test_stored_probabilities_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "probs.safetensors"
    save_probs(path, torch.rand(4, 5, 3), torch.zeros(5, dtype=torch.long))
    assert load_probs(path)[0].shape == (4, 5, 3)
    for probs, labels in [(torch.rand(5, 3), torch.zeros(5)), (torch.rand(4, 5, 3), torch.zeros(6, dtype=torch.long))]:
        save_file({"probs": probs, "labels": labels}, str(path))
        with pytest.raises(LayerExitError, match="wrong shapes"):
            load_probs(path)
