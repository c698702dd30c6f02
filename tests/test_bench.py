"""`bench`'s figures: each runtime's ratio is to the layers its own exits saved."""

from __future__ import annotations

import torch

from layerexit.data.encoding import Encoded
from layerexit.evaluation.bench import BenchInputs, bench, format_bench
from layerexit.runtime.base import Rows
from layerexit.runtime.torch_runtime import TorchRuntime
from layerexit.strategies import MaxProb

from .conftest import tiny_model


class _LateFirstExit(TorchRuntime):
    """The PyTorch runtime whose first exit says nothing (all-zero probabilities): every row that the
    reference lets out at layer 1 leaves at layer 2 here, as int8 exits can leave later than fp32 ones."""

    name = "late"

    def layer(self, layer: int, rows: Rows) -> tuple[Rows, torch.Tensor]:
        rows, probs = super().layer(layer, rows)
        return rows, torch.zeros_like(probs) if layer == 1 else probs


def test_each_runtime_is_measured_against_its_own_layer_saving() -> None:
    model = tiny_model("bert")
    ids = [[5 + (i * 7 + j) % 40 for j in range(3 + i % 5)] for i in range(12)]
    inputs = BenchInputs(Encoded(input_ids=ids, token_type_ids=None, labels=torch.zeros(12, dtype=torch.long)), 0)
    strategy = MaxProb(threshold=0.01)  # every exit of the tiny model clears it: the reference leaves at layer 1
    late = _LateFirstExit(model)
    results = bench(
        TorchRuntime(model), strategy, inputs, batch_sizes=(1, 4), repeats=1, warmup=1, threads=1,
        progress=False, others=[late],
    )  # fmt: skip
    layers = model.num_layers
    for entry in results["batch_sizes"].values():
        assert entry["layer_speedup"] == layers and entry["late_layer_speedup"] == layers / 2
    printed = format_bench(results)
    # the late runtime's row gives its own saving and its wall-clock over that saving
    entry = results["batch_sizes"]["4"]
    row = next(line for line in printed.splitlines() if line.split()[:2] == ["4", "late_early_exit"])
    assert f"{layers / 2:.2f}x" in row.split()
    assert f"{entry['late_early_exit_wallclock_speedup'] / (layers / 2):.2f}" == row.split()[-1]
    # and the line that sets it against its own full model gives the ratio to that same saving
    vs_full = entry["late_early_exit_vs_late_full"]
    assert f"late early exit vs late full model: {vs_full:.2f}x (ratio {vs_full / (layers / 2):.2f} of its" in printed
    # the report page's bench table reads the same saving from the results
    from layerexit.report.tables import bench_section

    html = bench_section(results)
    cells = html[html.index("<td>late_early_exit</td>") :].split("</tr>")[0]
    assert f"<td>{layers / 2:.2f}x</td>" in cells
