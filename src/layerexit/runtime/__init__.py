"""Running a trained model: one runtime protocol (PyTorch, ONNX Runtime fp32 and int8) and one exit loop.

* :mod:`layerexit.runtime.base`: the protocol (``embed``, ``layer``, ``take``, ``join``, ``full``) and
  the runtime names;
* :mod:`layerexit.runtime.loop`: the exit loop every caller uses (``early_exit``, ``all_exits``,
  ``collect_probs``, ``model_probs``);
* :mod:`layerexit.runtime.registry`: one entry per runtime (loader, export, engine placement);
* :mod:`layerexit.runtime.torch_runtime`, :mod:`layerexit.runtime.onnx_runtime`: the implementations;
  :mod:`layerexit.runtime.onnx_export` writes what the ONNX one loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerexit.runtime.base import RUNTIMES, Rows, Runtime, parse_runtime
from layerexit.runtime.registry import REGISTRY, RuntimeEntry, register_runtime, runtime_entry

if TYPE_CHECKING:
    from layerexit.model import EarlyExitModel
    from layerexit.run_folder import RunFolder

__all__ = [
    "REGISTRY",
    "RUNTIMES",
    "Rows",
    "Runtime",
    "RuntimeEntry",
    "load_runtime",
    "parse_runtime",
    "register_runtime",
    "runtime_entry",
]


def load_runtime(
    run: RunFolder, name: str, *, model: EarlyExitModel | None = None, threads: int | None = None
) -> Runtime:
    """The runtime ``name`` for a saved run: its PyTorch model (``model`` if already loaded), or the ONNX
    graphs `layerexit export` wrote into it (``threads``: ONNX Runtime intra-op threads per session)."""
    return runtime_entry(name).load(run, model, threads)
