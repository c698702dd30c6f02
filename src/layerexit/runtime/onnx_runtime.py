"""ONNX Runtime backend: an early-exit model exported as one graph per stage, run with real layer skipping.

An export folder holds

* ``embed.onnx``: ``(input_ids, [attention_mask], [token_type_ids]) -> hidden`` (B, T, H);
* ``layer_1.onnx`` .. ``layer_L.onnx``: ``(hidden, attention_mask) -> (hidden_out, probs)``, each the
  transformer layer *fused with its exit head and softmax*, so one ORT call per layer gives both the
  next hidden states and the exit's probabilities (B, C). ``attention_mask`` is the plain (B, T) 0/1
  padding mask; the graph builds the model's own attention mask (and MPNet's position bias, DeBERTa's
  relative positions) from it, so dropping exited rows or trimming padding needs no mask work here;
* ``full.onnx``: ``(input_ids, attention_mask, [token_type_ids]) -> probs`` of the last exit, the plain
  full model a user would deploy instead of early exit (the latency baseline);
* ``onnx_manifest.json``: file names, input and output names, sha256 of every file, opset, whether the
  graphs are int8, which operators ONNX Runtime's transformer fusions made in each graph, each graph's
  error against PyTorch on a probe batch, and the layerexit config; written last and atomically;
* ``tokenizer/`` when a tokenizer was given, so the folder is deployable without the PyTorch run.

Inputs a graph does not use are pruned by the exporter (BERT's embeddings ignore the padding mask);
the manifest records each graph's actual inputs and the runtime feeds exactly those.

:class:`OnnxEarlyExitModel` mirrors :func:`layerexit.runtime.loop.early_exit_forward`: the decision
after each layer is the same ``strategy.step`` on the same probabilities, exited rows are dropped and
trailing padding is trimmed, so exits and predictions equal the PyTorch path's.

``onnx`` and ``onnxruntime`` are optional dependencies (``pip install layerexit[onnx]``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from layerexit import __version__
from layerexit.backbones import AlbertBackbone, BertLikeBackbone, DistilBertBackbone
from layerexit.errors import LayerExitError
from layerexit.model import EarlyExitModel, ExitConfig
from layerexit.runtime.loop import ExitResult
from layerexit.strategies import Strategy, select_state

MANIFEST_NAME = "onnx_manifest.json"
ONNX_FORMAT = "layerexit-onnx"
ONNX_FORMAT_VERSION = 1
TOKENIZER_DIR = "tokenizer"
EXPORT_DIR = "onnx"
"""Where ``layerexit export RUN --format onnx`` writes inside a run folder (``onnx-int8`` when quantized)."""
MIN_OPSET = 14  # exporting scaled_dot_product_attention needs 14; LayerNormalization is one operator from 17
PARITY_TOLERANCE = 1e-4
"""Largest difference from PyTorch an exported (not quantized) graph may show on the probe batch."""
FUSED_TOLERANCE = 1e-5
"""A fused graph is kept only this close to PyTorch; otherwise the plain traced graph is used."""

ArrayLike = Tensor | np.ndarray
_LAYER_OUTPUTS = ["hidden_out", "probs"]


def export_dir_for(run_dir: str | os.PathLike[str], quantize: bool = False) -> Path:
    """The conventional export folder inside a saved run: ``RUN/onnx`` or ``RUN/onnx-int8``."""
    return Path(run_dir) / (EXPORT_DIR + ("-int8" if quantize else ""))


def _require_onnx() -> tuple[Any, Any]:
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


# ---------------------------------------------------------------------------------------------------
# Export


class _EmbedStage(nn.Module):
    """(input_ids, attention_mask, [token_type_ids]) -> hidden states entering layer 1."""

    def __init__(self, model: EarlyExitModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        return self.model.backbone.embed(input_ids, attention_mask, token_type_ids)


class _LayerStage(nn.Module):
    """(hidden, attention_mask) -> (hidden after layer ``index``, probabilities of its exit)."""

    def __init__(self, model: EarlyExitModel, index: int) -> None:
        super().__init__()
        self.model = model
        self.index = index

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        backbone = self.model.backbone
        kwargs = backbone.layer_kwargs(hidden, attention_mask)
        hidden = backbone.layer(self.index, hidden, kwargs)  # (B, T, H)
        probs = self.model.exits[self.index](hidden, attention_mask).float().softmax(-1)  # (B, C)
        return hidden, probs


class _FullStage(nn.Module):
    """The whole encoder and the last exit: (input_ids, attention_mask, [token_type_ids]) -> probs."""

    def __init__(self, model: EarlyExitModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        backbone = self.model.backbone
        hidden = backbone.embed(input_ids, attention_mask, token_type_ids)
        kwargs = backbone.layer_kwargs(hidden, attention_mask)
        for i in range(backbone.num_layers):
            hidden = backbone.layer(i, hidden, kwargs)
        return self.model.exits[-1](hidden, attention_mask).float().softmax(-1)  # (B, C)


def _example_inputs(model: EarlyExitModel, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """A traced batch of 2 x 8 tokens whose second row is padded, so the graphs carry a real mask.

    Tracing an unpadded batch would let SDPA models skip the mask entirely (``None``), and padded
    inputs would then be silently wrong; batch 2 keeps the batch axis from being specialised to 1.
    """
    vocab = int(getattr(model.backbone.config, "vocab_size", 100))
    ids = (torch.arange(16, device=device).reshape(2, 8) * 7 + 5) % max(vocab - 5, 1) + 5
    mask = torch.ones(2, 8, dtype=torch.long, device=device)
    mask[1, 5:] = 0
    return ids * mask, mask, torch.zeros_like(ids)


def _probe_inputs(model: EarlyExitModel, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """A 3 x 11 batch (lengths 11, 7, 3; a second segment in row 0) unlike the traced one, to check graphs on."""
    vocab = int(getattr(model.backbone.config, "vocab_size", 100))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, max(vocab, 6), (3, 11), generator=g).to(device)
    mask = (torch.arange(11, device=device)[None, :] < torch.tensor([11, 7, 3], device=device)[:, None]).long()
    types = torch.zeros_like(ids)
    types[0, 6:] = 1
    return ids * mask, mask, types


@dataclass
class _Stage:
    """One graph to export: the module, its traced example, and its PyTorch outputs on the probe batch."""

    name: str
    module: nn.Module
    example: tuple[Tensor, ...]
    inputs: list[str]
    outputs: list[str]
    probe: dict[str, np.ndarray]
    expected: list[np.ndarray]


def _stages(model: EarlyExitModel, device: torch.device) -> list[_Stage]:
    """embed, layer_1 .. layer_L and full, with the PyTorch reference of each on the probe batch.

    Each layer's probe input is PyTorch's own hidden state, so a graph is judged alone and
    errors do not accumulate along the chain.
    """
    backbone = model.backbone
    uses_types = backbone.uses_token_type_ids
    ids, mask, types = _example_inputs(model, device)
    token_example = (ids, mask, types) if uses_types else (ids, mask)
    token_names = ["input_ids", "attention_mask", "token_type_ids"][: len(token_example)]
    probe_ids, probe_mask, probe_types = _probe_inputs(model, device)
    probe_tokens = (probe_ids, probe_mask, probe_types) if uses_types else (probe_ids, probe_mask)
    token_probe = {name: t.cpu().numpy() for name, t in zip(token_names, probe_tokens, strict=True)}
    mask_np = probe_mask.cpu().numpy()

    example_hidden = backbone.embed(*token_example)
    hidden = backbone.embed(*probe_tokens)
    stages = [
        _Stage("embed", _EmbedStage(model), token_example, token_names, ["hidden"], token_probe, [hidden.cpu().numpy()])
    ]
    kwargs = backbone.layer_kwargs(hidden, probe_mask)
    for i in range(model.num_layers):
        layer_input = hidden.cpu().numpy()
        hidden = backbone.layer(i, hidden, kwargs)
        probs = model.exits[i](hidden, probe_mask).float().softmax(-1)
        stages.append(
            _Stage(
                f"layer_{i + 1}",
                _LayerStage(model, i),
                (example_hidden, mask),
                ["hidden", "attention_mask"],
                ["hidden_out", "probs"],
                {"hidden": layer_input, "attention_mask": mask_np},
                [hidden.cpu().numpy(), probs.cpu().numpy()],
            )
        )
    stages.append(
        _Stage("full", _FullStage(model), token_example, token_names, ["probs"], token_probe, [probs.cpu().numpy()])
    )
    return stages


def _onnx_export(
    module: nn.Module, args: tuple[Tensor, ...], path: Path, names: list[str], outputs: list[str], opset: int
) -> None:
    """Trace ``module`` to ``path`` with dynamic batch and sequence axes on every input and output."""
    axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "sequence"} for name in names}
    for name in outputs:
        axes[name] = {0: "batch", 1: "sequence"} if name.startswith("hidden") else {0: "batch"}
    with warnings.catch_warnings():
        # the TorchScript exporter is used (the dynamo one needs onnxscript); its deprecation notice and
        # the tracer's "converting a tensor to a Python value" notes are expected and not actionable
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=outputs,
            dynamic_axes=axes,
            do_constant_folding=True,
        )


@contextmanager
def _quiet_logging() -> Iterator[None]:
    """onnxruntime's optimizer and quantizer log advice at WARNING level on every graph; hold it back."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


