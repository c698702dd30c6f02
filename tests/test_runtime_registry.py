"""The runtime registry: every runtime is one entry (loader, export, folders, engine placement), and a new
one registered there is loaded, evaluated into its own folder and placed by the server without any other
change."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from layerexit.errors import LayerExitError
from layerexit.run_folder import RunFolder
from layerexit.runtime import RUNTIMES, load_runtime
from layerexit.runtime.registry import REGISTRY, RuntimeEntry, exportable, register_runtime, runtime_entry
from layerexit.runtime.torch_runtime import TorchRuntime
from layerexit.serving.config import EngineConfig


def test_the_built_in_runtimes() -> None:
    assert RUNTIMES == ("torch", "onnx", "onnx-int8", "onnx-int8-static", "onnx-int8-token")
    assert exportable() == ("onnx", "onnx-int8", "onnx-int8-static", "onnx-int8-token")
    run = RunFolder("runs/x")
    assert [run.eval_dir(name).name for name in RUNTIMES] == [
        "eval",
        "eval-onnx",
        "eval-onnx-int8",
        "eval-onnx-int8-static",
        "eval-onnx-int8-token",
    ]
    assert [run.export_dir(name).name for name in exportable()] == list(exportable())
    assert [EngineConfig(run="r", runtime=name).place for name in RUNTIMES] == ["process"] + ["thread"] * 4
    with pytest.raises(LayerExitError, match="the torch runtime has no export folder"):
        run.export_dir("torch")
    with pytest.raises(LayerExitError, match="unknown runtime 'tensorrt'; expected one of torch, onnx, onnx-int8"):
        runtime_entry("tensorrt")
    with pytest.raises(LayerExitError, match="registered already"):
        register_runtime(REGISTRY["torch"])


@pytest.fixture
def eager_copy() -> Iterator[RuntimeEntry]:
    """A second PyTorch runtime under another name, registered for one test."""
    entry = register_runtime(
        RuntimeEntry("eager-copy", "PyTorch again", lambda run, model, threads: TorchRuntime(model), holds_gil=False)
    )
    yield entry
    del REGISTRY[entry.name]


def test_a_new_runtime_is_its_entry(eager_copy: RuntimeEntry, tmp_path: Path) -> None:
    from .conftest import tiny_model

    model = tiny_model("bert", num_labels=2)
    runtime = load_runtime(RunFolder(tmp_path), "eager-copy", model=model)
    assert isinstance(runtime, TorchRuntime) and runtime.num_layers == model.num_layers
    assert RunFolder(tmp_path).eval_dir("eager-copy") == tmp_path / "eval-eager-copy"
    assert EngineConfig.from_mapping({"run": "r"}).place == "process"
    assert runtime_entry("eager-copy").engine_place == "thread"
