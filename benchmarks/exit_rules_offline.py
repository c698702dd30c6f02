"""Exit rules beyond one exit's confidence, replayed offline on committed per-layer probabilities (issue 27).

For each run folder given (a collected recipe run: ``eval/probs_dev.safetensors`` and ``probs_test``, float16),
every rule is scored by the fastest setting whose disagreement with the run's full depth (the fine-tuned model)
is at most 1% on the second half of dev (uncertified: a replay over the rule's grid); the first half of dev
trains the learned rule, so every rule is chosen on the same half. The chosen setting is then replayed on test.

* ``entropy``, ``maxprob``: the single-exit confidence rules (DeeBERT, RightTool);
* ``pcee-2``, ``pcee-3``: PCEE-BERT's patience over confident exits: exit once the last 2 (3) exits in a row
  were each confident (normalised entropy below the threshold);
* ``learned``: an agreement rule in the spirit of CATs: a logistic regression, trained on the first half of
  dev, predicts whether exit l agrees with the final exit from the exit's top probability, margin and entropy,
  the probability the exits so far gave the predicted class (mean and lowest), the share of exits so far that
  predicted it, and the depth; exit at the first layer whose predicted agreement reaches the threshold.

    python benchmarks/exit_rules_offline.py studies/results/recipe/*-retrofit-seed?
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from layerexit.strategies import entropy

MAX_DISAGREEMENT = 0.01
GRID = torch.linspace(0, 1, 201).tolist()


def exits_by(score: Tensor, probs: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Exit layer (1-based) and prediction when a sample leaves at the first internal exit whose ``score``
    (L - 1, N) reaches ``threshold``; else at the last layer."""
    layers, n = probs.shape[0], probs.shape[1]
    exit_layer = torch.full((n,), layers)
    prediction = probs[-1].argmax(-1).clone()
    done = torch.zeros(n, dtype=torch.bool)
    for layer in range(layers - 1):
        fire = (score[layer] >= threshold) & ~done
        exit_layer[fire] = layer + 1
        prediction[fire] = probs[layer].argmax(-1)[fire]
        done |= fire
    return exit_layer, prediction


def pcee_score(probs: Tensor, patience: int) -> Callable[[float], Tensor]:
    """Score of PCEE with ``patience``: for threshold t, 1 where the last ``patience`` exits were all confident."""
    confidence = 1 - entropy(probs[:-1])  # (L - 1, N)

    def score(threshold: float) -> Tensor:
        confident = (confidence > 1 - threshold).long()
        run = torch.zeros_like(confident)
        for layer in range(confident.shape[0]):
            previous = run[layer - 1] if layer else torch.zeros_like(run[0])
            run[layer] = (previous + 1) * confident[layer]
        return (run >= patience).float()

    return score


def features(probs: Tensor) -> Tensor:
    """(L - 1, N, F): what the learned rule reads at each internal exit; probabilities only."""
    layers, n, _ = probs.shape
    rows = torch.arange(n)
    out = []
    for layer in range(layers - 1):
        p = probs[layer]
        prediction = p.argmax(-1)
        top = p.topk(2, -1).values
        given = probs[: layer + 1, rows, prediction]  # (layer + 1, N): the probability each exit so far gave it
        share = (probs[: layer + 1].argmax(-1) == prediction).float().mean(0)
        depth = torch.zeros(n, layers - 1)
        depth[:, layer] = 1
        stats = [top[:, 0], top[:, 0] - top[:, 1], entropy(p), given.mean(0), given.min(0).values, share]
        out.append(torch.cat([torch.stack(stats, -1), depth], -1))
    return torch.stack(out)


def fit_agreement(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Logistic regression (L2 1e-3) by L-BFGS: x (M, F), y (M,) in {0, 1}."""
    w = torch.zeros(x.shape[-1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 1e-3 * (w**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def fastest(probs: Tensor, score_of: Callable[[float], Tensor], flip: bool = False) -> dict[str, float] | None:
    """The fastest threshold of the grid whose disagreement with the last exit is at most 1%."""
    full = probs[-1].argmax(-1)
    best = None
    for t in GRID:
        exit_layer, prediction = exits_by(score_of(t), probs, 1 - t if flip else 0.5)
        disagreement = float((prediction != full).double().mean())
        speedup = probs.shape[0] / float(exit_layer.double().mean())
        if disagreement <= MAX_DISAGREEMENT and (best is None or speedup > best["speedup"]):
            best = {"threshold": t, "speedup": speedup, "disagreement": disagreement}
    return best


def replay(probs: Tensor, score_of: Callable[[float], Tensor], threshold: float, flip: bool) -> dict[str, float]:
    exit_layer, prediction = exits_by(score_of(threshold), probs, 1 - threshold if flip else 0.5)
    return {
        "speedup": round(probs.shape[0] / float(exit_layer.double().mean()), 3),
        "disagreement": round(float((prediction != probs[-1].argmax(-1)).double().mean()), 4),
    }


def rules(train: Tensor) -> dict[str, tuple[Callable[[Tensor], Callable[[float], Tensor]], bool]]:
    """Each rule: (probs -> (threshold -> score), whether the threshold is on the score itself)."""
    x = features(train)
    y = (train[:-1].argmax(-1) == train[-1].argmax(-1)).float()
    w, b = fit_agreement(x.reshape(-1, x.shape[-1]), y.reshape(-1))
    return {
        "entropy": (lambda p: lambda t: (entropy(p[:-1]) < t).float(), False),
        "maxprob": (lambda p: lambda t: (p[:-1].max(-1).values >= 1 - t).float(), False),
        "pcee-2": (lambda p: pcee_score(p, 2), False),
        "pcee-3": (lambda p: pcee_score(p, 3), False),
        "learned": (lambda p: lambda t: torch.sigmoid(features(p) @ w + b), True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    for run in args.runs:
        dev = load_file(str(run / "eval" / "probs_dev.safetensors"))["probs"].float()
        test = load_file(str(run / "eval" / "probs_test.safetensors"))["probs"].float()
        order = torch.randperm(dev.shape[1], generator=torch.Generator().manual_seed(0))
        half = dev.shape[1] // 2
        learn, choose = dev[:, order[:half]], dev[:, order[half:]]
        results[run.name] = {}
        print(f"{run.name}: rule, fastest at <= 1% disagreement on half of dev (n={choose.shape[1]}) -> test")
        for name, (score_of, flip) in rules(learn).items():
            chosen = fastest(choose, score_of(choose), flip)
            if chosen is None:
                print(f"  {name:<8} no setting")
                continue
            on_test = replay(test, score_of(test), chosen["threshold"], flip)
            results[run.name][name] = {"dev": chosen, "test": on_test}
            print(
                f"  {name:<8} {chosen['speedup']:.2f}x at {100 * chosen['disagreement']:.2f}% -> "
                f"{on_test['speedup']:.2f}x at {100 * on_test['disagreement']:.2f}%"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
