"""Export an early-exit model to the ONNX format of :mod:`layerexit.runtime.onnx_format`: one graph per
stage (embeddings, each layer fused with its exit, the full model), each checked against PyTorch on a
probe batch, optionally fused (ONNX Runtime's transformer optimizer) and int8-quantized."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from layerexit.atomic import write_json
from layerexit.errors import LayerExitError
from layerexit.model import EarlyExitModel
from layerexit.runtime.onnx_format import (
    FUSED_TOLERANCE,
    MANIFEST_NAME,
    MIN_OPSET,
    ONNX_FORMAT,
    ONNX_FORMAT_VERSION,
    PARITY_TOLERANCE,
    SESSIONS_MADE,
    TOKENIZER_DIR,
    require_onnx,
    sha256,
)
from layerexit.runtime.onnx_token_int8 import quantize_per_token
from layerexit.version import __version__

Quantize = Literal["dynamic", "static", "token"] | None
TOKEN_INT8_TOLERANCE = 0.2
"""Largest probe error a per-token int8 graph may show (probabilities: absolute; hidden states: relative)."""

# Export


class _EmbedStage(nn.Module):
    """(input_ids, attention_mask, [token_type_ids]) -> hidden states entering layer 1."""

    def __init__(self, model: EarlyExitModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        return self.model.backbone.embed(input_ids, attention_mask, token_type_ids)


class _LayerStage(nn.Module):
    """(hidden, attention_mask, [second_text]) -> (hidden after layer ``index``, probabilities of its exit)."""

    def __init__(self, model: EarlyExitModel, index: int) -> None:
        super().__init__()
        self.model = model
        self.index = index

    def forward(
        self, hidden: Tensor, attention_mask: Tensor, second_text: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        backbone = self.model.backbone
        kwargs = backbone.layer_kwargs(hidden, attention_mask)
        hidden = backbone.layer(self.index, hidden, kwargs)  # (B, T, H)
        probs = self.model.exits[self.index](hidden, attention_mask, second_text).float().softmax(-1)  # (B, C)
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
        second = self.model.second_text(input_ids, attention_mask)
        return self.model.exits[-1](hidden, attention_mask, second).float().softmax(-1)  # (B, C)


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
    separator = model.config.separator_id
    if separator is not None:  # so that pair exits see a second text in two rows
        ids[0, 5], ids[1, 3] = separator, separator
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
    pairs = model.config.reads_pairs
    layer_names = ["hidden", "attention_mask", "second_text"] if pairs else ["hidden", "attention_mask"]
    example_second = (torch.arange(8, device=device) >= 4).long().expand(2, 8) * mask  # (2, 8)
    probe_second = model.second_text(probe_ids, probe_mask)  # (3, 11) or None

    example_hidden = backbone.embed(*token_example)
    hidden = backbone.embed(*probe_tokens)
    stages = [
        _Stage("embed", _EmbedStage(model), token_example, token_names, ["hidden"], token_probe, [hidden.cpu().numpy()])
    ]
    kwargs = backbone.layer_kwargs(hidden, probe_mask)
    for i in range(model.num_layers):
        layer_input = hidden.cpu().numpy()
        hidden = backbone.layer(i, hidden, kwargs)
        probs = model.exits[i](hidden, probe_mask, probe_second).float().softmax(-1)
        probe = {"hidden": layer_input, "attention_mask": mask_np}
        if probe_second is not None:
            probe["second_text"] = probe_second.cpu().numpy()
        stages.append(
            _Stage(
                f"layer_{i + 1}",
                _LayerStage(model, i),
                (example_hidden, mask, example_second) if pairs else (example_hidden, mask),
                layer_names,
                ["hidden_out", "probs"],
                probe,
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
    SESSIONS_MADE.append(True)
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    feed = {i.name: stage.probe[i.name] for i in session.get_inputs()}
    got = session.run(stage.outputs, feed)
    return max(
        float(np.abs(a - b).max()) / max(1.0, float(np.abs(b).max())) for a, b in zip(got, stage.expected, strict=True)
    )


def _finish_graph(
    onnx: Any,
    ort: Any,
    stage: _Stage,
    work: Path,
    out: Path,
    *,
    fuse: tuple[int, int] | None,
    quantize: Quantize,
    calibration: list[dict[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Choose the fused graph when it matches PyTorch (else the plain one), quantize it if asked, move it
    into ``out`` and describe it for the manifest. ``fuse``: (attention heads, hidden size), or None;
    ``calibration``: the stage's inputs on training batches, for static quantization."""
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
    if quantize == "dynamic":
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
    elif quantize == "token" and stage.name != "embed":
        quantized = work / f"{stage.name}.int8.onnx"
        quantize_per_token(onnx, chosen, quantized)
        chosen = quantized
        error = _probe_error(ort, chosen, stage)
        if error > TOKEN_INT8_TOLERANCE:  # per-token scales keep MiniLM's graphs within 0.04 of PyTorch
            raise LayerExitError(
                f"the per-token int8 {stage.name} graph differs from PyTorch by {error:.2g} on a probe batch "
                f"(limit {TOKEN_INT8_TOLERANCE:g}); onnxruntime {ort.__version__} may compute it differently "
                "from the version it was measured with (1.32); export --runtime onnx or onnx-int8 instead"
            )
    elif quantize == "static" and stage.name != "embed":  # the embeddings are lookups: nothing to gain
        # from the plain graph: in a fused one the quantizer cannot see the activations of ONNX Runtime's
        # own operators and quantizes only the weights
        chosen, fused_ops = _quantize_static(onnx, traced, work / f"{stage.name}.int8.onnx", calibration or []), {}
        error = _probe_error(ort, chosen, stage)
    graph = onnx.load(str(chosen), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    final = out / f"{stage.name}.onnx"
    os.replace(chosen, final)
    return {
        "file": final.name,
        "inputs": [i.name for i in graph.input if i.name not in initializers],
        "outputs": [o.name for o in graph.output],
        "sha256": sha256(final),
        "fused_ops": fused_ops,
        "probe_error": error,
    }


def _quantize_static(onnx: Any, source: Path, target: Path, batches: list[dict[str, np.ndarray]]) -> Path:
    """int8 QDQ quantization with fixed activation scales, calibrated on ``batches`` (min-max of each
    tensor over them): unlike dynamic quantization, a row's result does not depend on its batch-mates."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if not batches:
        raise LayerExitError("static int8 quantization needs calibration batches (the run's training texts)")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(
        str(source),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        activation_type=QuantType.QUInt8,  # u8 activations, s8 weights: the VNNI kernels' pairing
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return target


def _calibration_feeds(
    model: EarlyExitModel, stages: list[_Stage], batches: Sequence[tuple[Tensor, Tensor, Tensor | None]]
) -> dict[str, list[dict[str, np.ndarray]]]:
    """Each stage's inputs on the calibration batches, from PyTorch: the token batches for ``embed`` and
    ``full``, each layer's incoming hidden states (and mask) for ``layer_i``."""
    backbone = model.backbone
    feeds: dict[str, list[dict[str, np.ndarray]]] = {stage.name: [] for stage in stages}
    for ids, mask, given_types in batches:
        types = torch.zeros_like(ids) if given_types is None else given_types
        tokens = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        token_feed = {name: tokens[name].cpu().numpy() for name in stages[0].inputs}
        feeds["embed"].append(token_feed)
        feeds["full"].append(token_feed)
        hidden = backbone.embed(ids, mask, types if backbone.uses_token_type_ids else None)
        kwargs = backbone.layer_kwargs(hidden, mask)
        second = model.second_text(ids, mask)
        for i in range(model.num_layers):
            feed = {"hidden": hidden.cpu().numpy(), "attention_mask": mask.cpu().numpy()}
            if second is not None:
                feed["second_text"] = second.cpu().numpy()
            feeds[f"layer_{i + 1}"].append(feed)
            hidden = backbone.layer(i, hidden, kwargs)
    return feeds


def export_onnx(
    model: EarlyExitModel,
    out_dir: str | os.PathLike[str],
    *,
    opset: int = 17,
    quantize: Quantize | bool = None,
    fuse: bool = True,
    tokenizer: Any = None,
    calibration: Sequence[tuple[Tensor, Tensor, Tensor | None]] = (),
) -> Path:
    """Export ``model`` as per-stage ONNX graphs plus ``onnx_manifest.json`` into ``out_dir``; return it.

    Every graph is checked against PyTorch on a padded probe batch unlike the traced one; a graph
    off by more than 1e-4 is an error. ``fuse`` (BERT-like, ALBERT and DistilBERT models) traces
    attention in its eager form and applies ONNX Runtime's transformer fusions; a fused graph is kept
    only if it matches PyTorch within 1e-5, else the plain one is. ``quantize="dynamic"`` (or ``True``)
    then applies int8 dynamic quantization (``onnxruntime.quantization.quantize_dynamic``, weights of
    MatMul and fused Attention) to each graph; ``"static"`` applies QDQ int8 quantization of every MatMul
    with activation scales fixed on ``calibration`` (token batches, e.g. training texts), so a row's
    answer does not depend on its batch-mates. The folder holds only the int8 graphs, the manifest says
    so (``quantized``: ``dynamic`` or ``static``) and records each graph's probe error. Use one folder
    per precision (:func:`export_dir_for`). ``tokenizer`` is saved under ``tokenizer/`` when given.
    Files are written under temporary names and renamed, the manifest last, so a crash never leaves a
    folder that loads with mismatched files.
    """
    onnx, ort = require_onnx()
    mode: Quantize = "dynamic" if quantize is True else (quantize or None)
    if mode not in (None, "dynamic", "static", "token"):
        raise LayerExitError(f"quantize must be 'dynamic', 'static' or 'token', got {quantize!r}")
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
            with model.backbone.eager_attention() if fuse else nullcontext():
                for stage in stages:
                    path = work / f"{stage.name}.onnx"
                    _onnx_export(stage.module, stage.example, path, stage.inputs, stage.outputs, opset)
            backbone = model.backbone
            fusion = (backbone.num_heads, backbone.hidden_size) if fuse and backbone.fusable else None
            feeds = _calibration_feeds(model, stages, calibration) if mode == "static" else {}
            for stage in stages:
                graphs[stage.name] = _finish_graph(
                    onnx, ort, stage, work, out, fuse=fusion, quantize=mode, calibration=feeds.get(stage.name)
                )
    finally:
        model.train(was_training)

    if tokenizer is not None:
        tokenizer.save_pretrained(out / TOKENIZER_DIR)
    manifest = {
        "format": ONNX_FORMAT,
        "format_version": ONNX_FORMAT_VERSION,
        "opset": opset,
        "quantized": mode or False,
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
    write_json(out / MANIFEST_NAME, manifest)
    return out
