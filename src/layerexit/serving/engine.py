"""Serving engines: one worker thread owns one runtime and answers the inputs of many requests.

``layerexit serve`` runs the engine in a process of its own on PyTorch (``--engine auto``;
:mod:`layerexit.serving.process` says why: the GIL), behind the same interface (:class:`EngineHandle`).

Three schedulers, one interface (:meth:`Engine.submit`, :meth:`Engine.cancel`, :meth:`Engine.close`):

* ``full``: classic dynamic batching of the plain full model (as Triton, Ray Serve's ``@serve.batch`` or
  TorchServe do it): wait until ``max_batch`` inputs are queued or the oldest has waited ``max_wait_ms``,
  run the batch through every layer, answer it.
* ``batch``: the same dynamic batches, each run through the exit loop (exited rows leave the batch);
  a batch is answered when its last row is done, so every row waits for the slowest one.
* ``pooled``: rows are pooled layer by layer across requests. The engine keeps, for each layer, the
  rows of any request that wait for it (as :class:`Group` s of rows with their strategy state); each
  step runs one layer and its exit on up to ``max_batch`` rows waiting for it (joined from several
  groups), answers the rows that exit at once, and moves the others to the next layer's queue. New
  inputs join at the embeddings without waiting for any batch to finish.

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
three bounds by counting steps on a fake clock, with no thread; ``tests/test_serving.py`` checks them
again on the engine's own timings.

Every row's exit layer and prediction are the strategy's on that row's own probabilities: the same
``exit_step`` (:mod:`layerexit.runtime.loop`) decides, on per-row strategy state carried along with the
row, so pooling changes only which rows share a tensor, never a decision (tested against offline
replay under random concurrent arrivals).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor

from layerexit.errors import LayerExitError
from layerexit.runtime.base import Rows, Runtime
from layerexit.runtime.loop import check_online, early_exit, exit_step
from layerexit.serving import policies
from layerexit.serving.admission import Admission, Closed
from layerexit.strategies import State, Strategy, select_state

Scheduler = Literal["full", "batch", "pooled"]
SCHEDULERS: tuple[Scheduler, ...] = ("full", "batch", "pooled")
POLICIES: tuple[str, ...] = tuple(policies.POLICIES)
"""The ``pooled`` scheduler's policies by name, the default first."""


def as_ids(values: Sequence[int] | Tensor) -> Tensor:
    """Token ids as a (T,) long tensor."""
    return torch.as_tensor(values, dtype=torch.long)


@dataclass
class Answer:
    """One input's outcome."""

    label: int
    probs: Tensor  # (C,) of the exit it left at
    exit_layer: int
    latency_ms: float


@dataclass
class Request:
    """The inputs of one call to :meth:`Engine.submit`; ``future`` gets their answers, in order."""

    tokens: list[tuple[Tensor, Tensor | None]]  # per input: input_ids (T,), token_type_ids (T,) or None
    arrived: float = field(default_factory=time.perf_counter)
    future: Future[list[Answer]] = field(default_factory=Future)
    answers: list[Answer | None] = field(default_factory=list)
    remaining: int = 0
    cancelled: bool = False
    key: int = 0  # the request's number between processes (ProcessEngine)

    def __post_init__(self) -> None:
        self.answers = [None] * len(self.tokens)
        self.remaining = len(self.tokens)


@dataclass
class Group:
    """Rows waiting for the same stage, with their strategy state and their owners."""

    rows: Rows | None  # None before the embeddings
    state: State
    owners: list[tuple[Request, int]]  # (request, input index) per row
    since: float  # when the group entered its current queue

    @property
    def arrived(self) -> float:
        """When the oldest of its rows' requests arrived."""
        return min(r.arrived for r, _ in self.owners)

    def __len__(self) -> int:
        return len(self.owners)


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

    stats: Stats
    on_step: Callable[[int, int, float], None] | None

    @property
    def scheduler(self) -> str: ...

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

    def submit(self, tokens: Sequence[tuple[Sequence[int] | Tensor, Sequence[int] | Tensor | None]]) -> Request: ...

    def cancel(self, request: Request) -> None: ...

    def close(self, *, drain: bool = True, timeout: float | None = 30.0) -> None: ...


