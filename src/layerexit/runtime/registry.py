"""Every runtime, one entry each: its name, how it is loaded for a run, what `layerexit export` writes for
it, and how the server places its engine. Commands, the run folder, the predictor and the server read
this table; none of them names a runtime.

Adding a runtime: a module implementing the protocol of :mod:`layerexit.runtime.base`, its
:class:`RuntimeEntry` passed to :func:`register_runtime` here, and the online-equals-offline tests
parametrised over it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerexit.errors import LayerExitError

if TYPE_CHECKING:
    from layerexit.model import EarlyExitModel
    from layerexit.run_folder import RunFolder
    from layerexit.runtime.base import Runtime
    from layerexit.runtime.onnx_export import Quantize

Loader = Callable[["RunFolder", "EarlyExitModel | None", "int | None"], "Runtime"]
"""(run folder, its PyTorch model if already loaded, threads) -> the runtime."""
Exporter = Callable[["EarlyExitModel", Path, int, Any, "Callable[[], list[Batch]]"], Path]
"""(model, output folder, ONNX opset, tokenizer, the run's calibration batches on demand) -> the folder
written. Calibration batches are token batches of the run's training texts (static quantization)."""
Batch = tuple[Any, Any, Any]
"""(input_ids, attention_mask, token_type_ids or None), padded tensors."""


@dataclass(frozen=True)
class RuntimeEntry:
    name: str
    help: str
    load: Loader
    export: Exporter | None = None
    """What `layerexit export --runtime NAME` writes; None: nothing to export (the run folder is enough)."""
    export_folder: str | None = None
    """The run-folder subfolder the export goes to and the runtime loads from."""
    holds_gil: bool = False
    """Its threads take the GIL back often (after every operator): the server then runs its engine in a
    process of its own (``--engine auto``), so HTTP and tokenising are not starved (docs/serve.md)."""
    prepare: Callable[[int | None], None] | None = None
    """Process-wide set-up with the thread count, before anything of the runtime is created in the process
    (:func:`prepare_process`); None: none needed."""

    @property
    def eval_folder(self) -> str:
        """The run-folder subfolder of its evaluation outputs (``eval`` for the reference runtime)."""
        return "eval" if self.name == REFERENCE else f"eval-{self.name}"

    @property
    def engine_place(self) -> str:
        """Where ``layerexit serve --engine auto`` runs its engine: ``process`` or ``thread``."""
        return "process" if self.holds_gil else "thread"


def _load_torch(run: RunFolder, model: EarlyExitModel | None, threads: int | None) -> Runtime:
    from layerexit.model import EarlyExitModel
    from layerexit.runtime.torch_runtime import TorchRuntime

    return TorchRuntime(model if model is not None else EarlyExitModel.from_pretrained(run.path))


def _onnx(name: str, quantize: Quantize) -> tuple[Loader, Exporter]:
    def load(run: RunFolder, model: EarlyExitModel | None, threads: int | None) -> Runtime:
        from layerexit.runtime.onnx_runtime import OnnxRuntime

        return OnnxRuntime.load(run.require_export(name), threads=threads)

    def export(
        model: EarlyExitModel, out: Path, opset: int, tokenizer: Any, calibration: Callable[[], list[Batch]]
    ) -> Path:
        from layerexit.runtime.onnx_export import export_onnx

        batches = calibration() if quantize == "static" else []
        return export_onnx(
            model,
            out,
            opset=opset,
            quantize=quantize,
            tokenizer=tokenizer,
            calibration=batches,
        )

    return load, export


def _share_ort_threads(threads: int | None) -> None:
    from layerexit.runtime.onnx_runtime import share_thread_pool

    share_thread_pool(threads)  # False where sessions exist already: each keeps its own pool, as before


def prepare_process(names: Sequence[str], threads: int | None) -> None:
    """Run the ``prepare`` of each named runtime once, before any of them is loaded (``--shared-pool``: for
    ONNX Runtime, one thread pool shared by the sessions of every layer)."""
    done = set()
    for name in names:
        prepare = runtime_entry(name).prepare
        if prepare is not None and prepare not in done:
            prepare(threads)
            done.add(prepare)


REFERENCE = "torch"
"""The runtime every other is compared with (and trained in)."""

REGISTRY: dict[str, RuntimeEntry] = {}


def register_runtime(entry: RuntimeEntry) -> RuntimeEntry:
    if entry.name in REGISTRY:
        raise LayerExitError(f"runtime {entry.name!r} is registered already")
    REGISTRY[entry.name] = entry
    return entry


register_runtime(RuntimeEntry("torch", "PyTorch, eager, one layer at a time", _load_torch, holds_gil=True))
register_runtime(
    RuntimeEntry(
        "onnx", "ONNX Runtime, fp32 graphs", *_onnx("onnx", None), export_folder="onnx", prepare=_share_ort_threads
    )
)
register_runtime(
    RuntimeEntry(
        "onnx-int8",
        "ONNX Runtime, int8 with activation scales computed per batch (dynamic quantisation)",
        *_onnx("onnx-int8", "dynamic"),
        "onnx-int8",
        prepare=_share_ort_threads,
    )
)
register_runtime(
    RuntimeEntry(
        "onnx-int8-static",
        "ONNX Runtime, int8 with activation scales fixed on training texts (static QDQ): a row's answer "
        "does not depend on its batch-mates",
        *_onnx("onnx-int8-static", "static"),
        "onnx-int8-static",
        prepare=_share_ort_threads,
    )
)
register_runtime(
    RuntimeEntry(
        "onnx-int8-token",
        "ONNX Runtime, int8 with one activation scale per token, computed in the graph: a row's answer does "
        "not depend on its batch-mates, nothing to calibrate, closest of the int8 runtimes to fp32",
        *_onnx("onnx-int8-token", "token"),
        "onnx-int8-token",
        prepare=_share_ort_threads,
    )
)


def runtime_entry(name: str) -> RuntimeEntry:
    """The entry of a runtime name, checked: the one place the names are read."""
    if name not in REGISTRY:
        raise LayerExitError(f"unknown runtime {name!r}; expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def exportable() -> tuple[str, ...]:
    """The runtimes `layerexit export` writes something for."""
    return tuple(name for name, entry in REGISTRY.items() if entry.export is not None)
