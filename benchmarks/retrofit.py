"""Retrofit on a real fine-tuned classifier: how long it takes, whether full depth is the classifier, and the
speed-up certified against it.

The classifier is made the way a user would make it (``benchmarks/finetune_classifier.py``: plain
transformers, its standard head, ``save_pretrained``). Then:

1. ``--sweep``: the exits' head, pooling, loss and epochs, measured on dev. The frozen encoder runs
   once over train and dev (both poolings kept); each candidate trains on the cached states and is
   scored by the fastest entropy or max-prob threshold whose dev disagreement with the classifier is
   at most 1% (replayed, not certified). This is the measurement behind `layerexit retrofit`'s defaults.
2. ``layerexit retrofit`` with labels and without (the same texts in .txt files), each timed end to end
   (loading, the encoder pass over every training text, the exits' training, saving); then evaluation.
3. Full depth against transformers' own forward of the classifier on every test text (predictions and
   largest probability difference).
4. ``layerexit calibrate --max-drop 0.01 --confidence 0.9 --loss disagreement``: Learn-then-Test on dev,
   the chosen setting's speed-up in layers and realised disagreement and accuracy on test.

    .venv/bin/python benchmarks/retrofit.py --classifier runs/classifiers/tweets-binary-minilm \\
        --task tweets-binary --max-length 64 --threads 2 --out runs/retrofit-bench/tweets-binary --sweep

Figures are printed and written to ``OUT/retrofit_bench.json``; every exit's probabilities on dev and test
(float16) to ``OUT/probs_<split>.safetensors``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from layerexit import strategies
from layerexit.cli import main as cli
from layerexit.data.encoding import encode_split, load_tokenizer
from layerexit.model import EarlyExitModel
from layerexit.run_folder import RunFolder
from layerexit.training.retrofit import (
    RetrofitConfig,
    cache_states,
    fit_exits,
    fresh_exits,
    holdout_split,
    retrofit,
)

GRID = {
    "entropy": [strategies.Entropy(threshold=t / 100) for t in range(1, 100)],
    "maxprob": [strategies.MaxProb(threshold=t / 200) for t in range(100, 200)],
}


def fastest_at(probs: torch.Tensor, max_disagreement: float) -> dict[str, Any]:
    """The fastest entropy / max-prob threshold whose disagreement with the last exit is within the bound."""
    reference = probs[-1].argmax(-1)
    layers = probs.shape[0]
    best: dict[str, Any] = {"speedup": 1.0, "setting": "full", "disagreement": 0.0}
    for family in GRID.values():
        for strategy in family:
            exit_layer, prediction = strategy.replay(probs)
            disagreement = float((prediction != reference).float().mean())
            speedup = layers / float(exit_layer.float().mean())
            if disagreement <= max_disagreement and speedup > best["speedup"]:
                best = {"speedup": round(speedup, 3), "setting": str(strategy), "disagreement": round(disagreement, 4)}
    return best


def sweep(args: argparse.Namespace, base: RetrofitConfig) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    model = EarlyExitModel.from_classifier(args.classifier)
    tokenizer = load_tokenizer(args.classifier)
    task = base.train_config("").load_task().relabelled(list(model.config.label_names))
    pad = tokenizer.pad_token_id or 0
    types = model.backbone.uses_token_type_ids

    def encode(split: str) -> Any:
        return encode_split(tokenizer, task.splits[split], args.max_length, types)

    started = time.perf_counter()
    train = cache_states(model, encode("train"), 64, pad, True, poolings=("mean", "first"))
    dev = cache_states(model, encode("dev"), 64, pad, True, poolings=("mean", "first"))
    print(f"encoder passes over train and dev: {time.perf_counter() - started:.0f} s")
    held, rows = holdout_split(train["mean"].states.shape[1], base.holdout, base.seed)
    labels = torch.tensor([ex.label for ex in task.splits["train"]])
    candidates = [
        {"head": h, "pooling": p, "loss": "distill", "epochs": 30} for h in ("mlp", "linear") for p in ("mean", "first")
    ]
    candidates += [{"head": "mlp", "pooling": "mean", "loss": loss, "epochs": 30} for loss in ("labels", "both")]
    candidates += [{"head": "mlp", "pooling": "mean", "loss": "distill", "epochs": e} for e in (10, 60)]
    if args.candidates:  # a later round: e.g. '[{"head": "mlp", "pooling": "mean", "loss": "both", "epochs": 100}]'
        candidates = json.loads(args.candidates)
    results = []
    for candidate in candidates:
        config = replace(base, **candidate)
        cache = train[config.pooling]
        fresh_exits(model, config.head, config.pooling, config.exit_dropout, config.seed)
        started = time.perf_counter()
        picked, _ = fit_exits(
            model, cache.rows(rows), labels[rows], cache.rows(held), labels[held], config, progress=False
        )
        seconds = time.perf_counter() - started
        with torch.no_grad():
            heads = model.exits[:-1]
            probs = torch.stack(
                [head.classify(dev[config.pooling].states[i]).float().softmax(-1) for i, head in enumerate(heads)]
                + [dev[config.pooling].reference.softmax(-1)]
            )
        per_exit = (probs.argmax(-1) == probs[-1].argmax(-1)).float().mean(-1)
        row = {
            **candidate,
            "lr": config.lr,
            "train_seconds": round(seconds, 1),
            "best_epochs": [e["best_epoch"] for e in picked],
            "dev_agreement_per_exit": [round(float(a), 4) for a in per_exit],
            "dev_at_1pct": fastest_at(probs, 0.01),
        }
        results.append(row)
        print(json.dumps(row))
    return results


def classifier_predictions(args: argparse.Namespace, texts: list[str], pairs: list[str] | None) -> torch.Tensor:
    """transformers' own forward of the classifier, batch by batch: probabilities (N, C)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(args.classifier).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.classifier)
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            chunk = texts[start : start + 64]
            pair = pairs[start : start + 64] if pairs else None
            batch = tokenizer(
                chunk, pair, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt"
            )
            out.append(model(**batch).logits.float().softmax(-1))
    return torch.cat(out)