@contextmanager
def _eager_attention(model: EarlyExitModel) -> Iterator[None]:
    """Trace attention as plain MatMul/Softmax (the pattern ONNX Runtime fuses), then restore the setting."""
    encoder = model.backbone.model
    before = getattr(encoder.config, "_attn_implementation", None)
    can_switch = getattr(encoder, "_can_set_attn_implementation", lambda: False)()
    switch = before not in (None, "eager") and can_switch
    if switch:
        encoder.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            encoder.set_attn_implementation(before)


def _fusable(model: EarlyExitModel) -> bool:
    """Architectures whose attention is the plain pattern ONNX Runtime fuses (not MPNet's or DeBERTa's
    relative-position attention, where fusing would only cost export time)."""
    return isinstance(model.backbone, BertLikeBackbone | AlbertBackbone | DistilBertBackbone)


def _fuse(path: Path, out: Path, heads: int, hidden_size: int) -> dict[str, int]:
    """ONNX Runtime's transformer fusions (Attention, SkipLayerNormalization, BiasGelu) on one graph;
    returns how many of each fused operator it made.

    The raw 0/1 mask is kept (the BERT default turns it into lengths, valid only for right padding);
    ``opt_level=0`` leaves the result portable (no hardware-specific kernels baked in).
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.use_raw_attention_mask(True)
    optimized = optimize_model(
        str(path),
        model_type="bert",
        num_heads=heads,
        hidden_size=hidden_size,
        optimization_options=options,
        opt_level=0,
    )
    optimized.save_model_to_file(str(out))
    return {op: int(n) for op, n in optimized.get_fused_operator_statistics().items() if n}


def _probe_error(ort: Any, path: Path, stage: _Stage) -> float:
    """Largest difference between the graph's outputs and PyTorch's on the probe batch, relative to each
    output's scale when that exceeds 1 (probabilities: absolute; hidden states: relative)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    feed = {i.name: stage.probe[i.name] for i in session.get_inputs()}
    got = session.run(stage.outputs, feed)
    return max(
        float(np.abs(a - b).max()) / max(1.0, float(np.abs(b).max())) for a, b in zip(got, stage.expected, strict=True)
    )


