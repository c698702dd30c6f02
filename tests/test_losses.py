"""Each loss against a plain Python loop over exits, samples and classes."""

from __future__ import annotations

import math

import pytest
import torch

from layerexit import losses


def _ce(pred_logits: list[float], target: list[float]) -> float:
    z = max(pred_logits)
    log_norm = z + math.log(sum(math.exp(v - z) for v in pred_logits))
    return -sum(t * (v - log_norm) for t, v in zip(target, pred_logits, strict=True))


def _softmax(v: list[float]) -> list[float]:
    z = max(v)
    e = [math.exp(x - z) for x in v]
    return [x / sum(e) for x in e]


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(0)) * 2  # (L, B, C)


@pytest.fixture
def labels() -> torch.Tensor:
    return torch.tensor([0, 1, 2, 1, 0, 2, 2])


def test_relevancy_matches_loop(logits: torch.Tensor, labels: torch.Tensor) -> None:
    w = [0.5, 1.0, 2.0, 0.0, 3.0]
    expected = 0.0
    for i in range(5):
        per_sample = [_ce(logits[i, b].tolist(), [float(c == labels[b]) for c in range(3)]) for b in range(7)]
        expected += w[i] * sum(per_sample) / 7
    got = losses.relevancy(logits, labels, torch.tensor(w))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # default weights are all ones
    plain = losses.relevancy(logits, labels)
    assert plain.item() == pytest.approx(losses.relevancy(logits, labels, torch.ones(5)).item())


@pytest.mark.parametrize("min_over", ["batch", "sample"])
def test_diversity_matches_loop(logits: torch.Tensor, min_over: str) -> None:
    w = [1.0, 0.7, 1.3, 2.0, 0.0]  # beta_L = 0
    num_layers, batch, _ = logits.shape

    def ce(i: int, j: int, b: int) -> float:
        return _ce(logits[i, b].tolist(), _softmax(logits[j, b].tolist()))

    expected = 0.0
    for i in range(1, num_layers):
        if min_over == "batch":
            best = min(sum(ce(i, j, b) for b in range(batch)) / batch for j in range(i))
        else:
            best = sum(min(ce(i, j, b) for j in range(i)) for b in range(batch)) / batch
        expected += w[i] * best
    got = losses.diversity(logits, torch.tensor(w), min_over=min_over)  # type: ignore[arg-type]
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_ensemble_is_relevancy_minus_lambda_diversity(logits: torch.Tensor, labels: torch.Tensor) -> None:
    got = losses.ensemble(logits, labels, lam=0.3)
    expected = losses.relevancy(logits, labels) - 0.3 * losses.diversity(logits)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses.ensemble(logits, labels, lam=0.0).item() == pytest.approx(losses.relevancy(logits, labels).item())


def test_detached_teacher_gets_no_gradient_from_diversity(logits: torch.Tensor) -> None:
    z = logits.clone().requires_grad_(True)
    losses.diversity(z[:2], detach_teacher=True).backward()
    assert z.grad is not None
    assert torch.all(z.grad[0] == 0)  # exit 1 is only ever a target
    assert z.grad[1].abs().sum() > 0
    z.grad = None
    losses.diversity(z[:2], detach_teacher=False).backward()
    assert z.grad[0].abs().sum() > 0


def test_linear_weights_are_pabee() -> None:
    w = losses.layer_weights(4, "linear")
    torch.testing.assert_close(w, torch.tensor([1, 2, 3, 4]) / 10.0)
    assert torch.all(losses.layer_weights(3, "uniform") == 1)


def test_closest_earlier_exit(logits: torch.Tensor) -> None:
    closest = losses.closest_earlier_exit(logits)
    assert closest.shape == (4,)
    for i in range(1, 5):
        ce = losses.pairwise_ce(logits).mean(-1)
        assert closest[i - 1].item() == int(ce[i, :i].argmin()) + 1


def test_distillation_is_zero_when_exits_agree() -> None:
    same = torch.randn(1, 4, 3).repeat(3, 1, 1)
    assert losses.distillation(same).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.distillation(torch.randn(3, 4, 3)).item() > 0


def test_bad_shapes_are_rejected(labels: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="shape"):
        losses.relevancy(torch.randn(7, 3), labels)
    with pytest.raises(ValueError, match="weights"):
        losses.diversity(torch.randn(2, 7, 3), torch.ones(3))