def end_to_end(args: argparse.Namespace, base: RetrofitConfig, name: str, task: str) -> dict[str, Any]:
    run = args.out / name
    shutil.rmtree(run, ignore_errors=True)
    started = time.perf_counter()
    retrofit(replace(base, task=task, output=str(run)), progress=False)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli(["evaluate", str(run), "--quiet"]) == 0
        assert cli(["calibrate", str(run), "--max-drop", "0.01", "--confidence", "0.9", "--loss", "disagreement",
                    "--quiet"]) == 0  # fmt: skip
    evaluate_seconds = time.perf_counter() - started
    folder = RunFolder(run)
    report, calibration = folder.report(), json.loads(folder.calibration_file.read_text())
    default = next(c for c in calibration["test"] if c["family"] == calibration["default_family"])
    probs, labels = folder.read_probs("test")
    row: dict[str, Any] = {
        "retrofit_seconds": round(seconds, 1),
        "encoder_pass_seconds": folder.summary()["encoder_pass_seconds"],
        "evaluate_and_calibrate_seconds": round(evaluate_seconds, 1),
        "test_full_depth_accuracy": report["splits"]["test"]["per_layer"]["accuracy"][-1],
        "certified": {
            "setting": calibration["default"],
            "dev_speedup": next(c for c in calibration["choices"] if c["family"] == calibration["default_family"])[
                "speedup"
            ],
            "test_speedup": default["speedup"],
            "test_disagreement": default.get("risk"),
            "test_accuracy_against_labels": None,
        },
        "all_families_on_test": {
            c["family"]: {"speedup": c["speedup"], "disagreement": c.get("risk")} for c in calibration["test"]
        },
    }
    return row | {"_probs": probs, "_labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", type=Path, required=True)
    parser.add_argument("--task", default="tweets-binary")
    parser.add_argument("--max-train", type=int, default=0)
    parser.add_argument("--max-eval", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sweep", action="store_true", help="measure the exits' head, pooling, loss and epochs on dev")
    parser.add_argument("--sweep-only", action="store_true", help="the sweep alone (OUT/retrofit_sweep.json)")
    parser.add_argument("--candidates", default="", help="JSON list of sweep candidates instead of the first round")
    parser.add_argument("--sweep-name", default="retrofit_sweep", help="file name (no suffix) of the sweep's JSON")
    parser.add_argument("--skip-unlabelled", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = RetrofitConfig(
        classifier=str(args.classifier),
        task=args.task,
        max_length=args.max_length,
        threads=args.threads,
        max_train=args.max_train,
        max_eval=args.max_eval,
    )
    figures: dict[str, Any] = {"classifier": str(args.classifier), "task": args.task, "threads": args.threads}
    if args.sweep or args.sweep_only:
        figures["sweep"] = sweep(args, base)
        (args.out / f"{args.sweep_name}.json").write_text(json.dumps(figures, indent=2) + "\n")
        if args.sweep_only:
            return

    task = base.train_config("").load_task()
    labelled = end_to_end(args, base, "labelled", args.task)
    probs, labels = labelled.pop("_probs"), labelled.pop("_labels")
    texts = [ex.text for ex in task.splits["test"]]
    pairs = [ex.text_pair or "" for ex in task.splits["test"]] if task.has_pairs else None
    direct = classifier_predictions(args, texts, pairs)
    names = RunFolder(args.out / "labelled").data_info()["label_names"]
    figures["full_depth"] = {
        "test_texts": len(texts),
        "identical_predictions": int((direct.argmax(-1) == probs[-1].argmax(-1)).sum()),
        "max_probability_difference": float((direct - probs[-1].float()).abs().max()),
    }
    calibration = json.loads(RunFolder(args.out / "labelled").calibration_file.read_text())
    _, prediction = strategies.parse(calibration["default"]).replay(probs.float())
    labelled["certified"]["test_accuracy_against_labels"] = round(float((prediction == labels).float().mean()), 4)
    figures["labelled"] = labelled
    figures["label_names"] = names

    if not args.skip_unlabelled:
        folder = args.out / "texts"
        folder.mkdir(exist_ok=True)
        if task.has_pairs:
            print("text pairs: the unlabelled run is skipped (a .txt file holds single texts)")
        else:
            for split, examples in task.splits.items():
                (folder / f"{split}.txt").write_text("".join(ex.text.replace("\n", " ") + "\n" for ex in examples))
            unlabelled = end_to_end(args, base, "unlabelled", str(folder))
            unlabelled.pop("_probs"), unlabelled.pop("_labels")
            figures["unlabelled"] = unlabelled
    for split in ("dev", "test"):  # small enough to keep: every exit's probabilities, float16
        stored, stored_labels = RunFolder(args.out / "labelled").read_probs(split)
        save_file(
            {"probs": stored.to(torch.float16).contiguous(), "labels": stored_labels.contiguous()},
            str(args.out / f"probs_{split}.safetensors"),
        )
    (args.out / "retrofit_bench.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
