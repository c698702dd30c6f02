"""The method registry: one entry per training method, its options under one name and one default."""

from __future__ import annotations

import argparse
import typing
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from layerexit import losses, methods
from layerexit.config import TrainConfig, add_arguments, load_train_config
from layerexit.errors import LayerExitError
from layerexit.methods import METHODS, EnsembleOptions, Method, MethodOptions, RetrofitOptions, Stage, StaticOptions

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.options is not MethodOptions])
def test_train_config_mirrors_each_option_of_each_method(name: str) -> None:
    """Same name, type, default, help and flag in the method's options and in the flat TrainConfig."""
    options = METHODS[name].options
    ours = {f.name: f for f in fields(TrainConfig)}
    hints, their_hints = typing.get_type_hints(TrainConfig), typing.get_type_hints(options)
    for f in fields(options):
        assert f.name in ours, f"TrainConfig lacks {name}'s option {f.name} (add it with option_of)"
        assert ours[f.name].default == f.default, f.name
        assert dict(ours[f.name].metadata) == dict(f.metadata), f.name
        assert hints[f.name] == their_hints[f.name], f.name


def test_flags_keep_their_spellings_and_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig)
    args = parser.parse_args([])
    assert (args.lam, args.weighting, args.drop_last_diversity, args.detach_teacher, args.min_over) == (
        0.1,
        "auto",
        True,
        True,
        "batch",
    )
    assert args.static_layers == 0
    assert (args.exit_epochs, args.exit_lr, args.exit_loss, args.exit_pooling) == (100, 2e-3, "distill", "auto")
    given = parser.parse_args(
        ["--objective", "ensemble", "--lambda", "0.3", "--no-detach-teacher", "--weighting", "uniform"]
    )
    config = TrainConfig(**vars(given))
    assert config.method_options() == EnsembleOptions(lam=0.3, weighting="uniform", detach_teacher=False)
    assert EnsembleOptions() == TrainConfig(objective="ensemble").method_options()  # one default, whoever asks
    assert RetrofitOptions() == TrainConfig().method_options()  # the default method's


def test_saved_configs_of_committed_runs_load() -> None:
    paths = sorted((ROOT / "studies" / "results").rglob("config.json"))
    assert paths
    for path in paths:
        config = load_train_config(path)
        assert isinstance(config.method_options(), METHODS[config.objective].options)


def test_options_are_checked_where_they_are_declared() -> None:
    with pytest.raises(LayerExitError, match="--lambda must be >= 0"):
        EnsembleOptions(lam=-1)
    with pytest.raises(LayerExitError, match="--lambda must be >= 0"):
        TrainConfig(objective="finetune", lam=-1)  # compare trains every method from one configuration
    with pytest.raises(LayerExitError, match="needs --static-layers >= 1"):
        TrainConfig(objective="static")
    TrainConfig(objective="static", static_layers=2)


def test_comparisons_read_labels_and_strategies_from_the_registry() -> None:
    from layerexit import compare

    assert {m.name: m.label for m in METHODS.values() if m.label} == compare.LABELS
    assert {m.name: m.native_strategy for m in METHODS.values() if m.native_strategy} == compare.NATIVE
    assert {n for n, m in METHODS.items() if m.first_stage == "finetune"} == {
        "deebert",
        "fastbert",
        "joint-distill",
        "retrofit",
    }
    assert methods.parse_method("static:3") == ("static", 3)
    with pytest.raises(LayerExitError, match="only static takes a layer count"):
        methods.parse_method("pabee:3")
    for name in METHODS:
        assert f"{name}: " in methods.objective_help()
        assert f"| `{name}` |" in methods.markdown_table()


def test_a_new_method_is_its_entry_and_its_loss() -> None:
    """What adding a method takes: a loss and an entry; train, compare and the report then know it."""

    def last_two(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return losses.relevancy(logits[-2:], labels)

    entry = Method(
        "lasttwo",
        "cross-entropy at the last two exits",
        lambda num_layers, options, model_type: [Stage("lasttwo", last_two, "all", num_layers, (num_layers,))],
        label="last two",
        native_strategy="entropy",
    )
    methods.register_method(entry)
    try:
        with pytest.raises(ValueError, match="registered already"):
            methods.register_method(entry)
        assert entry.options_of(TrainConfig()) == MethodOptions()
        (stage,) = methods.build("lasttwo", 4)
        logits, labels = torch.randn(4, 2, 3), torch.tensor([0, 1])
        assert stage.loss(logits, labels).item() == pytest.approx(losses.relevancy(logits[2:], labels).item())
        assert methods.parse_method("lasttwo") == ("lasttwo", 0)
        assert methods.labels()["lasttwo"] == "last two"
    finally:
        del METHODS["lasttwo"]


def test_static_options_reach_the_stage() -> None:
    (stage,) = methods.build("static", 6, StaticOptions(static_layers=3))
    assert (stage.name, stage.depth, stage.exits) == ("static-3", 3, (3,))
    with pytest.raises(ValueError, match="unknown objective"):
        methods.build("magic", 4)
