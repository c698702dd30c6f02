"""How the ``pooled`` scheduler picks the stage it runs next: one small class per policy.

A policy sees the queues of waiting groups per stage (stage 0: the embeddings, stage i: layer i) and
the time now, and names the stage to run. It holds no rows, runs nothing and reads no clock of its
own, so its choice is tested on hand-built queues and a fake clock (``tests/test_scheduler.py``).
Adding a policy: a subclass here, its entry in :data:`POLICIES`, its test. The waiting bound each
policy gives is proved in :mod:`layerexit.serving.engine`'s docstring.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from typing import ClassVar, Protocol, TypeVar

from layerexit.errors import LayerExitError


class Waiting(Protocol):
    """What a policy reads of a group of rows waiting for a stage."""

    @property
    def arrived(self) -> float:
        """When the oldest of its rows' requests arrived."""
        ...

    since: float
    """When the group entered its current queue."""

    def __len__(self) -> int: ...


W = TypeVar("W", bound=Waiting)


class Policy(ABC):
    """Picks the next stage of the ``pooled`` scheduler."""

    name: ClassVar[str]
    arrival_order: ClassVar[bool] = False
    """Keep each queue, and the rows that go on from a step, in the order their requests arrived."""

    @abstractmethod
    def pick(self, queues: Sequence[Sequence[Waiting]], now: float, max_wait: float) -> int | None:
        """The stage to run next, or ``None`` when no row waits."""

    def order(self, queue: deque[W]) -> deque[W]:
        """The queue of a stage, in the order its groups are taken."""
        return deque(sorted(queue, key=lambda g: g.arrived)) if self.arrival_order else queue


def _waiting(queues: Sequence[Sequence[Waiting]]) -> list[tuple[int, Sequence[Waiting]]]:
    return [(stage, queue) for stage, queue in enumerate(queues) if queue]


class Deepest(Policy):
    """The deepest stage where rows wait: a wave runs through before the next one is embedded."""

    name = "deepest"

    def pick(self, queues: Sequence[Sequence[Waiting]], now: float, max_wait: float) -> int | None:
        waiting = _waiting(queues)
        return waiting[-1][0] if waiting else None


class Fullest(Policy):
    """The stage with the most rows waiting (ties to the deeper), unless a row has waited longer than
    ``max_wait`` in its queue: then the stage of the row that has waited longest."""

    name = "fullest"

    def pick(self, queues: Sequence[Sequence[Waiting]], now: float, max_wait: float) -> int | None:
        waiting = _waiting(queues)
        if not waiting:
            return None
        stage, oldest = min(((i, q[0].since) for i, q in waiting), key=lambda t: t[1])
        if now - oldest > max_wait:
            return stage
        return max(waiting, key=lambda t: (sum(len(g) for g in t[1]), t[0]))[0]


class Oldest(Policy):
    """The stage where the row whose request arrived first waits (ties to the deeper stage)."""

    name = "oldest"
    arrival_order = True

    def pick(self, queues: Sequence[Sequence[Waiting]], now: float, max_wait: float) -> int | None:
        waiting = _waiting(queues)
        if not waiting:
            return None
        return min(waiting, key=lambda t: (min(g.arrived for g in t[1]), -t[0]))[0]


POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (Deepest, Fullest, Oldest)}
"""Every policy by name, the default first."""


def policy_named(name: str | Policy) -> Policy:
    """The policy called ``name`` (a policy object is returned as it is)."""
    if isinstance(name, Policy):
        return name
    if name not in POLICIES:
        raise LayerExitError(f"unknown policy {name!r}; expected one of {', '.join(POLICIES)}")
    return POLICIES[name]()
