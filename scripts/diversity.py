"""How different are a run's exits? Reads the per-layer probabilities `layerexit evaluate` stored.

    python scripts/diversity.py runs/lambda/lam0/ensemble-seed0 runs/compare-tweets-binary/ensemble-seed0

For each run, on the test split: for every exit i >= 2 the smallest cross-entropy CE(x_i, x_j) to an
earlier exit j (the quantity the diversity term maximises, averaged over samples), the share of
samples whose prediction changes from exit i-1 to exit i, and the accuracy of the vote of all exits
against the last exit. The stored probabilities are not committed (runs/ holds them): rerun the
study's commands to get them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from layerexit.run_folder import load_probs
from layerexit.strategies import Voting


def describe(run: Path, split: str) -> str:
    probs, labels = load_probs(run / "eval" / f"probs_{split}.safetensors")
    log = probs.clamp_min(1e-12).log()
    layers = probs.shape[0]
    min_ce = [min(float(-(probs[j] * log[i]).sum(-1).mean()) for j in range(i)) for i in range(1, layers)]
    flips = [float((probs[i].argmax(-1) != probs[i - 1].argmax(-1)).float().mean()) for i in range(1, layers)]
    _, vote = Voting(k=0.0, threshold=float(layers) + 1).replay(probs)  # nobody exits early: the vote of all
    vote_acc = float((vote == labels).float().mean())
    last_acc = float((probs[-1].argmax(-1) == labels).float().mean())
    return (
        f"{run}\n  min CE to an earlier exit: {' '.join(f'{v:.3f}' for v in min_ce)}"
        f" (mean {sum(min_ce) / len(min_ce):.3f})\n"
        f"  prediction changes from the previous exit: {' '.join(f'{100 * v:.1f}%' for v in flips)}\n"
        f"  vote of all exits {100 * vote_acc:.1f}, last exit {100 * last_acc:.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    for run in args.runs:
        path = run / "eval" / f"probs_{args.split}.safetensors"
        if not path.is_file():
            print(f"error: {path} is missing: run `layerexit evaluate {run}` first", file=sys.stderr)
            return 2
        with torch.inference_mode():
            print(describe(run, args.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
