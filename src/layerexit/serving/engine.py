"""The serving engine: one loop drives a scheduler and a runner; one worker thread runs the loop.

The parts (each tested on its own): a :class:`~layerexit.serving.scheduler.Scheduler` decides the steps
(plain state: no thread, no runtime, an injected clock); a :class:`~layerexit.serving.runner.StepRunner`
runs them on the runtime and keeps the rows that wait between layers; an
:class:`~layerexit.serving.admission.Admission` bounds what is accepted. :class:`Engine` is the loop that
joins them, the lock that lets other threads submit, and the futures callers wait on.

``layerexit serve`` runs the engine in a process of its own on PyTorch (``--engine auto``;
:mod:`layerexit.serving.process` says why: the GIL), behind the same interface (:class:`EngineHandle`).

Three schedulers (:mod:`layerexit.serving.scheduler`), one interface (:meth:`Engine.submit`,
:meth:`Engine.cancel`, :meth:`Engine.close`):

* ``full``: classic dynamic batching of the plain full model (as Triton, Ray Serve's ``@serve.batch`` or
  TorchServe do it): wait until ``max_batch`` inputs are queued or the oldest has waited ``max_wait_ms``,
  run the batch through every layer, answer it.
* ``batch``: the same dynamic batches, each run through the exit loop (exited rows leave the batch);
  a batch is answered when its last row is done, so every row waits for the slowest one.
* ``pooled``: rows are pooled layer by layer across requests. The scheduler keeps, for each layer, the
  ids of the rows of any request that wait for it (the runner keeps their hidden states and strategy
  state); each step runs one layer and its exit on up to ``max_batch`` rows waiting for it (joined from
  several requests), answers the rows that exit at once, and moves the others to the next layer's
  queue. New inputs join at the embeddings without waiting for any batch to finish.

**The pooled policies and their waiting bounds** (``policy``):

* ``deepest`` (the default): each step serves the deepest stage where rows wait: a wave of at most
  ``max_batch`` rows is embedded only when no row waits for a layer, and runs through until its last row
  exits, while new inputs gather at the embeddings for the next wave (a ``batch`` scheduler with no
  ``max_wait``, whose rows are answered as they exit). Bound: a row waits only for steps that move on a
  row that was in the engine when it arrived or one of its own wave, each of those at most ``L + 1``
  times, and at most ``max_queue`` rows are in the engine: ``max_queue * (L + 1)`` steps, as ``oldest``.
  Under load the next wave gathers while one runs, so steps are fuller, and a row that has started is
  never held back for new ones (measured against the others in docs/serve.md).

* ``fullest``: each step serves the *fullest* queue (most rows waiting; ties to the deeper
  layer), unless the row that has waited longest in any queue has waited more than ``max_wait_ms`` there:
  then that row's queue (oldest first). Bound: once a row is overdue, every step serves a queue whose
  oldest row is at least as old as it; each such step moves at least that one older row on, and at most
  ``max_queue`` rows are in the engine, so the row waits at most ``max_wait_ms + max_queue * t_step`` at
  each of its ``L + 1`` stages (embeddings and L layers), where ``t_step`` is the time of one step on
  ``max_batch`` rows.
* ``oldest``: each step serves the stage where the oldest row in the engine waits (by the arrival of its
  request), with up to ``max_batch`` rows of that stage's queue, oldest first: a started wave finishes
  before a new one is embedded. Bound: every step moves the oldest row in the engine on by one stage and
  at most ``max_queue`` rows are in the engine, so a row is answered within ``max_queue * (L + 1)`` steps
  of its arrival, with no ``max_wait_ms`` term. Its batches are smaller (docs/serve.md).

The policies are classes (:mod:`layerexit.serving.policies`). ``tests/test_scheduler.py`` checks the
three bounds by counting steps on a fake clock, with no thread and no model; ``tests/test_serving.py``
checks them again on the engine's own timings.

Every row's exit layer and prediction are the strategy's on that row's own probabilities: the same
``exit_step`` (:mod:`layerexit.runtime.loop`) decides, on per-row strategy state carried along with the
row, so pooling changes only which rows share a tensor, never a decision (tested against offline
replay under random concurrent arrivals).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from layerexit.errors import LayerExitError
from layerexit.runtime.base import Runtime
from layerexit.serving import policies
from layerexit.serving.admission import Admission, Closed
from layerexit.serving.runner import StepRunner
from layerexit.serving.scheduler import SCHEDULERS as SCHEDULER_CLASSES
from layerexit.serving.scheduler import Answer, Finished, Request, Scheduler, scheduler_named
from layerexit.strategies import Strategy

__all__ = ["POLICIES", "SCHEDULERS", "Answer", "Engine", "EngineHandle", "Request", "Stats"]

SCHEDULERS: tuple[str, ...] = tuple(SCHEDULER_CLASSES)
"""The schedulers by name."""
POLICIES: tuple[str, ...] = tuple(policies.POLICIES)
"""The ``pooled`` scheduler's policies by name, the default first."""


