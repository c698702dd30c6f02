"""The ONNX export format of layerexit: one graph per stage and a manifest, shared by the exporter
(:mod:`layerexit.runtime.onnx_export`) and the runtime (:mod:`layerexit.runtime.onnx_runtime`).

An export folder holds

* ``embed.onnx``: ``(input_ids, [attention_mask], [token_type_ids]) -> hidden`` (B, T, H);
* ``layer_1.onnx`` .. ``layer_L.onnx``: ``(hidden, attention_mask, [second_text]) -> (hidden_out, probs)``,
  each the transformer layer *fused with its exit head and softmax*, so one ORT call per layer gives both
  the next hidden states and the exit's probabilities (B, C). ``attention_mask`` is the plain (B, T) 0/1
  padding mask; the graph builds the model's own attention mask (and MPNet's position bias, DeBERTa's
  relative positions) from it, so dropping exited rows or trimming padding needs no mask work here.
  ``second_text`` (B, T) 0/1 marks the second text's tokens when the exits pool text pairs (the runtime
  finds them from the token ids, :func:`layerexit.pooling.second_text`);
* ``full.onnx``: ``(input_ids, attention_mask, [token_type_ids]) -> probs`` of the last exit, the plain
  full model a user would deploy instead of early exit (the latency baseline);
* ``onnx_manifest.json``: file names, input and output names, sha256 of every file, opset, whether the
  graphs are int8, which operators ONNX Runtime's transformer fusions made in each graph, each graph's
  error against PyTorch on a probe batch, and the layerexit config; written last and atomically;
* ``tokenizer/`` when a tokenizer was given, so the folder is deployable without the PyTorch run.

Inputs a graph does not use are pruned by the exporter (BERT's embeddings ignore the padding mask);
the manifest records each graph's actual inputs and the runtime feeds exactly those.

``onnx`` and ``onnxruntime`` are optional dependencies (``pip install layerexit[onnx]``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerexit.atomic import read_json_object
from layerexit.errors import LayerExitError

MANIFEST_NAME = "onnx_manifest.json"
ONNX_FORMAT = "layerexit-onnx"
ONNX_FORMAT_VERSION = 1
TOKENIZER_DIR = "tokenizer"
MIN_OPSET = 14  # exporting scaled_dot_product_attention needs 14; LayerNormalization is one operator from 17
PARITY_TOLERANCE = 1e-4
"""Largest difference from PyTorch an exported (not quantized) graph may show on the probe batch."""
FUSED_TOLERANCE = 1e-5
"""A fused graph is kept only this close to PyTorch; otherwise the plain traced graph is used."""


SESSIONS_MADE: list[bool] = []
"""Non-empty once layerexit has created an ONNX Runtime session in this process (its thread pools are then
fixed: :func:`layerexit.runtime.onnx_runtime.share_thread_pool`)."""


def require_onnx() -> tuple[Any, Any]:
    """``onnx`` and ``onnxruntime``, imported on first use."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise LayerExitError(
            f"the ONNX backend needs the optional packages onnx and onnxruntime ({err.name} is missing); "
            "install them with: pip install 'layerexit[onnx]'"
        ) from None
    return onnx, onnxruntime


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class GraphEntry:
    """One graph of the manifest, checked."""

    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    sha256: str


def graph_entry(data: Any, where: str, inputs: set[tuple[str, ...]], outputs: tuple[str, ...]) -> GraphEntry:
    if not isinstance(data, dict):
        raise LayerExitError(f"{where}: expected an object with file, inputs, outputs and sha256")
    try:
        entry = GraphEntry(
            file=str(data["file"]),
            inputs=tuple(str(x) for x in data["inputs"]),
            outputs=tuple(str(x) for x in data["outputs"]),
            sha256=str(data["sha256"]),
        )
    except (KeyError, TypeError) as err:
        raise LayerExitError(f"{where}: missing or malformed field {err}") from None
    if Path(entry.file).name != entry.file or not entry.file.endswith(".onnx"):
        raise LayerExitError(f"{where}: file {entry.file!r} must be a plain .onnx name inside the export folder")
    if entry.inputs not in inputs or entry.outputs != outputs:
        raise LayerExitError(f"{where}: unexpected inputs {list(entry.inputs)} or outputs {list(entry.outputs)}")
    return entry


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise LayerExitError(f"{folder}: no such folder")
    if not path.is_file():
        raise LayerExitError(
            f"{folder} is not an ONNX export: {MANIFEST_NAME} is missing (run `layerexit export RUN --runtime onnx`)"
        )
    data = read_json_object(path, "an ONNX export manifest")
    if data.get("format") != ONNX_FORMAT:
        raise LayerExitError(f"{path}: not a layerexit ONNX manifest")
    if data.get("format_version") != ONNX_FORMAT_VERSION:
        raise LayerExitError(
            f"{path}: ONNX export format version {data.get('format_version')!r} is not supported "
            f"(expected {ONNX_FORMAT_VERSION}); export the model again"
        )
    return data
