"""A watched engine: noticed when it dies or stops making progress, restarted with a back-off, given up on
after a bounded number of tries (the server then exits non-zero so that its own supervisor restarts it).

:class:`Supervisor` is an :class:`~layerexit.serving.engine.EngineHandle` around whichever engine ``start``
builds (in a thread or in a process of its own). A watcher thread checks it every ``check_s``:

* **died**: the engine's worker (thread or process) is gone. The engine has already failed its pending
  requests (a process engine's reader sees the pipe close), so their clients get 503 at once;
* **stalled**: inputs wait but no step has finished for ``stall_s`` seconds. The engine is stopped
  without draining (a process is killed), which fails its pending requests with 503.

Then, while ``restarting``, ``/healthz`` and ``/readyz`` answer 503 and new requests 503 with
``Retry-After``; the watcher starts a new engine after ``backoff_s``, doubling the wait after each
failed try. Tries count from the last failure of an engine that ran for less than ``healthy_s``, so an
engine that keeps dying soon after its start uses up ``max_restarts`` and the supervisor gives up
(``on_give_up``). ``on_event(name)`` is told of each ``died``, ``stalled``, ``start_failed`` and
``restarted`` (the server counts them as Prometheus metrics).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Literal

from torch import Tensor

from layerexit.errors import LayerExitError
from layerexit.serving.admission import Closed
from layerexit.serving.engine import EngineHandle, Request, Stats

State = Literal["running", "restarting", "failed", "closed"]
EVENTS = ("died", "stalled", "start_failed", "restarted")


class Supervisor:
    """An engine, watched and restarted; the same interface as the engine."""

    def __init__(
        self,
        start: Callable[[], EngineHandle],
        *,
        max_restarts: int = 3,
        backoff_s: float = 0.5,
        stall_s: float = 30.0,
        healthy_s: float = 60.0,
        check_s: float = 0.1,
        on_give_up: Callable[[str], None] | None = None,
    ) -> None:
        """``start`` builds a new engine (the first one here: an error in it is raised to the caller)."""
        if max_restarts < 0 or backoff_s < 0 or stall_s <= 0:
            raise LayerExitError("max_restarts and backoff_s must be >= 0 and stall_s > 0")
        self._start = start
        self.max_restarts = max_restarts
        self.backoff_s = backoff_s
        self.stall_s = stall_s
        self.healthy_s = healthy_s
        self.check_s = check_s
        self.on_give_up = on_give_up
        self.on_event: Callable[[str], None] | None = None
        self._on_step: Callable[[int, int, float], None] | None = None
        self.events: dict[str, int] = dict.fromkeys(EVENTS, 0)
        self.state: State = "running"
        self.reason = ""
        self.last_error = ""
        self.waits: list[float] = []  # seconds waited before each restart try
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.engine = start()
        self._started_at = time.monotonic()
        self._tries = 0  # restarts since the last engine that ran for healthy_s
        self._watcher = threading.Thread(target=self._watch, name="layerexit-supervisor", daemon=True)
        self._watcher.start()

    # ------------------------------------------------------------------ the engine's interface
    @property
    def on_step(self) -> Callable[[int, int, float], None] | None:
        return self._on_step

    @on_step.setter
    def on_step(self, callback: Callable[[int, int, float], None] | None) -> None:
        self._on_step = callback
        self.engine.on_step = callback

    @property
    def stats(self) -> Stats:
        return self.engine.stats

    @property
    def scheduler_name(self) -> str:
        return self.engine.scheduler_name

    @property
    def queue_depth(self) -> int:
        return self.engine.queue_depth if self.state == "running" else 0

    @property
    def alive(self) -> bool:
        return self.state == "running" and self.engine.alive

    @property
    def ready(self) -> bool:
        return self.alive and self.engine.ready

    @property
    def pid(self) -> int | None:
        return self.engine.pid

    @property
    def status(self) -> str:
        """What ``/healthz`` and ``/readyz`` say when the engine cannot answer."""
        if self.state == "restarting":
            return f"the engine {self.reason}; restarting (try {max(self._tries, 1)} of {self.max_restarts})"
        if self.state == "failed":
            last = f" (last try: {self.last_error})" if self.last_error else ""
            return f"the engine {self.reason} and could not be restarted{last}"
        return self.engine.status

    def submit(self, tokens: Sequence[tuple[Sequence[int] | Tensor, Sequence[int] | Tensor | None]]) -> Request:
        if self.state != "running":
            raise Closed(self.status)
        return self.engine.submit(tokens)

    def cancel(self, request: Request) -> None:
        self.engine.cancel(request)

    def close(self, *, drain: bool = True, timeout: float | None = 30.0) -> None:
        with self._lock:
            self.state = "closed"
            self._closing.set()
        self._watcher.join(timeout)
        self.engine.close(drain=drain, timeout=timeout)

    # ------------------------------------------------------------------ the watcher
    def _event(self, name: str) -> None:
        self.events[name] += 1
        if self.on_event is not None:
            self.on_event(name)

    def _watch(self) -> None:
        steps, progress = self.engine.stats.steps, time.monotonic()
        while not self._closing.wait(self.check_s):
            engine, now = self.engine, time.monotonic()
            if engine.stats.steps != steps or engine.queue_depth == 0:
                steps, progress = engine.stats.steps, now
            if engine.alive and now - progress <= self.stall_s:
                continue
            reason = "died" if not engine.alive else "stalled"
            with self._lock:
                if self._closing.is_set():
                    return
                self.state, self.reason = "restarting", reason
            self._event(reason)
            engine.close(drain=False, timeout=5.0)  # a stalled engine's requests fail now, with 503
            if now - self._started_at >= self.healthy_s:
                self._tries = 0
            if not self._restart():
                return
            steps, progress = self.engine.stats.steps, time.monotonic()

    def _restart(self) -> bool:
        """Start a new engine, waiting ``backoff_s``, then twice as long after each failed try; give up
        after ``max_restarts`` tries in a row."""
        while self._tries < self.max_restarts:
            wait = self.backoff_s * 2**self._tries
            self._tries += 1
            self.waits.append(wait)
            if self._closing.wait(wait):
                return False
            try:
                engine = self._start()
            except Exception as err:  # counted and tried again; the last one is said on giving up
                self._event("start_failed")
                self.last_error = f"{type(err).__name__}: {err}"
                continue
            engine.on_step = self._on_step
            with self._lock:
                if self._closing.is_set():  # closed while starting: nobody will use it
                    engine.close(drain=False, timeout=5.0)
                    return False
                self.engine, self.state, self._started_at = engine, "running", time.monotonic()
            self._event("restarted")
            return True
        with self._lock:
            self.state = "failed"
        if self.on_give_up is not None:
            self.on_give_up(self.status)
        return False
