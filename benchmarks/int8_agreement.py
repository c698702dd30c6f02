"""How far each int8 export's answers move from fp32: from the per-exit probabilities `layerexit evaluate
RUN --runtime NAME` saved for the same inputs, the share of inputs whose last-exit label (the full model's
answer) and whose label under a strategy differ from PyTorch fp32's, with the full model's accuracy.

    python benchmarks/int8_agreement.py runs/demo --runtime onnx-int8 onnx-int8-static onnx-int8-token \
        --strategy "entropy(threshold=0.14)" --json out.json
"""

from __future__ import annotations

import argparse

from benchtools import write_results

from layerexit import strategies
from layerexit.run_folder import RunFolder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--runtime", nargs="+", required=True)
    parser.add_argument("--strategy", default="entropy(threshold=0.14)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    run = RunFolder(args.run)
    strategy = strategies.parse(args.strategy)
    results: dict[str, object] = {"run": args.run, "strategy": str(strategy), "splits": {}}
    print(
        f"{'split':5s}  {'runtime':18s}  {'full acc':>8s}  {'full-model labels changed':>25s}  "
        f"{'early-exit labels changed':>25s}  {'exit layers changed':>19s}"
    )
    for split in ("dev", "test"):
        ref_probs, labels = run.read_probs(split)
        ref_layer, ref_label = strategy.replay(ref_probs)
        rows = {}
        for name in ["torch", *args.runtime]:
            probs, _ = run.read_probs(split, name)
            layer, label = strategy.replay(probs)
            full = probs[-1].argmax(-1)
            row = {
                "n": int(labels.numel()),
                "full_accuracy": float((full == labels).float().mean()),
                "full_label_changed": float((full != ref_probs[-1].argmax(-1)).float().mean()),
                "early_exit_label_changed": float((label != ref_label).float().mean()),
                "exit_layer_changed": float((layer != ref_layer).float().mean()),
                "early_exit_accuracy": float((label == labels).float().mean()),
            }
            rows[name] = row
            print(
                f"{split:5s}  {name:18s}  {row['full_accuracy']:8.4f}  {row['full_label_changed']:25.2%}  "
                f"{row['early_exit_label_changed']:25.2%}  {row['exit_layer_changed']:19.2%}"
            )
        results["splits"][split] = rows  # type: ignore[index]
    write_results(args.json or None, results)


if __name__ == "__main__":
    main()
