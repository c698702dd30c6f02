"""The risk-mode guarantee on a real model: Learn-then-Test over random calibration/test splits of the
stored dev + test probabilities of a trained run.

    .venv/bin/python benchmarks/calibration_real.py RUN --max-drop 0.02 --confidence 0.9 --trials 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from layerexit.evaluation import calibrate
from layerexit.run_folder import load_probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("--max-drop", type=float, default=0.02)
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--loss", default="disagreement", choices=["disagreement", "accuracy_drop"])
    parser.add_argument("--trials", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts = [load_probs(args.run / "eval" / f"probs_{split}.safetensors") for split in ("dev", "test")]
    probs = torch.cat([p for p, _ in parts], 1)  # (L, N, C)
    labels = torch.cat([y for _, y in parts])
    result = calibrate.validate(probs, labels, args.max_drop, args.confidence, loss=args.loss, trials=args.trials)
    print(json.dumps(result.to_dict(), indent=2))


if __name__ == "__main__":
    main()