class Engine:
    """Owns ``runtime`` and a worker thread; ``submit`` is safe from any thread."""

    def __init__(
        self,
        runtime: Runtime,
        strategy: Strategy,
        *,
        scheduler: Scheduler = "pooled",
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
        if scheduler not in SCHEDULERS:
            raise LayerExitError(f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULERS)}")
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise LayerExitError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        check_online(strategy)
        self.runtime = runtime
        self.strategy = strategy
        self.scheduler = scheduler
        self.policy = policies.policy_named(policy)
        self.clock = clock
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.pad_id = pad_id
        self.threads = threads
        self.on_step = on_step
        self.stats = Stats(exits=[0] * (runtime.num_layers + 1), batch_rows=[[] for _ in range(runtime.num_layers + 1)])
        self._lock = threading.Condition()
        self.admission = Admission(max_queue)
        self._stop = False
        self._incoming: deque[Request] = deque()
        self._rows: deque[tuple[Request, int]] = deque()  # full / batch: inputs not yet in a batch
        self._queues: list[deque[Group]] = [deque() for _ in range(runtime.num_layers + 1)]
        self._worker = threading.Thread(target=self._run, name=f"layerexit-{scheduler}", daemon=True)
        self._started = start
        if start:
            self._worker.start()

    # ------------------------------------------------------------------ callers' side
    @property
    def queue_depth(self) -> int:
        return self.admission.depth

    @property
    def alive(self) -> bool:
        return not self._stop and (self._worker.is_alive() or not self._started)

    @property
    def ready(self) -> bool:
        return self.alive and self.admission.accepting

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
            self._incoming.append(request)
            self._lock.notify()
        return request

    def cancel(self, request: Request) -> None:
        """The caller went away: its rows are dropped at the next step that sees them."""
        request.cancelled = True
        with self._lock:
            self._lock.notify()

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
        self._worker.join(timeout)

    # ------------------------------------------------------------------ worker
    def step(self) -> None:
        """One step of the scheduler: what the worker thread repeats. Called directly only when the engine
        was made with ``start=False`` (a test that counts steps on a fake clock)."""
        if self.scheduler == "pooled":
            self._pooled_step()
        else:
            self._batch_step()

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        step = self.step
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._stop and not self._incoming and not self._rows and not any(self._queues):
                        self._lock.wait(0.05)
                    if self._stop:
                        self._fail_all(Closed("the server stopped"))
                        return
                try:
                    step()
                except Exception as err:  # a runtime failure answers the rows involved, never hangs them
                    self._fail_all(err)

    def _answer(self, request: Request, index: int, answer: Answer | None) -> None:
        """Record one input's answer (None: dropped); resolve the request when it is complete."""
        self.admission.release()
        if answer is not None:
            request.answers[index] = answer
            self.stats.answered += 1
            self.stats.exits[answer.exit_layer] += 1
        else:
            self.stats.cancelled_rows += 1
        request.remaining -= 1
        if request.remaining == 0 and not request.future.done():
            if request.cancelled:
                request.future.cancel()
            else:
                request.future.set_result([a for a in request.answers if a is not None])

    def _fail_all(self, err: BaseException) -> None:
        with self._lock:
            pending = list(self._incoming) + [r for r, _ in self._rows]
            self._incoming.clear()
            self._rows.clear()
            groups = [g for q in self._queues for g in q]
            for q in self._queues:
                q.clear()
        requests = {id(r): r for r in pending}
        requests.update({id(r): r for g in groups for r, _ in g.owners})
        for r in requests.values():
            left = r.remaining
            self.admission.release(left)
            r.remaining = 0
            if not r.future.done():
                r.future.set_exception(err)

    def _collate(self, owners: list[tuple[Request, int]]) -> tuple[Tensor, Tensor, Tensor | None]:
        """Right-padded input_ids, attention_mask and token_type_ids of the given inputs."""
        lengths = [int(r.tokens[i][0].numel()) for r, i in owners]
        width = max(lengths)
        ids = torch.full((len(owners), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(owners), width, dtype=torch.long)
        types = None if owners[0][0].tokens[owners[0][1]][1] is None else torch.zeros_like(ids)
        for row, ((request, index), n) in enumerate(zip(owners, lengths, strict=True)):
            ids[row, :n] = request.tokens[index][0]
            mask[row, :n] = 1
            token_types = request.tokens[index][1]
            if types is not None and token_types is not None:
                types[row, :n] = token_types
        return ids, mask, types

    def _step_done(self, stage: int, rows: int, started: float) -> None:
        seconds = self.clock() - started
        self.stats.record_step(stage, rows)
        if self.on_step is not None:
            self.on_step(stage, rows, seconds)

    # --- full / batch: classic dynamic batching
    def _take_batch(self) -> list[tuple[Request, int]]:
        """Wait until ``max_batch`` inputs are queued or the oldest has waited ``max_wait``; take them
        (a request larger than a batch continues in the next one)."""
        with self._lock:
            while True:
                while self._incoming:
                    request = self._incoming.popleft()
                    self._rows.extend((request, i) for i in range(len(request.tokens)))
                if not self._rows or self._stop:
                    return []
                waited = self.clock() - self._rows[0][0].arrived
                if len(self._rows) >= self.max_batch or waited >= self.max_wait or not self.admission.accepting:
                    break
                self._lock.wait(self.max_wait - waited)
            return [self._rows.popleft() for _ in range(min(self.max_batch, len(self._rows)))]

    def _batch_step(self) -> None:
        owners = []
        for request, index in self._take_batch():
            if request.cancelled:
                self._answer(request, index, None)
            else:
                owners.append((request, index))
        if not owners:
            return
        started = self.clock()
        ids, mask, types = self._collate(owners)
        if self.scheduler == "full":
            probs = self.runtime.full(ids, mask, types)  # (B, C)
            labels, layers = probs.argmax(-1), torch.full((len(owners),), self.runtime.num_layers)
        else:
            result = early_exit(self.runtime, self.strategy, ids, mask, types)
            probs, labels, layers = result.probs, result.prediction, result.exit_layer
        self._step_done(0, len(owners), started)
        done = self.clock()
        for row, (request, index) in enumerate(owners):
            latency = (done - request.arrived) * 1000
            self._answer(request, index, Answer(int(labels[row]), probs[row], int(layers[row]), latency))

    # --- pooled: rows pooled layer by layer across requests
    def _admit(self) -> None:
        with self._lock:
            while self._incoming:
                request = self._incoming.popleft()
                owners = [(request, i) for i in range(len(request.tokens))]
                self._queues[0].append(Group(None, {}, owners, request.arrived))

    def _pick(self) -> int | None:
        """The stage to run next (see the module docstring), or None when nothing waits."""
        return self.policy.pick(self._queues, self.clock(), self.max_wait)

    def _gather(self, stage: int) -> list[Group]:
        """Up to ``max_batch`` rows from the head of a queue, a group split if it does not fit (with the
        ``oldest`` policy the queue is first put in arrival order: its oldest row is always taken)."""
        self._queues[stage] = self.policy.order(self._queues[stage])
        queue, taken, size = self._queues[stage], [], 0
        while queue and size < self.max_batch:
            group = queue[0]
            room = self.max_batch - size
            if len(group) <= room:
                taken.append(queue.popleft())
                size += len(group)
                continue
            head, tail = self._split(group, room)
            queue[0] = tail
            taken.append(head)
            size += len(head)
        return taken

    def _split(self, group: Group, n: int) -> tuple[Group, Group]:
        first, rest = torch.arange(n), torch.arange(n, len(group))
        if group.rows is None:
            return (
                Group(None, {}, group.owners[:n], group.since),
                Group(None, {}, group.owners[n:], group.since),
            )
        return (
            Group(
                self.runtime.take(group.rows, first), select_state(group.state, first), group.owners[:n], group.since
            ),
            Group(self.runtime.take(group.rows, rest), select_state(group.state, rest), group.owners[n:], group.since),
        )

    def _drop_cancelled(self, group: Group) -> Group | None:
        keep = [i for i, (r, _) in enumerate(group.owners) if not r.cancelled]
        if len(keep) == len(group):
            return group
        for i, (r, index) in enumerate(group.owners):
            if i not in keep:
                self._answer(r, index, None)
        if not keep:
            return None
        rows = torch.tensor(keep)
        owners = [group.owners[i] for i in keep]
        if group.rows is None:
            return Group(None, {}, owners, group.since)
        return Group(self.runtime.take(group.rows, rows), select_state(group.state, rows), owners, group.since)

    def _pooled_step(self) -> None:
        self._admit()
        stage = self._pick()
        if stage is None:
            return
        groups = [g for g in (self._drop_cancelled(g) for g in self._gather(stage)) if g is not None]
        if not groups:
            return
        started = self.clock()
        owners = [o for g in groups for o in g.owners]
        if stage == 0:
            ids, mask, types = self._collate(owners)
            rows = self.runtime.embed(ids, mask, types)
            state = self.strategy.init(len(owners), self.runtime.num_labels, "cpu")
            self._step_done(0, len(owners), started)
            self._queues[1].append(Group(rows, state, owners, self.clock()))
            return
        rows = self.runtime.join([g.rows for g in groups if g.rows is not None])
        state = {k: torch.cat([g.state[k] for g in groups]) for k in groups[0].state}
        rows, probs, fire, prediction = exit_step(self.runtime, self.strategy, stage, rows, state)
        self._step_done(stage, len(owners), started)
        done = self.clock()
        leaving = fire.nonzero().squeeze(1).tolist()
        for row in leaving:
            request, index = owners[row]
            answer = Answer(int(prediction[row]), probs[row], stage, (done - request.arrived) * 1000)
            self._answer(request, index, answer)
        if len(leaving) < len(owners):
            kept = (~fire).nonzero().squeeze(1).tolist()
            if self.policy.arrival_order:  # rows in arrival order: splitting a group keeps its oldest rows
                kept.sort(key=lambda i: owners[i][0].arrived)
            keep = torch.tensor(kept, dtype=torch.long)
            rest = Group(self.runtime.take(rows, keep), select_state(state, keep), [owners[i] for i in kept], done)
            self._queues[stage + 1].append(rest)
