"""Property tests: strategies over any probabilities, parsers and loaders over any input.

Whatever comes in, the outcome is a result or a LayerExitError: never an unexplained exception.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerexit import strategies
from layerexit.config import TrainConfig, load_train_config
from layerexit.data import load_task
from layerexit.data.benchmarks import LAYOUTS
from layerexit.errors import LayerExitError
from layerexit.model import EarlyExitModel
from layerexit.run_folder import load_probs
from layerexit.training import checkpoint

from .conftest import tiny_model

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# Strategies over random probability tensors


@st.composite
def probability_tensors(draw: st.DrawFn) -> torch.Tensor:
    """(L, N, C) rows on the simplex, with exact 0s and 1s, ties, one-hot rows, uniform rows, L = 1."""
    layers = draw(st.integers(1, 6))
    samples = draw(st.integers(1, 7))
    classes = draw(st.integers(2, 6))
    kind = draw(st.sampled_from(["grid", "float", "onehot"]))
    shape = (layers, samples, classes)
    if kind == "grid":  # small integer weights: many ties and exact zeros
        weights = torch.tensor(
            draw(st.lists(st.integers(0, 3), min_size=layers * samples * classes, max_size=layers * samples * classes))
        )
        probs = weights.view(shape).double()
    elif kind == "float":
        values = st.floats(0, 1, allow_nan=False, width=32)
        probs = (
            torch.tensor(
                draw(st.lists(values, min_size=layers * samples * classes, max_size=layers * samples * classes))
            )
            .view(shape)
            .double()
        )
    else:
        picks = draw(st.lists(st.integers(0, classes - 1), min_size=layers * samples, max_size=layers * samples))
        probs = torch.nn.functional.one_hot(torch.tensor(picks), classes).view(shape).double()
    total = probs.sum(-1, keepdim=True)
    probs = torch.where(total > 0, probs / total.clamp_min(1e-300), torch.full_like(probs, 1.0 / classes))
    return probs.float()


@st.composite
def any_strategy(draw: st.DrawFn) -> strategies.Strategy:
    threshold = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 6.0]), st.floats(0, 8, allow_nan=False))
    k = st.one_of(st.sampled_from([0.0, 0.5, 0.999]), st.floats(0, 0.999, allow_nan=False))
    return draw(
        st.one_of(
            st.builds(strategies.Entropy, threshold, st.booleans()),
            st.builds(strategies.MaxProb, threshold),
            st.builds(strategies.Patience, st.integers(1, 8)),
            st.builds(strategies.Voting, k, threshold),
            st.builds(strategies.Hybrid, k, threshold, threshold),
            st.builds(strategies.Static, st.integers(1, 8)),
            st.just(strategies.Oracle()),
        )
    )


def online(
    strategy: strategies.Strategy, probs: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer by layer as inference runs it: exited rows leave the batch and the state."""
    num_layers, num_samples, num_classes = probs.shape
    state = strategy.init(num_samples, num_classes)
    rows = torch.arange(num_samples)
    exit_layer = torch.zeros(num_samples, dtype=torch.long)
    prediction = torch.zeros(num_samples, dtype=torch.long)
    for layer in range(1, num_layers + 1):
        fire, pred = strategy.step(state, layer, probs[layer - 1, rows], labels[rows])
        if layer == num_layers:
            fire = torch.ones_like(fire)
        exit_layer[rows[fire]] = layer
        prediction[rows[fire]] = pred[fire]
        keep = (~fire).nonzero().flatten()
        rows = rows[keep]
        state = strategies.select_state(state, keep)
        if rows.numel() == 0:
            break
    return exit_layer, prediction


@FUZZ
@given(probs=probability_tensors(), strategy=any_strategy(), data=st.data())
def test_strategies_never_raise_and_exit_within_the_model(
    probs: torch.Tensor, strategy: strategies.Strategy, data: st.DataObject
) -> None:
    num_layers, num_samples, num_classes = probs.shape
    labels = torch.tensor(
        data.draw(st.lists(st.integers(0, num_classes - 1), min_size=num_samples, max_size=num_samples))
    )
    exit_layer, prediction = strategy.replay(probs, labels)
    assert exit_layer.shape == prediction.shape == (num_samples,)
    assert bool(((exit_layer >= 1) & (exit_layer <= num_layers)).all())
    assert bool(((prediction >= 0) & (prediction < num_classes)).all())
    again = online(strategy, probs, labels)
    assert torch.equal(again[0], exit_layer) and torch.equal(again[1], prediction)
    if isinstance(strategy, strategies.Static):
        assert bool((exit_layer == min(strategy.layer, num_layers)).all())


@FUZZ
@given(spec=st.one_of(st.text(max_size=40), st.text(alphabet="votingeysaxp(),:=.0123456789-+e nafru", max_size=40)))
def test_any_strategy_text_parses_or_is_refused(spec: str) -> None:
    try:
        strategy = strategies.parse(spec)
    except LayerExitError as err:
        assert "\n" not in str(err)
        return
    assert isinstance(strategy, strategies.Strategy)
    assert str(strategies.parse(str(strategy))) == str(strategy)  # what is printed reads back


@FUZZ
@given(
    name=st.sampled_from(sorted(strategies.STRATEGIES)),
    values=st.lists(
        st.tuples(
            st.sampled_from(["k", "threshold", "patience", "layer", "entropy_threshold", "normalized", "name", "x"]),
            st.sampled_from(["0", "1", "-1", "0.5", "1e999", "-0", "nan", "inf", "true", "false", "", "2.5", "1e-300"]),
        ),
        max_size=4,
    ),
    colon=st.booleans(),
)
def test_structured_strategy_specs_parse_or_are_refused(name: str, values: list[tuple[str, str]], colon: bool) -> None:
    body = ", ".join(f"{k}={v}" for k, v in values)
    spec = f"{name}:{body}" if colon else f"{name}({body})"
    with contextlib.suppress(LayerExitError):
        strategies.parse(spec)