def as_ids(values: Sequence[int] | Tensor) -> Tensor:
    """Token ids as a (T,) long tensor."""
    return torch.as_tensor(values, dtype=torch.long)


@dataclass
class Stats:
    """What the engine did, for /metrics (read without the lock: counters only grow)."""

    exits: list[int]
    batch_rows: list[list[int]] = field(default_factory=list)  # per stage, rows of each step (last 10,000)
    steps: int = 0
    answered: int = 0
    cancelled_rows: int = 0

    def record_step(self, stage: int, rows: int) -> None:
        self.steps += 1
        record = self.batch_rows[stage]
        record.append(rows)
        if len(record) > 10_000:
            del record[:5_000]


class EngineHandle(Protocol):
    """What the HTTP app needs of an engine: :class:`Engine` in this process, or
    :class:`~layerexit.serving.process.ProcessEngine` in a process of its own."""

    on_step: Callable[[int, int, float], None] | None

    @property
    def stats(self) -> Stats: ...

    @property
    def scheduler_name(self) -> str: ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def alive(self) -> bool:
        """Whether the engine can still answer: its worker (thread or process) runs."""
        ...

    @property
    def ready(self) -> bool:
        """Whether it takes new inputs: alive and not draining."""
        ...

    @property
    def status(self) -> str:
        """Why it cannot answer, in words (for ``/healthz`` when not alive)."""
        ...

    @property
    def pid(self) -> int | None:
        """The process the engine's worker runs in."""
        ...

    def submit(self, tokens: Sequence[tuple[Sequence[int] | Tensor, Sequence[int] | Tensor | None]]) -> Request: ...

    def cancel(self, request: Request) -> None: ...

    def close(self, *, drain: bool = True, timeout: float | None = 30.0) -> None: ...


