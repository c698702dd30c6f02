"""Schedulers: which rows run next, as plain state with no thread, no lock and no runtime.

A scheduler holds the rows (inputs) of the requests it was given, each under a row id, and decides steps;
a :class:`~layerexit.serving.runner.StepRunner` runs them on a runtime; one loop
(:class:`~layerexit.serving.engine.Engine`) drives the two. The interface, after vLLM's
``SchedulerInterface``:

* :meth:`Scheduler.add` a request's rows; :meth:`Scheduler.cancel` a request's waiting rows;
* :meth:`Scheduler.schedule` the next :class:`Step` (which stage, which rows), or ``None``;
* :meth:`Scheduler.update` with the step's :class:`Outcome` (which rows left, their labels and
  probabilities, which went on), which returns the rows that are done, with their answers.

Time comes from an injected clock, so the waiting bounds (proved in :mod:`layerexit.serving.engine`) are
unit tests that count steps on a fake clock (``tests/test_scheduler.py``).

Three schedulers:

* :class:`FullScheduler`: dynamic batches of the plain full model (stage 0 is the whole model);
* :class:`BatchScheduler`: the same batches through the exit loop, answered when the last row exits;
* :class:`PooledScheduler`: rows pooled layer by layer across requests (stage 0: the embeddings, stage i:
  layer i); a :class:`~layerexit.serving.policies.Policy` picks the stage of each step.
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from torch import Tensor

from layerexit.errors import LayerExitError
from layerexit.serving import policies

Inputs = tuple[Tensor, Tensor | None]
"""One input's ``input_ids`` (T,) and ``token_type_ids`` (T,) or None, unpadded."""


@dataclass
class Answer:
    """One input's outcome."""

    label: int
    probs: Tensor  # (C,) of the exit it left at
    exit_layer: int
    latency_ms: float


@dataclass(eq=False)
class Request:
    """The inputs of one call to ``submit``; ``future`` gets their answers, in order. The engine that took it
    fills ``answers`` and resolves ``future``; a scheduler only reads ``tokens``, ``arrived`` and
    ``cancelled``."""

    tokens: list[Inputs]
    arrived: float = field(default_factory=time.perf_counter)
    future: Future[list[Answer]] = field(default_factory=Future)
    answers: list[Answer | None] = field(default_factory=list)
    remaining: int = 0
    cancelled: bool = False
    key: int = 0  # the request's number between processes (ProcessEngine)

    def __post_init__(self) -> None:
        self.answers = [None] * len(self.tokens)
        self.remaining = len(self.tokens)


@dataclass(frozen=True)
class Row:
    """One input of a request, as a scheduler holds it."""

    request: Request
    index: int

    @property
    def arrived(self) -> float:
        return self.request.arrived

    @property
    def inputs(self) -> Inputs:
        return self.request.tokens[self.index]


@dataclass(frozen=True)
class Step:
    """What to run next. ``kind``: ``full`` (the whole model), ``exit_loop`` (the whole exit loop),
    ``embed`` (the embeddings, the rows' state starts) or ``layer`` (one layer and its exit, on rows that
    the runner holds from earlier steps); ``inputs``: the rows' token ids for every kind but ``layer``."""

    kind: Literal["full", "exit_loop", "embed", "layer"]
    stage: int
    rows: list[int]
    inputs: list[Inputs]


@dataclass(frozen=True)
class Outcome:
    """What a step did: the rows that ``left`` (with their ``labels`` (n,), ``probs`` (n, C) and exit
    ``layers`` (n,), in the order of ``left``) and the rows that ``went_on`` to the next stage."""

    left: list[int]
    labels: Tensor
    probs: Tensor
    layers: Tensor
    went_on: list[int]


@dataclass(frozen=True)
class Finished:
    """A row the scheduler no longer holds: its ``answer``, or ``None`` when its request was cancelled."""

    row: int
    request: Request
    index: int
    answer: Answer | None


@dataclass
class Waiting:
    """Rows that entered a stage's queue together (what a policy reads)."""

    rows: list[int]
    since: float
    arrived: float

    def __len__(self) -> int:
        return len(self.rows)