# ---------------------------------------------------------------------------------------------
# Malformed files

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    tiny_model().save_pretrained(folder)
    return folder


def _mutated_config(good: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    config = dict(good)
    for key in data.draw(st.lists(st.sampled_from([*good, "surprise"]), max_size=3)):
        if data.draw(st.booleans()):
            config.pop(key, None)
        else:
            config[key] = data.draw(json_values)
    return config


@FUZZ
@given(data=st.data(), what=st.sampled_from(["config", "weights-bytes", "weights-cut", "config-bytes", "backbone"]))
def test_a_malformed_model_folder_loads_or_is_refused(saved_model: Path, data: st.DataObject, what: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(saved_model, Path(tmp) / "model"))
        weights, config = folder / "model.safetensors", folder / "layerexit.json"
        if what == "config":
            config.write_text(json.dumps(_mutated_config(json.loads(config.read_text()), data)))
        elif what == "backbone":
            backbone = folder / "backbone" / "config.json"
            backbone.write_text(json.dumps(_mutated_config(json.loads(backbone.read_text()), data)))
        elif what == "config-bytes":
            config.write_bytes(data.draw(st.binary(max_size=64)))
        elif what == "weights-bytes":
            weights.write_bytes(data.draw(st.binary(max_size=256)))
        else:
            good = weights.read_bytes()
            cut = data.draw(st.integers(0, len(good) - 1))
            flip = data.draw(st.integers(0, 255))
            weights.write_bytes(
                good[:cut] + bytes([flip]) + good[cut + 1 :] if data.draw(st.booleans()) else good[:cut]
            )
        try:
            model = EarlyExitModel.from_pretrained(folder)
        except LayerExitError:
            return
        assert model.num_layers == 4


@FUZZ
@given(data=st.data())
def test_a_malformed_run_configuration_loads_or_is_refused(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        good = json.loads(json.dumps(TrainConfig().__dict__))
        content = data.draw(st.one_of(json_values.map(json.dumps), st.just(json.dumps(_mutated_config(good, data)))))
        path.write_text(content)
        with contextlib.suppress(LayerExitError):
            load_train_config(path)


@FUZZ
@given(data=st.data())
def test_malformed_stored_probabilities_are_refused(data: st.DataObject) -> None:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probs.safetensors"
        if data.draw(st.booleans()):
            path.write_bytes(data.draw(st.binary(max_size=128)))
        else:
            shapes = st.lists(st.integers(0, 3), max_size=4).map(tuple)
            dtypes = st.sampled_from([torch.float32, torch.int64, torch.bool])
            tensors = {
                name: torch.zeros(data.draw(shapes), dtype=data.draw(dtypes))
                for name in data.draw(st.lists(st.sampled_from(["probs", "labels", "other"]), unique=True))
            }
            save_file(tensors, str(path))
        try:
            probs, labels = load_probs(path)
        except LayerExitError:
            return
        assert probs.dim() == 3 and labels.shape == (probs.shape[1],)


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint of a tiny model after one optimizer step."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)).logits.sum().backward()
    optimizer.step()
    run = tmp_path_factory.mktemp("ckpt")
    state = {
        "config": TrainConfig().__dict__,
        "world_size": 1,
        "running": 0.0,
        "best": {"score": None},
        "closest": [[0] * 4] * 4,
        "results": [],
        "log_offset": 0,
        "seconds": 0.0,
        "scheduler": {},
        "scaler": None,
    }
    rng = {f"{k}.rank0": v for k, v in checkpoint.capture_rng().items()}
    rng["data_order"] = torch.Generator().get_state()
    return checkpoint.save(
        run, position=checkpoint.Position(0, 1, 0, 1), state=state, model=model, optimizer=optimizer, rng=rng
    )


@FUZZ
@given(data=st.data())
def test_a_malformed_checkpoint_loads_or_is_refused(checkpoint_folder: Path, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(checkpoint_folder, Path(tmp) / "checkpoint"))
        target = folder / data.draw(st.sampled_from(checkpoint.FILES))
        if target.name == checkpoint.STATE and data.draw(st.booleans()):
            target.write_text(json.dumps(_mutated_config(json.loads(target.read_text()), data)))
        else:
            good = target.read_bytes()
            target.write_bytes(good[: data.draw(st.integers(0, len(good)))])
        try:
            loaded = checkpoint.load(folder, TrainConfig(), 1)
            checkpoint.rng_for(loaded, 0)
        except LayerExitError:
            pass


@st.composite
def table_bytes(draw: st.DrawFn) -> bytes:
    parts = st.sampled_from([*list('\t,"\n\r{}:ab1 0\x00é\\'), "sentence", "label", "#1 String", "Quality", "1\t"])
    return draw(st.one_of(st.binary(max_size=150), st.lists(parts, max_size=60).map(lambda p: "".join(p).encode())))


@FUZZ
@given(key=st.sampled_from(sorted(LAYOUTS)), data=st.data())
def test_malformed_benchmark_folders_load_or_are_refused(key: str, data: st.DataObject) -> None:
    layout = LAYOUTS[key][0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / layout.name
        for split, name in layout.files.items():
            if split == "train" or data.draw(st.booleans()):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data.draw(table_bytes()))
        try:
            task = load_task(folder)
        except LayerExitError:
            return
        assert task.splits["train"]