class Engine:
    """Owns a scheduler, a runner on ``runtime`` and a worker thread; ``submit`` is safe from any thread."""

    def __init__(
        self,
        runtime: Runtime,
        strategy: Strategy,
        *,
        scheduler: str = "pooled",
        policy: str | policies.Policy = "deepest",
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        pad_id: int = 0,
        threads: int | None = None,
        on_step: Callable[[int, int, float], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        start: bool = True,
    ) -> None:
        """``on_step(stage, rows, seconds)`` is called after every step (stage 0: embeddings or a whole
        dynamic batch); ``threads``: torch threads of the worker; ``policy``: how ``pooled`` picks the next
        stage (module docstring), a name or a :class:`~layerexit.serving.policies.Policy`; ``clock``: seconds,
        for arrival and waiting times; ``start=False``: no worker thread (a test drives the steps itself)."""
        if max_queue < 1:
            raise LayerExitError("max_queue must be >= 1")
        self.scheduler: Scheduler = scheduler_named(
            scheduler,
            num_layers=runtime.num_layers,
            policy=policy,
            max_batch=max_batch,
            max_wait=max_wait_ms / 1000,
            clock=clock,
        )
        self.runner = StepRunner(runtime, strategy, pad_id=pad_id)
        self.clock = clock
        self.threads = threads
        self.on_step = on_step
        self.stats = Stats(exits=[0] * (runtime.num_layers + 1), batch_rows=[[] for _ in range(runtime.num_layers + 1)])
        self.admission = Admission(max_queue)
        self._lock = threading.Condition()
        self._stop = False
        self._dropped: list[int] = []  # rows the scheduler dropped that the runner still holds
        self._worker = threading.Thread(target=self._run, name=f"layerexit-{scheduler}", daemon=True)
        self._started = start
        if start:
            self._worker.start()

    # ------------------------------------------------------------------ callers' side
    @property
    def scheduler_name(self) -> str:
        return self.scheduler.name

    @property
    def queue_depth(self) -> int:
        return self.admission.depth

    @property
    def alive(self) -> bool:
        return not self._stop and (self._worker.is_alive() or not self._started)

    @property
    def ready(self) -> bool:
        return self.alive and self.admission.accepting

    @property
    def status(self) -> str:
        return "the engine stopped"

    @property
    def pid(self) -> int | None:
        return os.getpid()

    def submit(self, tokens: Sequence[tuple[Sequence[int] | Tensor, Sequence[int] | Tensor | None]]) -> Request:
        """Queue the inputs of one request (each input's ``input_ids`` and ``token_type_ids``, unpadded,
        as tensors or lists); raises :class:`Overloaded` when they do not fit in ``max_queue``,
        :class:`Closed` when draining."""
        if not tokens:
            raise LayerExitError("a request needs at least one input")
        request = Request(
            [(as_ids(ids), None if types is None else as_ids(types)) for ids, types in tokens], arrived=self.clock()
        )
        self.admission.admit(len(tokens))
        with self._lock:
            if self._stop:
                self.admission.release(len(tokens))
                raise Closed("the engine stopped")
            self.scheduler.add(request)
            self._lock.notify()
        return request

    def cancel(self, request: Request) -> None:
        """The caller went away: its waiting rows are dropped now, its rows in a running step after it."""
        request.cancelled = True
        with self._lock:
            complete = self._settle(self.scheduler.cancel(request))
            self._lock.notify()
        self._resolve(complete)

    def close(self, *, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop taking inputs; with ``drain`` answer everything accepted first, then stop the worker."""
        self.admission.close()
        with self._lock:
            if not drain:
                self._stop = True
            self._lock.notify()
        deadline = None if timeout is None else time.monotonic() + timeout
        while drain and self._worker.is_alive():
            with self._lock:
                if self.admission.depth == 0:
                    self._stop = True
                    self._lock.notify()
                    break
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.005)
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._started:
            self._worker.join(timeout)
        if not self._started or self._worker.is_alive():  # a worker stuck in a step: its requests fail now
            self._fail_all(Closed("the engine stopped"))

    # ------------------------------------------------------------------ the loop
    def step(self) -> bool:
        """One turn of the loop: ask the scheduler for a step, run it, settle its outcome. What the worker
        thread repeats; called directly only on an engine made with ``start=False`` (a test on a fake
        clock). Whether a step ran."""
        with self._lock:
            step = self.scheduler.schedule(flush=not self.admission.accepting)
            dropped, self._dropped = self._dropped, []
        self.runner.forget(dropped)  # the runner is the loop's own: no other thread touches it
        if step is None:
            return False
        started = self.clock()
        outcome = self.runner.run(step)
        seconds = self.clock() - started
        with self._lock:
            complete = self._settle(self.scheduler.update(step, outcome))
        self._resolve(complete)
        self.stats.record_step(step.stage, len(step.rows))
        if self.on_step is not None:
            self.on_step(step.stage, len(step.rows), seconds)
        return True

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._stop and not self._due():
                        self._lock.wait(self._sleep())
                    if self._stop:
                        break
                try:
                    self.step()
                except Exception as err:  # a runtime failure answers the rows involved, never hangs them
                    self._fail_all(err)
        self._fail_all(Closed("the server stopped"))

    def _due(self) -> bool:
        """Whether the scheduler may have a step now (under the lock)."""
        return self.scheduler.waiting > 0 and (self.scheduler.next_ready() is None or not self.admission.accepting)

    def _sleep(self) -> float:
        due = self.scheduler.next_ready()
        return 0.05 if due is None else max(0.0, min(0.05, due - self.clock()))

    def _settle(self, finished: list[Finished]) -> list[Request]:
        """Count the rows the scheduler let go (under the lock): answers, or drops (the runner forgets
        those before its next step). The requests now complete, to :meth:`_resolve` outside the lock."""
        self._dropped.extend(f.row for f in finished if f.answer is None)
        complete = []
        for done in finished:
            self.admission.release()
            request, answer = done.request, done.answer
            if answer is not None:
                request.answers[done.index] = answer
                self.stats.answered += 1
                self.stats.exits[answer.exit_layer] += 1
            else:
                self.stats.cancelled_rows += 1
            request.remaining -= 1
            if request.remaining == 0:
                complete.append(request)
        return complete

    @staticmethod
    def _resolve(requests: list[Request]) -> None:
        for request in requests:
            if request.future.done():
                continue
            if request.cancelled:
                request.future.cancel()
            else:
                request.future.set_result([a for a in request.answers if a is not None])

    def _fail_all(self, err: BaseException) -> None:
        """Every row held fails with ``err``: the requests get it at once."""
        with self._lock:
            requests = self.scheduler.abort()
            self._dropped.clear()
        self.runner.clear()
        for request in requests:
            self.admission.release(request.remaining)
            request.remaining = 0
            if not request.future.done():
                request.future.set_exception(err)
