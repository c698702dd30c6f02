"""``layerexit serve``'s options: one typed EngineConfig generates the flags, and Ray Serve's ``key=value``
arguments are validated into the same dataclass (no Ray needed to test that)."""

from __future__ import annotations

import pickle

import pytest

from layerexit.cli import build_parser
from layerexit.config import from_namespace
from layerexit.errors import LayerExitError
from layerexit.serving.config import EngineConfig


def test_the_serve_flags_are_the_config_fields() -> None:
    args = build_parser().parse_args(["serve", "runs/x", "--max-batch", "8", "--policy", "oldest", "--port", "9000"])
    config = from_namespace(EngineConfig, args)
    assert config == EngineConfig(run="runs/x", max_batch=8, policy="oldest", port=9000)
    assert config.place == "process" and EngineConfig(run="r", runtime="onnx").place == "thread"
    assert pickle.loads(pickle.dumps(config)) == config  # what the in-process engine receives
    defaults = from_namespace(EngineConfig, build_parser().parse_args(["serve", "runs/x"]))
    assert defaults == EngineConfig(run="runs/x")


def test_key_value_arguments_are_typed_and_checked() -> None:
    config = EngineConfig.from_mapping({"run": "runs/x", "max_batch": "8", "max_wait_ms": "2.5", "strategy": "entropy"})
    assert (config.max_batch, config.max_wait_ms, config.strategy) == (8, 2.5, "entropy")
    with pytest.raises(LayerExitError, match="give the run folder"):
        EngineConfig.from_mapping({"scheduler": "pooled"})
    with pytest.raises(LayerExitError, match=r"unknown options \['batch_size'\]"):
        EngineConfig.from_mapping({"run": "r", "batch_size": "8"})
    with pytest.raises(LayerExitError, match="max_batch"):
        EngineConfig.from_mapping({"run": "r", "max_batch": "many"})
    with pytest.raises(LayerExitError, match="--scheduler must be one of full, batch, pooled, got 'fifo'"):
        EngineConfig.from_mapping({"run": "r", "scheduler": "fifo"})
    with pytest.raises(LayerExitError, match="--max-queue must be >= 1"):
        EngineConfig(run="r", max_queue=0)
