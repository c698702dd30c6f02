"""The pooled scheduler's policies and their waiting bounds, on a fake clock with no thread: each policy's
choice on hand-built queues, then the engine driven step by step (``Engine(start=False)``), counting steps
from each request's arrival to its answer against the bound the engine's docstring proves."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

from layerexit import strategies
from layerexit.errors import LayerExitError
from layerexit.runtime.torch_runtime import TorchRuntime
from layerexit.serving.engine import POLICIES, Engine, Request
from layerexit.serving.policies import Deepest, Fullest, Oldest, Policy, policy_named

from .conftest import tiny_model
from .test_model import _peaked


@dataclass
class Waiting:
    arrived: float
    since: float
    rows: int

    def __len__(self) -> int:
        return self.rows


def test_each_policy_picks_its_stage() -> None:
    queues = [
        [Waiting(arrived=5.0, since=5.0, rows=1)],  # embeddings: the newest request
        [],
        [Waiting(arrived=1.0, since=4.0, rows=2), Waiting(arrived=3.0, since=4.5, rows=4)],  # the fullest
        [Waiting(arrived=2.0, since=4.8, rows=1)],  # the deepest
    ]
    assert Deepest().pick(queues, now=5.0, max_wait=10.0) == 3
    assert Oldest().pick(queues, now=5.0, max_wait=10.0) == 2  # the request that arrived first waits there
    assert Fullest().pick(queues, now=5.0, max_wait=10.0) == 2  # 6 rows
    queues[3][0].since = 0.5  # waited 4.5 s in its queue: overdue
    assert Fullest().pick(queues, now=5.0, max_wait=3.0) == 3
    assert Fullest().pick([[Waiting(0, 0, 2)], [Waiting(0, 0, 2)]], now=0.0, max_wait=1.0) == 1  # ties: deeper
    for policy in (Deepest(), Fullest(), Oldest()):
        assert policy.pick([[], [], []], now=0.0, max_wait=1.0) is None


def test_policies_by_name() -> None:
    assert POLICIES[0] == "deepest" and set(POLICIES) == {"deepest", "fullest", "oldest"}
    assert isinstance(policy_named("oldest"), Oldest)
    with pytest.raises(LayerExitError, match="unknown policy 'newest'; expected one of deepest, fullest, oldest"):
        policy_named("newest")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _inputs(seed: int) -> list[tuple[torch.Tensor, None]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(5, 90, (int(torch.randint(2, 14, (1,), generator=g)),), generator=g), None)]


def _drive(policy: str | Policy, arrivals: list[int], max_queue: int, step_seconds: float = 1.0, max_wait: float = 3.0):  # type: ignore[no-untyped-def]
    """Run the pooled engine on a fake clock: ``arrivals[k]`` single-input requests arrive before step k (as
    many as fit in ``max_queue``), one step costs ``step_seconds``. Returns (per request: steps from arrival
    to answer, fake seconds from arrival to answer), the stages run, and the number of layers."""
    model = _peaked(tiny_model("bert", num_labels=3))
    clock = FakeClock()
    stages_run: list[int] = []
    engine = Engine(
        TorchRuntime(model),
        strategies.Entropy(threshold=0.5),
        scheduler="pooled",
        policy=policy,
        max_batch=4,
        max_wait_ms=max_wait * 1000,
        max_queue=max_queue,
        clock=clock,
        start=False,
        on_step=lambda stage, rows, seconds: stages_run.append(stage),
    )
    pending: list[tuple[Request, int]] = []
    answered: list[tuple[int, float]] = []
    seed = itertools.count()
    step = 0
    with torch.inference_mode():
        while step < len(arrivals) or pending:
            for _ in range(arrivals[step] if step < len(arrivals) else 0):
                if engine.queue_depth < max_queue:
                    pending.append((engine.submit(_inputs(next(seed))), step))
            engine.step()
            step += 1
            clock.now += step_seconds
            for request, arrived_step in [p for p in pending if p[0].future.done()]:
                (answer,) = request.future.result()
                answered.append((step - arrived_step, answer.latency_ms / 1000))
            pending = [p for p in pending if not p[0].future.done()]
            assert step < 10_000, "the engine stopped making progress"
    return answered, stages_run, model.num_layers


@pytest.mark.parametrize("policy", ["deepest", "oldest"])
@pytest.mark.parametrize("pattern", ["burst", "steady"])
def test_deepest_and_oldest_answer_within_max_queue_times_stages_steps(policy: str, pattern: str) -> None:
    max_queue = 12
    arrivals = [40] if pattern == "burst" else [1] * 200  # steady: a new request before every step
    answered, stages_run, layers = _drive(policy, arrivals, max_queue)
    assert len(answered) >= (max_queue if pattern == "burst" else 150)
    assert max(steps for steps, _ in answered) <= max_queue * (layers + 1)
    if policy == "deepest":  # a wave runs through before the next is embedded
        assert all(stage == 0 or before == stage - 1 for before, stage in itertools.pairwise(stages_run))


@pytest.mark.parametrize("pattern", ["burst", "steady"])
def test_fullest_answers_within_its_time_bound(pattern: str) -> None:
    max_queue, max_wait, step_seconds = 12, 3.0, 1.0
    arrivals = [40] if pattern == "burst" else [1] * 200
    answered, _, layers = _drive("fullest", arrivals, max_queue, step_seconds, max_wait)
    bound = (layers + 1) * (max_wait + max_queue * step_seconds)
    assert max(seconds for _, seconds in answered) <= bound


class Shallowest(Policy):
    """Not a policy to use: the shallowest stage where rows wait, so new arrivals always go first."""

    name = "shallowest"

    def pick(self, queues, now, max_wait):  # type: ignore[no-untyped-def]
        return next((stage for stage, queue in enumerate(queues) if queue), None)


def test_the_bound_can_fail() -> None:
    """The step count is not vacuous: serving new arrivals first starves rows under steady traffic."""
    answered, _, layers = _drive(Shallowest(), [1] * 200, max_queue=12)
    assert max(steps for steps, _ in answered) > 12 * (layers + 1)


def test_admission_holds_at_most_max_queue_and_refuses_after_close() -> None:
    from layerexit.serving.admission import Admission, Closed, Overloaded

    admission = Admission(max_queue=5)
    admission.admit(3)
    with pytest.raises(Overloaded, match="3 inputs queued; the limit is 5"):
        admission.admit(3)  # refused whole: none of the three is held
    admission.admit(2)
    assert admission.depth == 5
    admission.release(4)
    admission.close()
    with pytest.raises(Closed, match="shutting down"):
        admission.admit(1)
    assert admission.depth == 1 and not admission.accepting
