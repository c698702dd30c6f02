"""The watched engine (serving/supervisor.py): an engine that dies or stalls fails its requests at once
(503 for the HTTP side), is restarted with a back-off, and after ``max_restarts`` tries in a row the
supervisor gives up; each event is counted."""

from __future__ import annotations

import threading
import time
from functools import partial
from typing import Any

import pytest
import torch

from layerexit import strategies
from layerexit.runtime.torch_runtime import TorchRuntime
from layerexit.serving.admission import Closed
from layerexit.serving.engine import Engine, EngineHandle
from layerexit.serving.process import ProcessEngine
from layerexit.serving.supervisor import Supervisor

from .conftest import tiny_model
from .test_serving import _inputs
from .test_serving_process import _tiny_engine


def _engine(gate: threading.Event | None = None) -> Engine:
    """A tiny engine; with ``gate``, every layer waits for it (an engine that stops making progress)."""
    runtime = TorchRuntime(tiny_model("bert", num_labels=3))
    if gate is not None:
        original = runtime.layer

        def gated(layer, rows):  # type: ignore[no-untyped-def]
            gate.wait()
            return original(layer, rows)

        runtime.layer = gated  # type: ignore[method-assign]
    return Engine(runtime, strategies.parse("static(layer=4)"), scheduler="pooled", max_queue=64)


def _wait(condition: Any, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_dead_engine_fails_its_requests_at_once_and_is_restarted() -> None:
    started: list[Engine] = []

    def start() -> EngineHandle:
        started.append(_engine(gate=threading.Event() if not started else None))  # the first one hangs
        return started[-1]

    events: list[str] = []
    watched = Supervisor(start, backoff_s=0.05, stall_s=60)
    watched.on_event = events.append
    requests = [watched.submit(_inputs(2, seed=i)) for i in range(5)]
    started[0].close(drain=False, timeout=0.2)  # its worker is gone: the engine died
    for request in requests:  # every pending request fails, none hangs
        with pytest.raises(Closed):
            request.future.result(timeout=5)
    _wait(lambda: watched.alive)
    assert events == ["died", "restarted"] and watched.events["died"] == 1 and len(started) == 2
    assert len(watched.submit(_inputs(3, seed=9)).future.result(timeout=30)) == 3
    watched.close()


def test_a_stalled_engine_is_stopped_and_restarted() -> None:
    gate, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def start() -> EngineHandle:
        calls.append(1)
        if len(calls) == 1:
            return _engine(gate)  # its steps never finish
        release.wait(30)  # the new engine takes a while to load
        return _engine()

    watched = Supervisor(start, backoff_s=0.05, stall_s=0.3)
    request = watched.submit(_inputs(1, seed=1))  # waits forever at layer 1
    _wait(lambda: len(calls) == 2)  # the stall was seen; the new engine is starting
    assert not watched.alive and not watched.ready
    with pytest.raises(Closed):
        request.future.result(timeout=10)  # failed when the stall was seen, though its step never returned
    with pytest.raises(Closed, match=r"the engine stalled; restarting \(try 1 of 3\)"):
        watched.submit(_inputs(1, seed=2))
    release.set()
    _wait(lambda: watched.alive)
    assert watched.events["stalled"] == 1 and watched.events["restarted"] == 1
    assert len(watched.submit(_inputs(1, seed=3)).future.result(timeout=30)) == 1
    gate.set()
    watched.close()


def test_it_gives_up_after_max_restarts_tries_in_a_row() -> None:
    first = _engine()
    engines = [first]

    def start() -> EngineHandle:
        if engines:
            return engines.pop()
        raise RuntimeError("the model file is gone")

    gave_up: list[str] = []
    watched = Supervisor(start, max_restarts=2, backoff_s=0.1, on_give_up=gave_up.append)
    first.close(drain=False, timeout=0.2)
    _wait(lambda: bool(gave_up))
    assert watched.state == "failed" and not watched.alive and not watched.ready
    assert watched.events == {"died": 1, "stalled": 0, "start_failed": 2, "restarted": 0}
    assert gave_up[0] == "the engine died and could not be restarted (last try: RuntimeError: the model file is gone)"
    assert watched.waits == [0.1, 0.2]  # the back-off doubles
    with pytest.raises(Closed, match="could not be restarted"):
        watched.submit(_inputs(1, seed=4))
    watched.close()


def test_a_killed_engine_process_fails_its_requests_and_a_new_process_answers() -> None:
    factory = partial(_tiny_engine, "static(layer=4)", layer_delay=0.2, scheduler="pooled", max_queue=64)
    watched = Supervisor(lambda: ProcessEngine(factory, max_queue=64), backoff_s=0.05)
    first_pid = watched.pid
    requests = [watched.submit(_inputs(4, seed=i)) for i in range(8)]  # 32 rows at 0.2 s a layer: in flight
    time.sleep(0.1)
    watched.engine.process.kill()  # type: ignore[attr-defined]
    failed = 0
    for request in requests:
        try:
            request.future.result(timeout=10)
        except Closed:
            failed += 1
    assert failed >= 1  # the ones in flight got an error at once, not a hang
    _wait(lambda: watched.alive, seconds=120)
    assert watched.pid != first_pid and watched.events["died"] == 1
    with torch.inference_mode():
        assert len(watched.submit(_inputs(2, seed=11)).future.result(timeout=60)) == 2
    watched.close()
