"""The schedulers as plain state, on a fake clock with no thread and no model: each policy's choice on
hand-built queues; the pooled scheduler driven step by step with a fake model, counting steps from each
request's arrival to its answer against the bound the engine's docstring proves; dynamic batching's wait;
cancelling."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

from layerexit.errors import LayerExitError
from layerexit.serving.engine import POLICIES
from layerexit.serving.policies import Deepest, Fullest, Oldest, Policy, policy_named
from layerexit.serving.scheduler import (
    BatchScheduler,
    FullScheduler,
    Outcome,
    PooledScheduler,
    Request,
    Step,
    scheduler_named,
)


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


def _request(inputs: int = 1, arrived: float = 0.0) -> Request:
    return Request([(torch.tensor([5, 6, 7]), None)] * inputs, arrived=arrived)


def _exit_layer(row: int, layers: int) -> int:
    """A fake model: row ``row`` exits at a layer fixed by its id (1..layers)."""
    return 1 + (row * 7919) % layers


def _fake_run(step: Step, layers: int, labels: int = 3) -> Outcome:
    """What a runner would report: rows leave at their fixed layer (every row at once for ``full``)."""
    if step.kind == "embed":
        left: list[int] = []
    elif step.kind == "layer":
        left = [r for r in step.rows if _exit_layer(r, layers) <= step.stage]
    else:
        left = list(step.rows)
    went_on = [r for r in step.rows if r not in left] if step.kind in ("embed", "layer") else []
    layer = [layers if step.kind == "full" else _exit_layer(r, layers) for r in left]
    probs = torch.full((len(left), labels), 1 / labels)
    labels_ = torch.zeros(len(left), dtype=torch.long)
    return Outcome(left, labels_, probs, torch.tensor(layer, dtype=torch.long), went_on)


def _drive(policy: str | Policy, arrivals: list[int], max_queue: int, step_seconds: float = 1.0, max_wait: float = 3.0):  # type: ignore[no-untyped-def]
    """Run the pooled scheduler alone on a fake clock, with a fake model of 4 layers: ``arrivals[k]``
    single-input requests arrive before step k (as many as fit in ``max_queue`` rows), one step costs
    ``step_seconds``. Returns (per request: steps from arrival to answer, fake seconds from arrival to
    answer), the stages run, and the number of layers."""
    layers = 4
    clock = FakeClock()
    scheduler = PooledScheduler(num_layers=layers, policy=policy, max_batch=4, max_wait=max_wait, clock=clock)
    stages_run: list[int] = []
    arrived_at: dict[int, int] = {}
    answered: list[tuple[int, float]] = []
    step = 0
    while step < len(arrivals) or scheduler.rows:
        for _ in range(arrivals[step] if step < len(arrivals) else 0):
            if len(scheduler.rows) < max_queue:
                request = _request(arrived=clock.now)
                arrived_at[id(request)] = step
                scheduler.add(request)
        planned = scheduler.schedule()
        if planned is not None:
            assert len(planned.rows) <= 4
            stages_run.append(planned.stage)
            clock.now += step_seconds
            for done in scheduler.update(planned, _fake_run(planned, layers)):
                assert done.answer is not None and done.answer.exit_layer == _exit_layer(done.row, layers)
                answered.append((step + 1 - arrived_at[id(done.request)], done.answer.latency_ms / 1000))
        else:
            clock.now += step_seconds
        step += 1
        assert step < 10_000, "the scheduler stopped making progress"
    return answered, stages_run, layers


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


@pytest.mark.parametrize("cls", [FullScheduler, BatchScheduler])
def test_dynamic_batches_wait_for_max_batch_or_max_wait(cls: type[FullScheduler]) -> None:
    clock = FakeClock()
    scheduler = cls(num_layers=4, max_batch=3, max_wait=2.0, clock=clock)
    scheduler.add(_request(2, arrived=0.0))
    assert scheduler.schedule() is None and scheduler.next_ready() == 2.0  # 2 rows, nobody overdue
    flushed = scheduler.schedule(flush=True)  # draining: no waiting to fill a batch
    assert flushed is not None and flushed.rows == [0, 1] and flushed.kind == cls.kind
    scheduler.update(flushed, _fake_run(flushed, 4))
    scheduler.add(_request(2, arrived=0.0))
    scheduler.add(_request(2, arrived=0.5))  # 4 rows: a full batch of 3, one left over
    full = scheduler.schedule()
    assert full is not None and full.rows == [2, 3, 4] and len(full.inputs) == 3
    assert scheduler.schedule() is None and scheduler.waiting == 1
    clock.now = 2.5  # the leftover row's request arrived at 0.5: overdue
    late = scheduler.schedule()
    assert late is not None and late.rows == [5]
    finished = scheduler.update(full, _fake_run(full, 4)) + scheduler.update(late, _fake_run(late, 4))
    assert [(f.row, f.index) for f in finished] == [(2, 0), (3, 1), (4, 0), (5, 1)]
    assert finished[0].answer is not None and finished[0].answer.latency_ms == 2500.0
    assert not scheduler.rows and scheduler.next_ready() is None


def test_pooled_splits_a_group_that_does_not_fit() -> None:
    scheduler = PooledScheduler(num_layers=2, max_batch=3, clock=FakeClock())
    scheduler.add(_request(5))
    first = scheduler.schedule()
    assert first is not None and first.kind == "embed" and first.rows == [0, 1, 2]
    scheduler.update(first, _fake_run(first, 2))
    second = scheduler.schedule()  # deepest: the wave at layer 1 goes before the two rows left unembedded
    assert second is not None and (second.kind, second.stage, second.rows, second.inputs) == ("layer", 1, [0, 1, 2], [])
    assert scheduler.waiting == 2


def test_cancel_drops_waiting_rows_now_and_running_rows_after_their_step() -> None:
    scheduler = PooledScheduler(num_layers=4, max_batch=2, clock=FakeClock())
    keep, gone = _request(2), _request(3)
    scheduler.add(keep)
    scheduler.add(gone)
    running = scheduler.schedule()
    assert running is not None and running.rows == [0, 1]
    gone.cancelled = True
    dropped = scheduler.cancel(gone)
    assert sorted(f.row for f in dropped) == [2, 3, 4] and all(f.answer is None for f in dropped)
    assert scheduler.waiting == 0
    outcome = Outcome([0], torch.tensor([1]), torch.tensor([[0.1, 0.9]]), torch.tensor([0]), [1])
    keep.cancelled = True  # cancelled while its rows ran: the row that left and the row that went on are dropped
    finished = scheduler.update(running, outcome)
    assert [(f.row, f.answer) for f in finished] == [(0, None), (1, None)] and not scheduler.rows


def test_abort_returns_every_request_held() -> None:
    scheduler = PooledScheduler(num_layers=4, max_batch=2, clock=FakeClock())
    a, b = _request(2), _request(1)
    scheduler.add(a)
    scheduler.add(b)
    assert scheduler.schedule() is not None  # a's rows are in a step
    assert {id(r) for r in scheduler.abort()} == {id(a), id(b)}
    assert not scheduler.rows and scheduler.waiting == 0 and scheduler.schedule() is None


def test_schedulers_by_name() -> None:
    assert isinstance(scheduler_named("batch", num_layers=2), BatchScheduler)
    assert isinstance(scheduler_named("pooled", num_layers=2, policy="oldest").policy, Oldest)  # type: ignore[attr-defined]
    with pytest.raises(LayerExitError, match="unknown scheduler 'stream'; expected one of full, batch, pooled"):
        scheduler_named("stream", num_layers=2)
    with pytest.raises(LayerExitError, match="unknown policy"):
        scheduler_named("full", num_layers=2, policy="newest")
