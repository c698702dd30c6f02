"""The serving engine in a process of its own, behind the same interface (:class:`ProcessEngine`).

**Why.** In one process the HTTP side (uvicorn's event loop: parsing, JSON, tokenisation) and the
engine's worker thread share one GIL. PyTorch lets go of the GIL around every operator and must take it
back after, and a layer is dozens of small operators. While the event loop holds the GIL, CPython hands
it to a waiting thread only every ``sys.getswitchinterval()`` (5 ms): the worker stalls at almost every
operator (the "convoy effect"; ``benchmarks/gil_convoy.py`` times it, docs/serve.md gives the figures).
ONNX Runtime takes the GIL back once per layer, so there a thread of the server serves
better (``layerexit serve --engine auto``). With the engine in a process of its own, each side has its
own GIL; the HTTP process only sends token ids and receives answers.

**The protocol**, pickled tuples over one duplex pipe:

* parent to child: ``("submit", key, [(input_ids, token_type_ids or None), ...])`` (lists of ints),
  ``("cancel", key)``, ``("close", drain)``;
* child to parent: ``("ready", info)`` once the engine is built, or ``("failed", message)``; then per
  request ``("answers", key, [(label, probs, exit_layer, latency_ms), ...], steps)``, ``("cancelled",
  key, exit layers of the rows answered before the cancel, steps)`` or ``("error", key, kind, message,
  steps)``; finally ``("closed", steps)``. ``steps`` are the engine's ``(stage, rows, seconds)`` since the
  last message, for ``/metrics``.

The parent admits inputs itself (``max_queue``: 503 without a round trip), so the child's queue never
refuses. The child ignores SIGINT and SIGTERM: the parent decides when to stop (it drains the child on
shutdown), and the child stops when its pipe closes, so it never outlives the parent. If the child dies,
every pending request fails with :class:`Closed` (503) and so does every later one.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch import Tensor

from layerexit.errors import LayerExitError
from layerexit.serving.admission import Admission, Closed, Overloaded
from layerexit.serving.engine import Answer, Engine, Request, Stats

Factory = Callable[[], tuple[Engine, dict[str, Any]]]
"""Builds the engine in the child and says what the parent should know (``info``: at least
``scheduler``, ``num_layers``, ``runtime`` and ``strategy``). It must pickle: a module-level function or
a ``functools.partial`` of one."""

Step = tuple[int, int, float]


def _as_list(values: Sequence[int] | Tensor) -> list[int]:
    return values.tolist() if isinstance(values, Tensor) else list(values)


class ProcessEngine:
    """An :class:`Engine` in a child process (``spawn``): ``submit``, ``cancel``, ``close``,
    ``queue_depth``, ``stats`` and ``on_step`` as the engine has them."""

    def __init__(self, factory: Factory, *, max_queue: int, start_timeout: float = 300.0) -> None:
        """Starts the child and waits until its engine is built (a :class:`LayerExitError` if it cannot
        be, with the child's message)."""
        if max_queue < 1:
            raise LayerExitError("max_queue must be >= 1")
        context = multiprocessing.get_context("spawn")
        self._conn, child_end = context.Pipe()
        self.process = context.Process(target=_child, args=(child_end, factory), name="layerexit-engine", daemon=True)
        self.process.start()
        child_end.close()
        try:
            if not self._conn.poll(start_timeout):
                raise LayerExitError(f"the engine process did not start within {start_timeout:.0f} s")
            message = self._conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            raise LayerExitError(
                f"the engine process exited (code {self.process.exitcode}) before it was ready"
            ) from None
        except LayerExitError:
            self.process.kill()
            raise
        if message[0] == "failed":
            self.process.join(5)
            raise LayerExitError(message[1])
        self.info: dict[str, Any] = message[1]
        self.scheduler_name: str = self.info["scheduler"]
        layers = int(self.info["num_layers"])
        self.stats = Stats(exits=[0] * (layers + 1), batch_rows=[[] for _ in range(layers + 1)])
        self.on_step: Callable[[int, int, float], None] | None = None
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._pending: dict[int, Request] = {}
        self._next_key = 0
        self.admission = Admission(max_queue)
        self._stopped = threading.Event()
        self._reader = threading.Thread(target=self._read, name="layerexit-engine-reader", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ callers' side
    @property
    def queue_depth(self) -> int:
        return self.admission.depth

    @property
    def alive(self) -> bool:
        return not self._stopped.is_set() and self.process.is_alive()

    @property
    def ready(self) -> bool:
        return self.alive and self.admission.accepting

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def status(self) -> str:
        code = self.process.exitcode
        return "the engine stopped" if code is None else f"the engine process exited (code {code})"

    def submit(self, tokens: Sequence[tuple[Sequence[int] | Tensor, Sequence[int] | Tensor | None]]) -> Request:
        """As :meth:`Engine.submit`: :class:`Overloaded` beyond ``max_queue`` inputs, :class:`Closed` when
        draining or when the engine process is gone."""
        if not tokens:
            raise LayerExitError("a request needs at least one input")
        payload = [(_as_list(ids), None if types is None else _as_list(types)) for ids, types in tokens]
        request = Request([])  # the tokens travel to the child; here only the answers are kept
        request.answers, request.remaining = [None] * len(payload), len(payload)
        if self._stopped.is_set():
            raise Closed("the engine stopped")
        self.admission.admit(len(payload))
        with self._lock:
            request.key, self._next_key = self._next_key, self._next_key + 1
            self._pending[request.key] = request
        if not self._send(("submit", request.key, payload)):
            self._finish(request.key, error=Closed("the engine stopped"))
        return request

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self._lock:
            mine = self._pending.get(request.key) is request  # not another engine's request of the same key
        if mine:
            self._send(("cancel", request.key))

    def close(self, *, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop taking inputs; with ``drain`` the child answers everything accepted first; then it exits."""
        self.admission.close()
        self._send(("close", drain))
        self._stopped.wait(timeout)
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()

    # ------------------------------------------------------------------ the pipe
    def _send(self, message: tuple[Any, ...]) -> bool:
        try:
            with self._send_lock:
                self._conn.send(message)
            return True
        except (OSError, ValueError):  # the child is gone (or the pipe closed)
            return False

    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                kind, steps = message[0], message[-1]
                self._record(steps)
                if kind == "answers":
                    answers = [Answer(label, torch.tensor(probs), layer, ms) for label, probs, layer, ms in message[2]]
                    self._finish(message[1], answers=answers)
                elif kind == "cancelled":
                    self._finish(message[1], cancelled=message[2])
                elif kind == "error":
                    error: Exception = {"overloaded": Overloaded, "closed": Closed}.get(message[2], LayerExitError)(
                        message[3]
                    )
                    self._finish(message[1], error=error)
                elif kind == "closed":
                    break
        except (EOFError, OSError):
            pass
        finally:
            self._stopped.set()
            for key in list(self._pending):
                self._finish(key, error=Closed("the engine process stopped"))

    def _record(self, steps: list[Step]) -> None:
        for stage, rows, seconds in steps:
            self.stats.record_step(stage, rows)
            if self.on_step is not None:
                self.on_step(stage, rows, seconds)

    def _finish(
        self,
        key: int,
        *,
        answers: list[Answer] | None = None,
        cancelled: list[int] | None = None,
        error: Exception | None = None,
    ) -> None:
        with self._lock:
            request = self._pending.pop(key, None)
            if request is None:
                return
            self.admission.release(request.remaining)
        rows, request.remaining = request.remaining, 0
        layers = [a.exit_layer for a in answers] if answers is not None else cancelled or []
        for layer in layers:
            self.stats.answered += 1
            self.stats.exits[layer] += 1
        if cancelled is not None:
            self.stats.cancelled_rows += rows - len(cancelled)
            request.future.cancel()
        elif error is not None:
            request.future.set_exception(error)
        elif answers is not None:
            request.answers = list(answers)
            request.future.set_result(answers)


def _child(conn: Connection, factory: Factory) -> None:
    """The engine process: build the engine, then serve the pipe until told to close (or it closes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine, info = factory()
    except Exception as err:  # said to the parent, which raises it where the server is started
        conn.send(("failed", str(err) if isinstance(err, LayerExitError) else f"{type(err).__name__}: {err}"))
        conn.close()
        return
    lock = threading.Lock()
    steps: list[Step] = []

    def on_step(stage: int, rows: int, seconds: float) -> None:
        with lock:
            steps.append((stage, rows, seconds))

    def send(*message: Any) -> None:
        with lock:
            taken = steps[:]
            steps.clear()
            with contextlib.suppress(OSError, ValueError):  # the parent is gone: the main loop sees it and stops
                conn.send((*message, taken))

    def done(key: int, request: Request, future: Future[list[Answer]]) -> None:
        if future.cancelled():
            send("cancelled", key, [a.exit_layer for a in request.answers if a is not None])
            return
        error = future.exception()
        if error is not None:
            send("error", key, _kind(error), str(error))
            return
        send("answers", key, [(a.label, a.probs.tolist(), a.exit_layer, a.latency_ms) for a in future.result()])

    engine.on_step = on_step
    conn.send(("ready", info))
    requests: dict[int, Request] = {}
    drain = True
    try:
        while True:
            message = conn.recv()
            if message[0] == "submit":
                key = message[1]
                try:
                    request = engine.submit(message[2])
                except (Overloaded, Closed, LayerExitError) as err:
                    send("error", key, _kind(err), str(err))
                    continue
                requests[key] = request
                request.future.add_done_callback(partial(_forget, requests, key))
                request.future.add_done_callback(partial(done, key, request))
            elif message[0] == "cancel" and message[1] in requests:
                engine.cancel(requests[message[1]])
            elif message[0] == "close":
                drain = bool(message[1])
                break
    except (EOFError, OSError):
        drain = False  # the parent is gone: nobody waits for answers
    engine.close(drain=drain)
    send("closed")
    conn.close()


def _kind(error: BaseException) -> str:
    return "overloaded" if isinstance(error, Overloaded) else "closed" if isinstance(error, Closed) else "failed"


def _forget(requests: dict[int, Request], key: int, _: Future[list[Answer]]) -> None:
    requests.pop(key, None)