class Scheduler(ABC):
    """Rows in, steps out; answers when told what a step did."""

    name: ClassVar[str]

    def __init__(
        self,
        *,
        num_layers: int,
        max_batch: int = 32,
        max_wait: float = 0.005,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """``max_wait``: seconds; ``clock``: seconds, read for arrival and waiting times."""
        if max_batch < 1 or max_wait < 0:
            raise LayerExitError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.num_layers = num_layers
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.clock = clock
        self.rows: dict[int, Row] = {}  # every row held: waiting or in a step
        self._ids = itertools.count()
        self._reset()

    # ------------------------------------------------------------------ the interface
    def add(self, request: Request) -> list[int]:
        """Take a request's rows; their ids, in input order."""
        ids = [next(self._ids) for _ in request.tokens]
        for row, index in zip(ids, range(len(request.tokens)), strict=True):
            self.rows[row] = Row(request, index)
        self._enqueue(ids, request.arrived)
        return ids

    def cancel(self, request: Request) -> list[Finished]:
        """Drop a request's waiting rows now (its rows in a running step are dropped by :meth:`update`)."""
        dropped = self._unqueue(lambda row: self.rows[row].request is request)
        return [self._finish(row, None) for row in dropped]

    @abstractmethod
    def schedule(self, *, flush: bool = False) -> Step | None:
        """The next step, or ``None`` when no row is ready (``flush``: do not wait to fill a batch)."""

    def update(self, step: Step, outcome: Outcome) -> list[Finished]:
        """Take a step's outcome: answer the rows that left, queue the ones that went on."""
        now = self.clock()
        finished = []
        for i, row in enumerate(outcome.left):
            held = self.rows[row]
            answer = Answer(
                int(outcome.labels[i]), outcome.probs[i], int(outcome.layers[i]), (now - held.arrived) * 1000
            )
            finished.append(self._finish(row, None if held.request.cancelled else answer))
        going = []
        for row in outcome.went_on:
            if self.rows[row].request.cancelled:
                finished.append(self._finish(row, None))
            else:
                going.append(row)
        if going:
            self._went_on(step.stage + 1, going, now)
        return finished

    def next_ready(self) -> float | None:
        """When waiting rows become due without a new arrival (clock seconds), or ``None``: ready now or empty."""
        return None

    def abort(self) -> list[Request]:
        """Drop every row, waiting or running; the requests they belonged to."""
        requests = {id(r.request): r.request for r in self.rows.values()}
        self.rows.clear()
        self._reset()
        return list(requests.values())

    @property
    def waiting(self) -> int:
        """Rows in the queues (not in a running step)."""
        return sum(len(queue) for queue in self._queues())

    # ------------------------------------------------------------------ per scheduler
    @abstractmethod
    def _reset(self) -> None:
        """Empty queues."""

    @abstractmethod
    def _enqueue(self, rows: list[int], arrived: float) -> None: ...

    @abstractmethod
    def _unqueue(self, drop: Callable[[int], bool]) -> list[int]:
        """Remove the waiting rows ``drop`` selects; their ids."""

    @abstractmethod
    def _queues(self) -> Iterator[list[int] | deque[int] | Waiting]: ...

    def _went_on(self, stage: int, rows: list[int], now: float) -> None:
        raise LayerExitError(f"the {self.name} scheduler runs no step that rows go on from")

    def _finish(self, row: int, answer: Answer | None) -> Finished:
        held = self.rows.pop(row)
        return Finished(row, held.request, held.index, answer)

    def _step(self, kind: Literal["full", "exit_loop", "embed", "layer"], stage: int, rows: list[int]) -> Step:
        inputs = [] if kind == "layer" else [self.rows[r].inputs for r in rows]
        return Step(kind, stage, rows, inputs)


class FullScheduler(Scheduler):
    """Classic dynamic batching: run a batch once ``max_batch`` rows wait or the oldest has waited
    ``max_wait`` (a request larger than a batch continues in the next one)."""

    name = "full"
    kind: ClassVar[Literal["full", "exit_loop"]] = "full"

    def _reset(self) -> None:
        self._queue: deque[int] = deque()

    def schedule(self, *, flush: bool = False) -> Step | None:
        if not self._queue:
            return None
        if len(self._queue) < self.max_batch and not flush and self.next_ready() is not None:
            return None
        rows = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
        return self._step(self.kind, 0, rows)

    def next_ready(self) -> float | None:
        if not self._queue:
            return None
        due = self.rows[self._queue[0]].arrived + self.max_wait
        return due if due > self.clock() else None

    def _enqueue(self, rows: list[int], arrived: float) -> None:
        self._queue.extend(rows)

    def _unqueue(self, drop: Callable[[int], bool]) -> list[int]:
        dropped = [row for row in self._queue if drop(row)]
        if dropped:
            self._queue = deque(row for row in self._queue if not drop(row))
        return dropped

    def _queues(self) -> Iterator[deque[int]]:
        yield self._queue


class BatchScheduler(FullScheduler):
    """The same dynamic batches, each through the exit loop; a batch is answered when its last row exits."""

    name = "batch"
    kind = "exit_loop"


class PooledScheduler(Scheduler):
    """Rows pooled layer by layer: one queue per stage; each step runs one stage on up to ``max_batch`` of
    its rows (several requests' rows joined, a queued group split when it does not fit); rows that do not
    exit wait for the next layer. New rows are embedded without waiting for any batch to finish."""

    name = "pooled"

    def __init__(
        self,
        *,
        num_layers: int,
        policy: str | policies.Policy = "deepest",
        max_batch: int = 32,
        max_wait: float = 0.005,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """``policy``: how the stage of each step is picked, a name or a
        :class:`~layerexit.serving.policies.Policy`."""
        self.policy = policies.policy_named(policy)
        super().__init__(num_layers=num_layers, max_batch=max_batch, max_wait=max_wait, clock=clock)

    def _reset(self) -> None:
        self._stages: list[deque[Waiting]] = [deque() for _ in range(self.num_layers + 1)]

    def schedule(self, *, flush: bool = False) -> Step | None:
        stage = self.policy.pick(self._stages, self.clock(), self.max_wait)
        if stage is None:
            return None
        queue = self._stages[stage] = self.policy.order(self._stages[stage])
        rows: list[int] = []
        while queue and len(rows) < self.max_batch:
            room = self.max_batch - len(rows)
            group = queue[0]
            if len(group) <= room:
                rows.extend(queue.popleft().rows)
            else:  # split: the head runs, the rest keeps its place
                rows.extend(group.rows[:room])
                group.rows = group.rows[room:]
                group.arrived = min(self.rows[r].arrived for r in group.rows)
        return self._step("embed" if stage == 0 else "layer", stage, rows)

    def _enqueue(self, rows: list[int], arrived: float) -> None:
        self._stages[0].append(Waiting(rows, arrived, arrived))

    def _went_on(self, stage: int, rows: list[int], now: float) -> None:
        if self.policy.arrival_order:  # splitting the group later keeps its oldest rows
            rows = sorted(rows, key=lambda r: self.rows[r].arrived)
        self._stages[stage].append(Waiting(rows, now, min(self.rows[r].arrived for r in rows)))

    def _unqueue(self, drop: Callable[[int], bool]) -> list[int]:
        dropped = []
        for stage, queue in enumerate(self._stages):
            kept: deque[Waiting] = deque()
            for group in queue:
                gone = [r for r in group.rows if drop(r)]
                if not gone:
                    kept.append(group)
                    continue
                dropped.extend(gone)
                rest = [r for r in group.rows if not drop(r)]
                if rest:
                    kept.append(Waiting(rest, group.since, min(self.rows[r].arrived for r in rest)))
            self._stages[stage] = kept
        return dropped

    def _queues(self) -> Iterator[Waiting]:
        for queue in self._stages:
            yield from queue


SCHEDULERS: dict[str, type[Scheduler]] = {cls.name: cls for cls in (FullScheduler, BatchScheduler, PooledScheduler)}
"""Every scheduler by name."""


def scheduler_named(
    name: str,
    *,
    num_layers: int,
    policy: str | policies.Policy = "deepest",
    max_batch: int = 32,
    max_wait: float = 0.005,
    clock: Callable[[], float] = time.perf_counter,
) -> Scheduler:
    """A new scheduler of the kind ``name`` (``policy`` is for ``pooled``)."""
    if name not in SCHEDULERS:
        raise LayerExitError(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")
    if name == PooledScheduler.name:
        return PooledScheduler(
            num_layers=num_layers, policy=policy, max_batch=max_batch, max_wait=max_wait, clock=clock
        )
    policies.policy_named(policy)  # a misspelt policy is an error whatever the scheduler
    return SCHEDULERS[name](num_layers=num_layers, max_batch=max_batch, max_wait=max_wait, clock=clock)
