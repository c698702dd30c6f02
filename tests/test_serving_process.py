"""The engine in a process of its own: the same answers as offline replay, admission, cancel and drain
in the parent, a failed start said plainly, and a dead child failing its requests instead of hanging."""

from __future__ import annotations

import random
import time
from functools import partial
from typing import Any

import pytest
import torch

from layerexit import strategies
from layerexit.errors import LayerExitError
from layerexit.runtime.loop import all_exits
from layerexit.runtime.torch_runtime import TorchRuntime
from layerexit.serving.admission import Closed, Overloaded
from layerexit.serving.engine import Engine
from layerexit.serving.process import ProcessEngine

from .conftest import tiny_model
from .test_model import _peaked, _varied
from .test_serving import _inputs, _offline, close_refusing_new_inputs, submit_concurrently


def _tiny_engine(strategy: str, layer_delay: float = 0.0, **options: Any) -> tuple[Engine, dict[str, Any]]:
    """Runs in the child: the same tiny model the parent builds (seeded), behind an engine."""
    if layer_delay == -1:
        raise LayerExitError("runs/missing is not a run folder")
    runtime = TorchRuntime(_peaked(tiny_model("bert", num_labels=3)))
    if layer_delay:
        original = runtime.layer

        def slow_layer(layer, rows):  # type: ignore[no-untyped-def]
            time.sleep(layer_delay)
            return original(layer, rows)

        runtime.layer = slow_layer  # type: ignore[method-assign]
    engine = Engine(runtime, strategies.parse(strategy), **options)
    return engine, {"scheduler": engine.scheduler_name, "num_layers": runtime.num_layers, "runtime": "torch"}


def test_answers_equal_offline_replay_under_concurrent_arrivals() -> None:
    runtime = TorchRuntime(_peaked(tiny_model("bert", num_labels=3)))
    inputs = _inputs(40, seed=5)
    with torch.inference_mode():
        probs = torch.cat(
            [all_exits(runtime, ids[None], torch.ones(1, ids.numel(), dtype=torch.long)) for ids, _ in inputs], 1
        )
    strategy = _varied("entropy", probs)
    engine = ProcessEngine(
        partial(_tiny_engine, str(strategy), scheduler="pooled", max_batch=5, max_wait_ms=2, max_queue=1000),
        max_queue=1000,
    )
    steps: list[tuple[int, int]] = []
    engine.on_step = lambda stage, rows, seconds: steps.append((stage, rows))
    jobs = submit_concurrently(engine, inputs, random.Random(2), largest=3)
    engine.close()
    for chunk, job in jobs:
        answers = job.future.result()
        assert len(answers) == len(chunk)
        for (ids, _), answer in zip(chunk, answers, strict=True):
            assert (answer.exit_layer, answer.label) == _offline(runtime, strategy, ids)
            assert answer.probs.shape == (3,) and answer.latency_ms > 0
    assert engine.stats.answered == len(inputs) == sum(engine.stats.exits) and engine.queue_depth == 0
    assert len({layer for layer, count in enumerate(engine.stats.exits) if count}) >= 2  # exits really varied
    assert steps and sum(rows for stage, rows in steps if stage == 0) == len(inputs)  # every row embedded once
    assert not engine.process.is_alive()


def test_admission_cancel_and_drain_in_the_parent() -> None:
    engine = ProcessEngine(
        partial(_tiny_engine, "static(layer=4)", layer_delay=0.05, scheduler="pooled", max_batch=2, max_queue=5),
        max_queue=5,
    )
    accepted = [engine.submit(_inputs(1, seed=i)) for i in range(4)]
    accepted.append(engine.submit([([7, 8, 9], None)]))  # plain lists travel too
    with pytest.raises(Overloaded):
        engine.submit(_inputs(1, seed=9))  # 5 inputs held: the 6th is refused at once
    engine.cancel(accepted[0])
    close_refusing_new_inputs(engine)
    for job in accepted[1:]:  # drained: every accepted request answered exactly once
        assert [a.exit_layer for a in job.future.result(timeout=1)] == [4]
    assert accepted[0].future.cancelled() or len(accepted[0].future.result()) == 1  # cancelled unless already done
    assert engine.stats.answered + engine.stats.cancelled_rows == 5 and engine.queue_depth == 0


def test_a_failed_start_is_said_plainly() -> None:
    with pytest.raises(LayerExitError, match="runs/missing is not a run folder"):
        ProcessEngine(partial(_tiny_engine, "static(layer=2)", layer_delay=-1), max_queue=4)


def test_a_dead_engine_fails_its_requests_and_refuses_new_ones() -> None:
    engine = ProcessEngine(
        partial(_tiny_engine, "static(layer=4)", layer_delay=0.5, scheduler="pooled", max_queue=8), max_queue=8
    )
    job = engine.submit(_inputs(2, seed=1))
    engine.process.kill()
    with pytest.raises(Closed, match="engine process stopped"):
        job.future.result(timeout=10)
    with pytest.raises(Closed):
        engine.submit(_inputs(1, seed=2))
    assert engine.queue_depth == 0
    engine.close()


def test_a_killed_engine_process_is_not_alive_and_refuses_inputs() -> None:
    engine = ProcessEngine(partial(_tiny_engine, "static(layer=4)", scheduler="pooled", max_queue=5), max_queue=5)
    assert engine.alive and engine.ready
    engine.process.kill()
    deadline = time.monotonic() + 20
    while engine.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.alive and not engine.ready
    with pytest.raises(Closed, match="the engine stopped"):
        engine.submit(_inputs(1, seed=1))
    engine.close()
