"""The early-exit model: shapes, save/load round trip, and online inference equal to offline replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerexit import strategies
from layerexit.errors import LayerExitError
from layerexit.model import EarlyExitModel, ExitConfig
from layerexit.runtime.loop import early_exit_forward

from .conftest import ARCHITECTURES, NEWER_ARCHITECTURES, random_batch, tiny_model


@pytest.mark.parametrize("head", ["mlp", "linear"])
@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_forward_returns_every_exit(head: str, pooling: str) -> None:
    model = tiny_model(head=head, pooling=pooling)
    ids, mask = random_batch()
    out = model(ids, mask)
    assert out.logits.shape == (4, 6, 3)  # (L, B, C)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(4, 6))


def test_mean_pooling_ignores_padding() -> None:
    model = tiny_model(pooling="mean")
    ids, mask = random_batch()
    longer_ids = torch.cat([ids, torch.full((6, 3), 7)], 1)
    longer_mask = torch.cat([mask, torch.zeros(6, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(model(ids, mask).logits, model(longer_ids, longer_mask).logits, atol=1e-5, rtol=1e-4)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = tiny_model("albert", head="linear", pooling="first")
    model.config.label_names = ["a", "b", "c"]
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone", "layerexit.json", "model.safetensors"]
    loaded = EarlyExitModel.from_pretrained(tmp_path)
    assert loaded.config == model.config
    ids, mask = random_batch()
    torch.testing.assert_close(loaded(ids, mask).logits, model(ids, mask).logits)


def test_loading_rejects_damaged_files(tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(LayerExitError, match="safetensors"):
        EarlyExitModel.from_pretrained(tmp_path)

    weights.write_bytes(good)
    state = load_file(str(weights))
    state["exits.0.classifier.weight"] = torch.zeros(5, 32)
    save_file(state, str(weights))
    with pytest.raises(LayerExitError, match="shape"):
        EarlyExitModel.from_pretrained(tmp_path)

    del state["exits.0.classifier.weight"]
    save_file(state, str(weights))
    with pytest.raises(LayerExitError, match="missing"):
        EarlyExitModel.from_pretrained(tmp_path)

    weights.write_bytes(good)
    config = json.loads((tmp_path / "layerexit.json").read_text())
    config["num_layrs"] = 4
    (tmp_path / "layerexit.json").write_text(json.dumps(config))
    with pytest.raises(LayerExitError, match="unknown keys"):
        EarlyExitModel.from_pretrained(tmp_path)

    del config["num_layrs"]
    config["num_layers"] = 6
    (tmp_path / "layerexit.json").write_text(json.dumps(config))
    with pytest.raises(LayerExitError, match="6 exits"):
        EarlyExitModel.from_pretrained(tmp_path)

    with pytest.raises(LayerExitError, match="not a saved layerexit model"):
        EarlyExitModel.from_pretrained(tmp_path / "backbone")


def test_config_validation() -> None:
    with pytest.raises(LayerExitError, match="num_labels"):
        ExitConfig(backbone="x", num_labels=1)
    with pytest.raises(LayerExitError, match="head"):
        ExitConfig(backbone="x", num_labels=2, head="deep")  # type: ignore[arg-type]


def _peaked(model: EarlyExitModel, scale: float = 8.0) -> EarlyExitModel:
    """Random exits are near uniform; scaled up, their predictions differ from layer to layer."""
    with torch.no_grad():
        for head in model.exits:
            head.classifier.weight.mul_(scale)
    return model


CANDIDATES: dict[str, list[strategies.Strategy]] = {
    "entropy": [strategies.Entropy(threshold=t) for t in (0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99)],
    "maxprob": [strategies.MaxProb(threshold=t) for t in (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)],
    "patience": [strategies.Patience(patience=p) for p in (1, 2)],
    "voting": [strategies.Voting(k=k, threshold=t) for k in (0.5, 0.0) for t in (1.2, 1.5, 2.0)],
    "hybrid": [strategies.Hybrid(k=0.0, threshold=3, entropy_threshold=t) for t in (0.4, 0.6, 0.8, 0.9, 0.95)],
    "static": [strategies.Static(layer=2)],
    "pcee": [strategies.Pcee(threshold=t, patience=2) for t in (0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99)],
}


def _varied(name: str, probs: torch.Tensor) -> strategies.Strategy:
    """The first candidate setting under which samples leave at different layers."""
    for strategy in CANDIDATES[name]:
        if strategy.replay(probs)[0].unique().numel() >= 2 or name == "static":
            return strategy
    raise AssertionError(f"no {name} setting gives varied exits; the test model is too uniform")


@pytest.mark.parametrize("arch", ["bert", "mpnet", "deberta-v2", "distilbert"])
@pytest.mark.parametrize("name", list(CANDIDATES))
def test_online_equals_offline_batched_and_one_by_one(arch: str, name: str) -> None:
    model = _peaked(tiny_model(arch, num_labels=3))
    ids, mask = random_batch(batch=12, length=13, seed=4)
    with torch.no_grad():
        probs = model(ids, mask).probs  # (L, B, C)
    strategy = _varied(name, probs)
    offline_layer, offline_pred = strategy.replay(probs)

    batched = early_exit_forward(model, strategy, ids, mask)
    assert torch.equal(batched.exit_layer, offline_layer)
    assert torch.equal(batched.prediction, offline_pred)
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        single = early_exit_forward(model, strategy, ids[row : row + 1, :n], mask[row : row + 1, :n])
        assert single.exit_layer.item() == offline_layer[row].item()
        assert single.prediction.item() == offline_pred[row].item()
        torch.testing.assert_close(single.probs[0], batched.probs[row], atol=1e-5, rtol=1e-4)


def test_skipped_layers_are_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _peaked(tiny_model("bert"))
    ids, mask = random_batch(batch=12, length=13, seed=4)
    with torch.no_grad():
        strategy = _varied("entropy", model(ids, mask).probs)
    calls: list[int] = []
    original = model.backbone.layer

    def counting_layer(index, hidden, kwargs):  # type: ignore[no-untyped-def]
        calls.append(hidden.shape[0])
        return original(index, hidden, kwargs)

    monkeypatch.setattr(model.backbone, "layer", counting_layer)
    result = early_exit_forward(model, strategy, ids, mask)
    # layer l runs once, on exactly the rows that had not exited before it
    assert len(calls) == int(result.exit_layer.max())
    for layer, rows in enumerate(calls, start=1):
        assert rows == int((result.exit_layer >= layer).sum())
    assert sum(calls) == int(result.exit_layer.sum())  # rows x layers computed = sum of exit layers

    calls.clear()
    early_exit_forward(model, strategies.Static(layer=1), ids[:1], mask[:1])
    assert calls == [1]


@pytest.mark.parametrize("arch", ARCHITECTURES + NEWER_ARCHITECTURES)
def test_every_architecture_runs_online(arch: str) -> None:
    model = tiny_model(arch)
    ids, mask = random_batch()
    result = early_exit_forward(model, strategies.Patience(patience=1), ids, mask)
    offline = strategies.Patience(patience=1).replay(model(ids, mask).probs)
    assert torch.equal(result.exit_layer, offline[0])


def test_temperatures_scale_probabilities_and_survive_saving(tmp_path: Path) -> None:
    model = tiny_model()
    ids, mask = random_batch()
    logits = model(ids, mask).logits
    model.set_temperatures([2.0, 1.0, 0.5, 4.0])
    scaled = model(ids, mask).logits
    for i, t in enumerate([2.0, 1.0, 0.5, 4.0]):
        torch.testing.assert_close(scaled[i], logits[i] / t)
    model.save_pretrained(tmp_path)
    loaded = EarlyExitModel.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(ids, mask).logits, scaled)
    with pytest.raises(LayerExitError, match="positive"):
        model.set_temperatures([1.0, 0.0, 1.0, 1.0])


def test_fitted_temperature_lowers_dev_nll() -> None:
    from layerexit.methods import fit_temperature

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (400,), generator=g)
    logits = torch.randn(400, 3, generator=g) + 2.0 * torch.nn.functional.one_hot(labels, 3)
    overconfident = logits * 5
    t = fit_temperature(overconfident, labels)
    assert t == pytest.approx(5 * fit_temperature(logits, labels), rel=0.02)  # scaling logits scales T
    nll = torch.nn.functional.cross_entropy
    assert nll(overconfident / t, labels) < nll(overconfident, labels)
