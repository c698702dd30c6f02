"""Admission: the bounded queue in front of an engine, one object for the engine in a thread of the server
and for the engine in a process of its own.

At most ``max_queue`` inputs are held (accepted and not yet answered or dropped); a request that does not
fit is refused whole with :class:`Overloaded` (the HTTP app answers 503 with ``Retry-After``), and once
:meth:`Admission.close` is called every new request is refused with :class:`Closed` while the accepted
ones drain.
"""

from __future__ import annotations

import threading


class Overloaded(Exception):
    """The engine holds ``max_queue`` inputs already: the caller should answer 503 and retry later."""


class Closed(Exception):
    """The engine is draining or stopped and takes no new inputs."""


class Admission:
    """Counts the inputs held; safe from any thread."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._held = 0
        self._accepting = True
        self._lock = threading.Lock()

    @property
    def depth(self) -> int:
        """Inputs accepted and not yet answered or dropped."""
        return self._held

    @property
    def accepting(self) -> bool:
        return self._accepting

    def admit(self, inputs: int) -> None:
        """Hold ``inputs`` more, or refuse them all: :class:`Closed` after :meth:`close`, :class:`Overloaded`
        when they do not fit."""
        with self._lock:
            if not self._accepting:
                raise Closed("the server is shutting down")
            if self._held + inputs > self.max_queue:
                raise Overloaded(f"{self._held} inputs queued; the limit is {self.max_queue}")
            self._held += inputs

    def release(self, inputs: int = 1) -> None:
        """``inputs`` held ones were answered or dropped."""
        with self._lock:
            self._held -= inputs

    def close(self) -> None:
        """Refuse every new request from now on."""
        with self._lock:
            self._accepting = False
