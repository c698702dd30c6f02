"""The ONNX Runtime runtime: an export folder (:mod:`layerexit.runtime.onnx_format`) behind the runtime
protocol of :mod:`layerexit.runtime.base`, fp32 or int8.

The exit loop (:mod:`layerexit.runtime.loop`) drives it exactly as it drives PyTorch: the decision after
each layer is the same ``strategy.step`` on the same probabilities, exited rows are dropped and trailing
padding is trimmed, so exits and predictions equal the PyTorch path's (tested in ``tests/test_onnx.py``).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from layerexit.errors import LayerExitError
from layerexit.model import ExitConfig
from layerexit.pooling import second_text
from layerexit.runtime.base import Rows, used_length
from layerexit.runtime.onnx_format import (
    MANIFEST_NAME,
    SESSIONS_MADE,
    GraphEntry,
    graph_entry,
    read_manifest,
    require_onnx,
    sha256,
)
from layerexit.runtime.onnx_fused import MARGIN, fusable, fused_graph
from layerexit.strategies import Strategy

ArrayLike = Tensor | np.ndarray
_LAYER_OUTPUTS = ["hidden_out", "probs"]


FUSED_SESSIONS = 2
"""One-call graphs kept per runtime, by strategy and batched or not (each holds a copy of every weight)."""

_SHARED_POOL: dict[str, int] = {}
"""``{"threads": n}`` once :func:`share_thread_pool` has run in this process."""


def share_thread_pool(threads: int | None) -> bool:
    """Run every ONNX Runtime session this process creates from now on on one shared intra-op thread pool
    of ``threads`` threads (``None``: one per physical core), whose threads spin briefly between runs.
    Returns whether sessions will share it: False once layerexit has created a session in this process.

    With one session per layer, the default of a pool per session means each layer's call wakes its own
    sleeping threads; one shared pool that stays warm from one layer to the next made early exit 1.4-1.5x
    faster at batch 1, but up to 1.7x slower in batches on a run whose rows leave at many different layers
    (docs/performance.md, "ONNX Runtime: one thread pool for every layer"), so it is opt-in:
    `layerexit bench --shared-pool`, `predict --shared-pool`. ONNX Runtime fixes its thread pools when it
    creates its environment, at the process's first session, so this must come before any. A session that
    other code created earlier cannot be detected: do not call this in such a process.
    """
    wanted = 0 if threads is None else int(threads)
    if _SHARED_POOL:
        if _SHARED_POOL["threads"] != wanted:
            raise LayerExitError(
                f"ONNX Runtime's thread pool is already shared with {_SHARED_POOL['threads'] or 'default'} "
                f"threads in this process; cannot change it to {wanted or 'default'}"
            )
        return True
    if SESSIONS_MADE:
        return False
    require_onnx()
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(wanted, 1)
    _SHARED_POOL["threads"] = wanted
    return True


def _session_options(ort: Any, threads: int | None, *, spin: bool = False) -> Any:
    """Options shared by every session of an export.

    By default each session owns an intra-op thread pool, and idle pool threads spin after a run. With
    one session per layer, the pools of the layers just run would keep spinning while the next layer
    needs the cores, so a layer's session does not spin. A session that runs a whole input in one call
    (the full graph, the one-call graph) keeps ONNX Runtime's default, ``spin``: its threads spin
    between the operators of one run instead of sleeping, which at batch 1 made it about 1.5x faster.
    They stop spinning when the run ends, though: a process holds several such sessions (the full graph,
    a one-call graph for single rows and one for batches, per strategy), and the idle ones' spinning
    threads slowed the one running by up to 1.9x. (Both measured: docs/performance.md, "Runtime settings
    and why".) After :func:`share_thread_pool` every session runs on the one shared pool instead.
    """
    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if _SHARED_POOL:
        options.use_per_session_threads = False
        return options
    options.intra_op_num_threads = 0 if threads is None else threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def _as_int64(x: ArrayLike, name: str) -> np.ndarray:
    """A C-contiguous int64 array (ONNX Runtime takes numpy; a CPU tensor converts without a copy)."""
    array = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if array.ndim != 2:
        raise LayerExitError(f"{name} must have shape (batch, sequence), got {tuple(array.shape)}")
    return np.ascontiguousarray(array, dtype=np.int64)


class OnnxRuntime:
    """An exported early-exit model on ONNX Runtime, behind the runtime protocol. Its methods keep no
    per-call state, so one instance may serve several threads.

    Hidden states pass between layers as numpy arrays through plain ``session.run``, not I/O binding:
    on CPU ``run`` reads numpy inputs in place, and binding's extra calls per layer cost more than the
    output copy they save (measured: docs/performance.md, "Runtime settings and why").
    """

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        config: ExitConfig,
        embed: GraphEntry,
        layers: list[GraphEntry],
        full: GraphEntry,
        threads: int | None,
        fuse: bool = True,
    ) -> None:
        _, self._ort = require_onnx()
        self.folder = folder
        self.manifest = manifest
        quantized = manifest.get("quantized", False)  # older exports say true for dynamic int8
        self.name = {"static": "onnx-int8-static", "token": "onnx-int8-token", False: "onnx"}.get(
            quantized, "onnx-int8"
        )
        self.config = config
        self.threads = threads
        self._embed_entry = embed
        self._layer_entries = layers
        self._full_entry = full
        self._embed = self._session(embed)
        self._layers = [self._session(entry) for entry in layers]
        self._reads_second = ["second_text" in entry.inputs for entry in layers]
        self._full: Any = None  # created on first use: it holds a second copy of every weight
        self.fuse = fuse
        self._fused: OrderedDict[tuple[Strategy, bool], tuple[Any, tuple[str, ...]] | None] = OrderedDict()
        """One-call sessions and their input names by (strategy, batched), most recently used last."""
        self._fused_lock = threading.Lock()

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], threads: int | None = None, *, verify: bool = True, fuse: bool = True
    ) -> OnnxRuntime:
        """Open an export folder written by :func:`export_onnx`.

        ``threads``: ONNX Runtime intra-op threads per session (``None``: its default, one per physical
        core). ``verify`` checks every file's sha256 against the manifest before loading. ``fuse``: run a
        batch's whole early exit in one call (:meth:`whole_exit`).
        """
        folder = Path(directory)
        data = read_manifest(folder)
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
        embed = graph_entry(data.get("embed"), f"{where} embed", token_inputs, ("hidden",))
        layer_inputs: set[tuple[str, ...]] = {("hidden", "attention_mask")}
        if config.reads_pairs:  # a native last exit does not read the second text: its input is pruned
            layer_inputs.add(("hidden", "attention_mask", "second_text"))
        layers = [
            graph_entry(entry, f"{where} layer {i + 1}", layer_inputs, ("hidden_out", "probs"))
            for i, entry in enumerate(raw_layers)
        ]
        full = graph_entry(data.get("full"), f"{where} full", token_inputs, ("probs",))
        for entry in (embed, *layers, full):
            path = folder / entry.file
            if not path.is_file():
                raise LayerExitError(f"{folder}: {entry.file} is missing; export the model again")
            if verify and sha256(path) != entry.sha256:
                raise LayerExitError(f"{path}: contents do not match the manifest (changed or damaged after export)")
        return cls(folder, data, config, embed, layers, full, threads, fuse)

    def _session(self, entry: GraphEntry, *, spin: bool = False) -> Any:
        path = self.folder / entry.file
        session = self._open(str(path), str(path), options=_session_options(self._ort, self.threads, spin=spin))
        names = tuple(i.name for i in session.get_inputs())
        if names != entry.inputs:
            raise LayerExitError(f"{path}: graph inputs {list(names)} differ from the manifest's {list(entry.inputs)}")
        return session

    def _open(self, graph: str | bytes, where: str, *, quiet: bool = False, options: Any = None) -> Any:
        """A session on ``graph``; ``quiet`` silences ONNX Runtime's warnings (about constants its own
        optimiser folded away in a graph layerexit built)."""
        ort = self._ort
        options = options or _session_options(ort, self.threads)
        if quiet:
            options.log_severity_level = 3
        try:
            SESSIONS_MADE.append(True)
            return ort.InferenceSession(graph, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            raise LayerExitError(f"{where}: ONNX Runtime cannot load it ({err})") from None

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

    def _second_text(self, feed: dict[str, np.ndarray], mask: np.ndarray) -> np.ndarray | None:
        """The second text's tokens (B, T) where the exits pool text pairs, else None."""
        if not self.config.reads_pairs:
            return None
        assert self.config.separator_id is not None  # ExitConfig checks it
        ids = torch.from_numpy(feed["input_ids"])  # int64 already: every embeddings graph reads the ids
        return second_text(ids, torch.from_numpy(mask), self.config.separator_id).numpy()

    def embed(self, input_ids: ArrayLike, attention_mask: ArrayLike, token_type_ids: ArrayLike | None = None) -> Rows:
        feed, mask = self._token_feed(self._embed_entry.inputs, input_ids, attention_mask, token_type_ids)
        return Rows(self._embed.run(None, feed)[0], mask, self._second_text(feed, mask))  # (B, T, H)

    def layer(self, layer: int, rows: Rows) -> tuple[Rows, Tensor]:
        feed = {"hidden": rows.hidden, "attention_mask": rows.mask}
        if self._reads_second[layer - 1]:
            feed["second_text"] = rows.second
        hidden, probs = self._layers[layer - 1].run(_LAYER_OUTPUTS, feed)
        return Rows(hidden, rows.mask, rows.second), torch.from_numpy(probs)  # (b, t, H), (b, C)

    def take(self, rows: Rows, keep: Tensor, *, trim: bool = True) -> Rows:
        index = keep.numpy()
        hidden, mask = rows.hidden[index], rows.mask[index]
        second = None if rows.second is None else rows.second[index]
        if trim:
            length = used_length(mask)
            if length < mask.shape[1]:
                hidden, mask = np.ascontiguousarray(hidden[:, :length]), np.ascontiguousarray(mask[:, :length])
                second = None if second is None else np.ascontiguousarray(second[:, :length])
        return Rows(hidden, mask, second)

    def join(self, parts: Sequence[Rows]) -> Rows:
        if len(parts) == 1:
            return parts[0]
        length = max(int(p.mask.shape[1]) for p in parts)
        hidden = np.concatenate([np.pad(p.hidden, ((0, 0), (0, length - p.hidden.shape[1]), (0, 0))) for p in parts])
        mask = np.concatenate([np.pad(p.mask, ((0, 0), (0, length - p.mask.shape[1]))) for p in parts])
        if parts[0].second is None:
            return Rows(hidden, mask)
        second = np.concatenate([np.pad(p.second, ((0, 0), (0, length - p.second.shape[1]))) for p in parts])
        return Rows(hidden, mask, second)

    def whole_exit(
        self,
        strategy: Strategy,
        input_ids: ArrayLike,
        attention_mask: ArrayLike,
        token_type_ids: ArrayLike | None = None,
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """A batch's whole early exit in one ONNX Runtime call: ``(exit layer (B,), prediction (B,), probs (B, C))``.

        The graph (:mod:`layerexit.runtime.onnx_fused`) holds the embeddings, every layer and exit, and
        ``strategy``'s decision after each, dropping rows that leave and the padding they leave behind as
        the exit loop does; one graph serves single rows and one batches. Each is built when a strategy is
        first used and holds a second copy of every weight. None where the per-layer loop must run the
        batch: ``fuse`` off, a strategy without a graph form, no rows, or a score that came within
        :data:`~layerexit.runtime.onnx_fused.MARGIN` of its threshold.
        """
        rows = len(input_ids)
        if not self.fuse or not fusable(strategy) or rows == 0:  # an empty batch: the loop returns it as it is
            return None
        fused = self._fused_session(strategy, batched=rows > 1)
        if fused is None:
            return None
        session, names = fused
        feed, mask = self._token_feed(self._embed_entry.inputs, input_ids, attention_mask, token_type_ids)
        feed["attention_mask"] = mask
        second = self._second_text(feed, mask) if "second_text" in names else None
        if second is not None:
            feed["second_text"] = second
        positions, probs, layers, prediction, margin = session.run(None, {name: feed[name] for name in names})
        if float(margin[0]) < MARGIN:
            return None
        if rows == 1:
            return torch.from_numpy(layers), torch.from_numpy(prediction), torch.from_numpy(probs)
        exit_layer, answer = np.empty(rows, dtype=np.int64), np.empty(rows, dtype=np.int64)
        exit_probs = np.empty((rows, probs.shape[1]), dtype=np.float32)
        exit_layer[positions], answer[positions], exit_probs[positions] = layers, prediction, probs
        return torch.from_numpy(exit_layer), torch.from_numpy(answer), torch.from_numpy(exit_probs)

    def _fused_session(self, strategy: Strategy, *, batched: bool) -> tuple[Any, tuple[str, ...]] | None:
        """The one-call session for ``strategy``: the last :data:`FUSED_SESSIONS` are kept."""
        key = (strategy, batched)
        with self._fused_lock:
            if key in self._fused:
                self._fused.move_to_end(key)
            else:
                session = self._build_fused(strategy, batched)
                self._fused[key] = None if session is None else (session, tuple(i.name for i in session.get_inputs()))
                while len(self._fused) > FUSED_SESSIONS:
                    self._fused.popitem(last=False)
            return self._fused[key]

    def one_call_graph(self, strategy: Strategy, *, batched: bool, optimised: bool = True) -> Any:
        """The graph :meth:`whole_exit` runs for ``strategy`` (on one row, or ``batched``), an
        ``onnx.ModelProto`` built from this export's graphs (``KeyError`` for a strategy without a graph form).

        ``optimised=False``: from the export's graphs as they are, without ONNX Runtime's session rewrites,
        for another runtime to read (OpenVINO reads these: ``benchmarks/openvino_one_call.py``)."""
        onnx, _ = require_onnx()
        entries = [self._embed_entry, *self._layer_entries]
        if optimised:
            graphs = self._optimised_graphs(entries)
        else:
            graphs = [onnx.load(str(self.folder / entry.file)) for entry in entries]
        return fused_graph(graphs[0], graphs[1:], strategy, self.num_labels, self._fused_inputs(), batched=batched)

    def _optimised_graphs(self, entries: list[Any]) -> list[Any]:
        """Each graph of ``entries`` as ONNX Runtime's session optimises it on its own."""
        onnx, ort = require_onnx()
        with tempfile.TemporaryDirectory(prefix="layerexit-fuse-") as tmp:
            # Each graph as ONNX Runtime optimises it on its own (portable rewrites only): inside an ``If``
            # branch a few rewrites are not made, and the layer would round differently from its own session.
            graphs = []
            for entry in entries:
                options = _session_options(ort, self.threads)
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
                options.optimized_model_filepath = str(Path(tmp) / entry.file)
                options.log_severity_level = 3
                self._open(str(self.folder / entry.file), str(self.folder / entry.file), options=options)
                graphs.append(onnx.load(options.optimized_model_filepath))
        return graphs

    def _fused_inputs(self) -> list[str]:
        """The one-call graph's inputs: the embeddings', then the mask and second text where a layer reads them."""
        entries = [self._embed_entry, *self._layer_entries]
        names = [*self._embed_entry.inputs]
        return names + [
            n for n in ("attention_mask", "second_text") if n not in names and any(n in e.inputs for e in entries)
        ]

    def _build_fused(self, strategy: Strategy, batched: bool) -> Any:
        try:
            model = self.one_call_graph(strategy, batched=batched)
        except KeyError:  # no graph form for this setting (a rule fitted for another model): the loop decides
            return None
        if model.ByteSize() >= 2**31:  # one protobuf message holds at most 2 GiB: such a model runs layer by layer
            self.fuse = False
            return None
        where = f"{self.folder}: the {'batched' if batched else 'single-row'} graph for {strategy}"
        options = _session_options(self._ort, self.threads, spin=True)
        return self._open(model.SerializeToString(), where, quiet=True, options=options)

    def full(self, input_ids: ArrayLike, attention_mask: ArrayLike, token_type_ids: ArrayLike | None = None) -> Tensor:
        """The last exit's probabilities (B, C) from the single ``full`` graph: the plain full model."""
        if self._full is None:
            self._full = self._session(self._full_entry, spin=True)
        feed, _ = self._token_feed(self._full_entry.inputs, input_ids, attention_mask, token_type_ids)
        return torch.from_numpy(self._full.run(None, feed)[0])