def _finish_graph(
    onnx: Any, ort: Any, stage: _Stage, work: Path, out: Path, *, fuse: tuple[int, int] | None, quantize: bool
) -> dict[str, Any]:
    """Choose the fused graph when it matches PyTorch (else the plain one), quantize it if asked, move it
    into ``out`` and describe it for the manifest. ``fuse``: (attention heads, hidden size), or None."""
    traced = work / f"{stage.name}.onnx"
    chosen, fused_ops, error = traced, {}, float("inf")
    if fuse is not None:
        candidate = work / f"{stage.name}.fused.onnx"
        try:
            ops = _fuse(traced, candidate, *fuse)
            error = _probe_error(ort, candidate, stage)
        except Exception:  # the optimizer is best effort: any failure falls back to the plain graph
            error = float("inf")
        if error <= FUSED_TOLERANCE:
            chosen, fused_ops = candidate, ops
    if chosen is traced:
        error = _probe_error(ort, traced, stage)
        if error > PARITY_TOLERANCE:
            raise LayerExitError(
                f"the exported {stage.name} graph differs from PyTorch by {error:.2g} on a probe batch "
                f"(tolerance {PARITY_TOLERANCE:g}); this architecture does not export cleanly"
            )
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = work / f"{stage.name}.int8.onnx"
        quantize_dynamic(
            chosen,
            quantized,
            op_types_to_quantize=["MatMul", "Attention"],
            weight_type=QuantType.QInt8,
            # shape inference cannot type the outputs of fused (com.microsoft) operators; they are float
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        chosen = quantized
        error = _probe_error(ort, chosen, stage)
    graph = onnx.load(str(chosen), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    final = out / f"{stage.name}.onnx"
    os.replace(chosen, final)
    return {
        "file": final.name,
        "inputs": [i.name for i in graph.input if i.name not in initializers],
        "outputs": [o.name for o in graph.output],
        "sha256": _sha256(final),
        "fused_ops": fused_ops,
        "probe_error": error,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_onnx(
    model: EarlyExitModel,
    out_dir: str | os.PathLike[str],
    *,
    opset: int = 17,
    quantize: bool = False,
    fuse: bool = True,
    tokenizer: Any = None,
) -> Path:
    """Export ``model`` as per-stage ONNX graphs plus ``onnx_manifest.json`` into ``out_dir``; return it.

    Every graph is checked against PyTorch on a padded probe batch unlike the traced one; a graph
    off by more than 1e-4 is an error. ``fuse`` (BERT-like, ALBERT and DistilBERT models) traces
    attention in its eager form and applies ONNX Runtime's transformer fusions; a fused graph is kept
    only if it matches PyTorch within 1e-5, else the plain one is. ``quantize`` then applies int8 dynamic quantization
    (``onnxruntime.quantization.quantize_dynamic``, weights of MatMul and fused Attention) to each
    graph; the folder holds only the int8 graphs, the manifest says so and records each graph's probe
    error. Use one folder per precision (:func:`export_dir_for`). ``tokenizer`` is saved under
    ``tokenizer/`` when given. Files are written under temporary names and renamed, the manifest
    last, so a crash never leaves a folder that loads with mismatched files.
    """
    onnx, ort = _require_onnx()
    if opset < MIN_OPSET:
        raise LayerExitError(f"opset {opset} is too old for transformer attention; use {MIN_OPSET} or newer")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise LayerExitError(
            f"export needs float32 weights, the model has {sorted(map(str, dtypes))}; call model.float() first"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device

    was_training = model.training
    model.eval()
    graphs: dict[str, dict[str, Any]] = {}
    try:
        with torch.no_grad(), _quiet_logging(), tempfile.TemporaryDirectory(prefix=".export-", dir=out) as tmp:
            work = Path(tmp)
            stages = _stages(model, device)
            with _eager_attention(model) if fuse else nullcontext():
                for stage in stages:
                    path = work / f"{stage.name}.onnx"
                    _onnx_export(stage.module, stage.example, path, stage.inputs, stage.outputs, opset)
            config = model.backbone.config
            heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_heads", 0) or 0)
            fusion = (heads, model.backbone.hidden_size) if fuse and _fusable(model) else None
            for stage in stages:
                graphs[stage.name] = _finish_graph(onnx, ort, stage, work, out, fuse=fusion, quantize=quantize)
    finally:
        model.train(was_training)

    if tokenizer is not None:
        tokenizer.save_pretrained(out / TOKENIZER_DIR)
    manifest = {
        "format": ONNX_FORMAT,
        "format_version": ONNX_FORMAT_VERSION,
        "opset": opset,
        "quantized": bool(quantize),
        "num_layers": model.num_layers,
        "num_labels": model.num_labels,
        "embed": graphs["embed"],
        "layers": [graphs[f"layer_{i + 1}"] for i in range(model.num_layers)],
        "full": graphs["full"],
        "tokenizer": TOKENIZER_DIR if tokenizer is not None else None,
        "config": model.config.to_dict(),
        "versions": {
            "layerexit": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
    }
    tmp_manifest = out / (MANIFEST_NAME + ".tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_manifest, out / MANIFEST_NAME)
    return out


# ---------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class _GraphEntry:
    """One graph of the manifest, checked."""

    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    sha256: str


def _graph_entry(data: Any, where: str, inputs: set[tuple[str, ...]], outputs: tuple[str, ...]) -> _GraphEntry:
    if not isinstance(data, dict):
        raise LayerExitError(f"{where}: expected an object with file, inputs, outputs and sha256")
    try:
        entry = _GraphEntry(
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


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise LayerExitError(f"{folder}: no such folder")
    if not path.is_file():
        raise LayerExitError(
            f"{folder} is not an ONNX export: {MANIFEST_NAME} is missing (run `layerexit export RUN --format onnx`)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LayerExitError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != ONNX_FORMAT:
        raise LayerExitError(f"{path}: not a layerexit ONNX manifest")
    if data.get("format_version") != ONNX_FORMAT_VERSION:
        raise LayerExitError(
            f"{path}: ONNX export format version {data.get('format_version')!r} is not supported "
            f"(expected {ONNX_FORMAT_VERSION}); export the model again"
        )
    return data


def _session_options(ort: Any, threads: int | None) -> Any:
    """Options shared by every session of an export.

    Each session owns an intra-op thread pool, and by default idle pool threads spin after a run. With
    one session per layer, the pools of the layers just run keep spinning while the next layer needs
    the cores: on 2 cores (MiniLM-L6, batch 1, 2 threads, quiet shared machine) the full graph took
    48 ms in a process holding the layer sessions, against 7-8 ms with spinning off; with spinning off
    it took 6.6-7.1 ms, the same as alone with ONNX Runtime's defaults (6.4-7.0 ms). Stopping the
    spinning only after each run (``session.force_spinning_stop``) measured the same as turning it
    off, and turning it off is the robust choice when other processes share the cores.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 0 if threads is None else threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _as_int64(x: ArrayLike, name: str) -> np.ndarray:
    """A C-contiguous int64 array (ONNX Runtime takes numpy; a CPU tensor converts without a copy)."""
    array = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if array.ndim != 2:
        raise LayerExitError(f"{name} must have shape (batch, sequence), got {tuple(array.shape)}")
    return np.ascontiguousarray(array, dtype=np.int64)


def _trim_trailing_padding(hidden: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut the columns that are padding in every remaining row (right padding); numpy twin of inference's."""
    used = np.flatnonzero(mask.any(0))
    length = int(used[-1]) + 1 if used.size else mask.shape[1]
    if length == mask.shape[1]:
        return hidden, mask
    return np.ascontiguousarray(hidden[:, :length]), np.ascontiguousarray(mask[:, :length])


class OnnxEarlyExitModel:
    """An exported early-exit model on ONNX Runtime: offline all-exit replay, the full graph, and
    online early exit with real layer skipping. Safe to share between threads (no per-call state).

    Hidden states pass between layers as numpy arrays through plain ``session.run``, not I/O binding:
    at batch 1 on a shared 2-core machine (1 thread, CPU time), a near-empty graph shaped like a layer
    stage took 38 us per call with ``run`` and 60 us with I/O binding (five more Python-to-C++ calls
    per layer), and MiniLM-L6's layer 1 took 2.44 ms against 2.55 ms. On CPU ``run`` already reads
    numpy inputs in place; binding would only save copying the (1, 32, 384) output, about 50 KB.
    """

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        config: ExitConfig,
        embed: _GraphEntry,
        layers: list[_GraphEntry],
        full: _GraphEntry,
        threads: int | None,
    ) -> None:
        _, self._ort = _require_onnx()
        self.folder = folder
        self.manifest = manifest
        self.config = config
        self.threads = threads
        self._embed_entry = embed
        self._layer_entries = layers
        self._full_entry = full
        self._embed = self._session(embed)
        self._layers = [self._session(entry) for entry in layers]
        self._full: Any = None  # created on first use: it holds a second copy of every weight

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], threads: int | None = None, *, verify: bool = True
    ) -> OnnxEarlyExitModel:
        """Open an export folder written by :func:`export_onnx`.

        ``threads``: ONNX Runtime intra-op threads per session (``None``: its default, one per physical
        core). ``verify`` checks every file's sha256 against the manifest before loading.
        """
        folder = Path(directory)
        data = _read_manifest(folder)
        where = str(folder / MANIFEST_NAME)
        try:
            num_layers = int(data["num_layers"])
            num_labels = int(data["num_labels"])
            raw_layers = data["layers"]
            config = ExitConfig.from_dict(dict(data["config"]), source=f"{where} config")
        except (KeyError, TypeError, ValueError) as err:
            raise LayerExitError(f"{where}: missing or malformed field {err}") from None
        if not isinstance(raw_layers, list) or len(raw_layers) != num_layers or num_layers < 1:
            raise LayerExitError(f"{where}: expected {num_layers} layer graphs")
        if config.num_layers != num_layers or config.num_labels != num_labels:
            raise LayerExitError(f"{where}: config disagrees with num_layers/num_labels")
        token_inputs = {
            ("input_ids",),
            ("input_ids", "token_type_ids"),
            ("input_ids", "attention_mask"),
            ("input_ids", "attention_mask", "token_type_ids"),
        }
        embed = _graph_entry(data.get("embed"), f"{where} embed", token_inputs, ("hidden",))
        layers = [
            _graph_entry(entry, f"{where} layer {i + 1}", {("hidden", "attention_mask")}, ("hidden_out", "probs"))
            for i, entry in enumerate(raw_layers)
        ]
        full = _graph_entry(data.get("full"), f"{where} full", token_inputs, ("probs",))
        for entry in (embed, *layers, full):
            path = folder / entry.file
            if not path.is_file():
                raise LayerExitError(f"{folder}: {entry.file} is missing; export the model again")
            if verify and _sha256(path) != entry.sha256:
                raise LayerExitError(f"{path}: contents do not match the manifest (changed or damaged after export)")
        return cls(folder, data, config, embed, layers, full, threads)

    def _session(self, entry: _GraphEntry) -> Any:
        ort = self._ort
        path = self.folder / entry.file
        try:
            session = ort.InferenceSession(
                str(path), sess_options=_session_options(ort, self.threads), providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            raise LayerExitError(f"{path}: ONNX Runtime cannot load it ({err})") from None
        names = tuple(i.name for i in session.get_inputs())
        if names != entry.inputs:
            raise LayerExitError(f"{path}: graph inputs {list(names)} differ from the manifest's {list(entry.inputs)}")
        return session

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    @property
    def quantized(self) -> bool:
        return bool(self.manifest.get("quantized", False))

    @property
    def tokenizer_path(self) -> Path | None:
        """The tokenizer saved with the export, if any (``AutoTokenizer.from_pretrained(path)``)."""
        name = self.manifest.get("tokenizer")
        return self.folder / name if isinstance(name, str) and (self.folder / name).is_dir() else None

    def _token_feed(
        self, names: tuple[str, ...], input_ids: ArrayLike, attention_mask: ArrayLike, token_type_ids: ArrayLike | None
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The inputs a token graph takes, and the padding mask as int64."""
        ids = _as_int64(input_ids, "input_ids")
        mask = _as_int64(attention_mask, "attention_mask")
        if mask.shape != ids.shape:
            raise LayerExitError(f"attention_mask {mask.shape} and input_ids {ids.shape} differ in shape")
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in names:
            types = np.zeros_like(ids) if token_type_ids is None else _as_int64(token_type_ids, "token_type_ids")
            if types.shape != ids.shape:
                raise LayerExitError(f"token_type_ids {types.shape} and input_ids {ids.shape} differ in shape")
            feed["token_type_ids"] = types
        return {name: feed[name] for name in names}, mask

    def _embed_hidden(
        self, input_ids: ArrayLike, attention_mask: ArrayLike, token_type_ids: ArrayLike | None
    ) -> tuple[np.ndarray, np.ndarray]:
        feed, mask = self._token_feed(self._embed_entry.inputs, input_ids, attention_mask, token_type_ids)
        return self._embed.run(None, feed)[0], mask

    def forward_all(
        self, input_ids: ArrayLike, attention_mask: ArrayLike, token_type_ids: ArrayLike | None = None
    ) -> Tensor:
        """Every exit's probabilities, (L, B, C) float32: the offline replay input, like ``model(...).probs``."""
        hidden, mask = self._embed_hidden(input_ids, attention_mask, token_type_ids)
        probs = []
        for session in self._layers:
            hidden, layer_probs = session.run(None, {"hidden": hidden, "attention_mask": mask})
            probs.append(torch.from_numpy(layer_probs))
        return torch.stack(probs)  # (L, B, C)

    def full_forward(
        self, input_ids: ArrayLike, attention_mask: ArrayLike, token_type_ids: ArrayLike | None = None
    ) -> Tensor:
        """The last exit's probabilities (B, C) from the single ``full`` graph: the plain full model."""
        if self._full is None:
            self._full = self._session(self._full_entry)
        feed, _ = self._token_feed(self._full_entry.inputs, input_ids, attention_mask, token_type_ids)
        return torch.from_numpy(self._full.run(None, feed)[0])

    def early_exit(
        self,
        strategy: Strategy,
        input_ids: ArrayLike,
        attention_mask: ArrayLike,
        token_type_ids: ArrayLike | None = None,
        *,
        trim_padding: bool = True,
    ) -> ExitResult:
        """Run one batch, each row stopping at the layer ``strategy`` lets it out.

        Same semantics as :func:`layerexit.runtime.loop.early_exit_forward`: exited rows are dropped
        before the next layer and trailing padding shared by the remaining rows is cut.
        """
        if strategy.needs_labels:
            raise ValueError(f"strategy {strategy.name!r} needs labels and cannot run online")
        num_layers = self.num_layers
        hidden, mask = self._embed_hidden(input_ids, attention_mask, token_type_ids)  # (B, T, H)
        batch = mask.shape[0]
        state = strategy.init(batch, self.num_labels, "cpu")
        # Until the first rows leave, nothing is indexed: at batch 1 (and whenever a whole batch exits
        # together) the loop is one ORT call, one strategy step and one count per layer. Measured with
        # instant stand-in sessions on a shared 2-core machine, everything outside the ORT calls costs
        # ~26 us per layer at batch 1 with Static (about half of it Static.step), 44-70 us with
        # entropy, patience or voting: 2-6% of a MiniLM-L6 layer.
        rows: Tensor | None = None  # input positions of the rows still running, once some have left
        exit_layer = torch.full((batch,), num_layers, dtype=torch.long)
        prediction = torch.zeros(batch, dtype=torch.long)
        exit_probs = torch.zeros(batch, self.num_labels)
        layer = 0
        for layer in range(1, num_layers + 1):
            hidden, layer_probs = self._layers[layer - 1].run(
                _LAYER_OUTPUTS, {"hidden": hidden, "attention_mask": mask}
            )
            probs = torch.from_numpy(layer_probs)  # (b, C)
            fire, pred = strategy.step(state, layer, probs)
            leaving = int(np.count_nonzero(fire.numpy()))  # 3x cheaper than fire.sum() at batch 1
            if layer == num_layers or leaving == fire.shape[0]:
                if rows is None:  # the whole batch leaves here together
                    return ExitResult(torch.full((batch,), layer, dtype=torch.long), pred, probs, layers_run=layer)
                exit_layer[rows] = layer
                prediction[rows] = pred
                exit_probs[rows] = probs
                break
            if leaving == 0:
                continue
            if rows is None:
                rows = torch.arange(batch)
            done = fire.nonzero().squeeze(1)
            exit_layer[rows[done]] = layer
            prediction[rows[done]] = pred[done]
            exit_probs[rows[done]] = probs[done]
            keep = (~fire).nonzero().squeeze(1)
            keep_np = keep.numpy()
            rows, hidden, mask = rows[keep], hidden[keep_np], mask[keep_np]
            state = select_state(state, keep)
            if trim_padding:
                hidden, mask = _trim_trailing_padding(hidden, mask)
        return ExitResult(exit_layer=exit_layer, prediction=prediction, probs=exit_probs, layers_run=layer)
