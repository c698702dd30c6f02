"""The step runner: rows asked in any order across the blocks it keeps give the same probabilities as
each row run alone, what stays of a block is kept, and dropped rows are freed."""

from __future__ import annotations

import pytest
import torch

from layerexit import strategies
from layerexit.errors import LayerExitError
from layerexit.runtime.torch_runtime import TorchRuntime
from layerexit.serving.runner import StepRunner
from layerexit.serving.scheduler import Step

from .conftest import tiny_model
from .test_model import _peaked


def _tokens(n: int, seed: int) -> list[tuple[torch.Tensor, None]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [int(torch.randint(2, 14, (1,), generator=g)) for _ in range(n)]
    return [(torch.randint(5, 90, (length,), generator=g), None) for length in lengths]


@torch.inference_mode()
def test_rows_taken_across_blocks_in_any_order_equal_each_row_alone() -> None:
    runtime = TorchRuntime(_peaked(tiny_model("bert", num_labels=3)).eval())
    never = strategies.Static(layer=runtime.num_layers)  # nobody leaves before the last layer
    runner = StepRunner(runtime, never)
    tokens = _tokens(5, seed=1)
    runner.run(Step("embed", 0, [0, 1, 2], tokens[:3]))
    runner.run(Step("embed", 0, [3, 4], tokens[3:]))
    outcome = runner.run(Step("layer", 1, [4, 0, 3], []))  # two blocks, interleaved
    assert outcome.left == [] and outcome.went_on == [4, 0, 3]
    assert runner.held == 5  # rows 1 and 2 stay in what is left of their block
    assert runner.run(Step("layer", 1, [2, 1], [])).went_on == [2, 1]
    assert runner.run(Step("layer", 2, [1, 4, 2, 0, 3], [])).went_on == [1, 4, 2, 0, 3]
    probs = {}
    for stage in range(3, runtime.num_layers + 1):
        out = runner.run(Step("layer", stage, [0, 1, 2, 3, 4], []))
        for row, p in zip(out.left, out.probs, strict=True):
            probs[row] = p
    assert sorted(probs) == [0, 1, 2, 3, 4] and runner.held == 0
    for row in range(5):
        alone = StepRunner(runtime, never)
        alone.run(Step("embed", 0, [row], [tokens[row]]))
        for stage in range(1, runtime.num_layers + 1):
            out = alone.run(Step("layer", stage, [row], []))
        torch.testing.assert_close(out.probs[0], probs[row], atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_forget_frees_a_block_none_of_whose_rows_is_wanted() -> None:
    runtime = TorchRuntime(tiny_model("bert", num_labels=3).eval())
    runner = StepRunner(runtime, strategies.Static(layer=runtime.num_layers))
    runner.run(Step("embed", 0, [0, 1], _tokens(2, seed=2)))
    runner.run(Step("embed", 0, [2], _tokens(1, seed=3)))
    runner.forget([0])
    assert runner.held == 2 and len(runner._blocks) == 2  # row 1 still wants its block
    runner.forget([1])
    assert runner.held == 1 and len(runner._blocks) == 1
    with pytest.raises(LayerExitError, match="row 0 is not held"):
        runner.run(Step("layer", 1, [0], []))
