"""Make a user's classifier the way a user would: plain transformers, its standard head, ``save_pretrained``.

No fine-tuned English classifier ships in any package here, so the retrofit benchmark
(``benchmarks/retrofit.py``) starts from one made by this script: ``AutoModelForSequenceClassification``
over an encoder, trained with ``transformers.Trainer`` on a built-in task's train split, saved with its
tokenizer and its label names (``id2label``). Nothing from layerexit runs in the training itself; the
task's splits come from ``layerexit.data.load_task`` so the benchmark evaluates on the same dev and test.

    .venv/bin/python benchmarks/finetune_classifier.py --model minilm-l6 --task tweets-binary \\
        --output runs/classifiers/tweets-binary-minilm

The run is resumable: Trainer checkpoints every ``--save-steps`` steps under ``OUTPUT/checkpoints`` and
a second call resumes from the last one (or does nothing when ``OUTPUT/classifier_eval.json`` exists).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6", help="encoder: alias, local folder or hub name")
    parser.add_argument("--task", default="tweets-binary")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--max-train", type=int, default=0, help="0: all of train")
    parser.add_argument("--max-eval", type=int, default=0, help="0: all of dev and test")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-steps", type=int, default=100)
    args = parser.parse_args()

    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from layerexit.assets import resolve_encoder
    from layerexit.data import load_task

    out: Path = args.output
    if (out / "classifier_eval.json").is_file():
        print(f"{out}: already finished")
        return
    torch.set_num_threads(args.threads)
    task = load_task(args.task, max_train=args.max_train or None, max_eval=args.max_eval or None, seed=args.data_seed)
    path = resolve_encoder(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    names = list(task.label_names)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )

    class Split(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __init__(self, name: str) -> None:
            examples = task.splits[name]
            texts = [e.text for e in examples]
            pairs = [e.text_pair for e in examples] if task.has_pairs else None
            self.encoded = tokenizer(texts, pairs, truncation=True, max_length=args.max_length)
            self.labels = [e.label for e in examples]

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int) -> dict[str, object]:
            item = {k: v[i] for k, v in self.encoded.items()}
            item["labels"] = self.labels[i]
            return item

    train = Split("train")
    training_args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        warmup_steps=0.1,  # a float below 1 is a share of the steps
        weight_decay=0.01,
        seed=args.seed,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=1,
        logging_steps=50,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer)
    )
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    seconds = time.perf_counter() - start
    trainer.save_model(str(out))  # save_pretrained: config (with id2label), model.safetensors
    tokenizer.save_pretrained(str(out))
    report: dict[str, object] = {
        "model": args.model,
        "task": args.task,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_examples": len(train),
        "train_seconds_this_call": round(seconds, 1),
    }
    for split in ("dev", "test"):
        if split in task.splits:
            predictions = trainer.predict(Split(split))
            accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
            report[f"{split}_accuracy"] = round(100 * accuracy, 2)
    (out / "classifier_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
