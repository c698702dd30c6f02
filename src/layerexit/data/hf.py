"""Hugging Face ``datasets`` objects (a ``DatasetDict`` or one ``Dataset``) as tasks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from layerexit.data.tasks import (
    SPLIT_STEMS,
    RawSplit,
    TaskData,
    check_limit,
    finish_task,
    index_labels,
    merge_skipped,
    raw_label,
    with_dev,
)
from layerexit.errors import LayerExitError


def task_from_hf(
    dataset: Any,
    *,
    name: str = "hf",
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
) -> TaskData:
    """A task from a Hugging Face ``DatasetDict`` (or one ``Dataset``, used as train).

    Splits named ``train``, ``validation``/``dev``/``valid``/``val`` and ``test`` are used; other
    split names are listed in ``info["ignored_splits"]``. A ``ClassLabel`` label column gives the
    label names; label -1 or None means unlabelled: such rows are skipped, and a split without
    any label (a GLUE test split) is dropped. Without dev, one is held out of train.
    """
    check_limit(max_train, "max_train")
    check_limit(max_eval, "max_eval")
    parts: Mapping[str, Any] = (
        {"train": dataset} if hasattr(dataset, "column_names") and not isinstance(dataset, Mapping) else dataset
    )
    if not isinstance(parts, Mapping):
        raise LayerExitError(f"expected a Hugging Face DatasetDict or Dataset, got {type(dataset).__name__}")
    chosen: dict[str, Any] = {}
    ignored: list[str] = []
    for split_name, part in parts.items():
        split = SPLIT_STEMS.get(str(split_name).lower())
        if split is None or split in chosen:
            ignored.append(str(split_name))
        else:
            chosen[split] = (split_name, part)
    if "train" not in chosen:
        raise LayerExitError(f"the dataset has no train split; splits: {', '.join(map(str, parts))}")
    label_feature = getattr(chosen["train"][1], "features", {}).get(label_column)
    class_names = getattr(label_feature, "names", None)
    raw: dict[str, RawSplit] = {}
    dropped: dict[str, str] = {}
    for split, (split_name, part) in chosen.items():
        columns = list(part.column_names)
        for column, option in (
            (text_column, "text_column"),
            (text_pair_column, "text_pair_column"),
            (label_column, "label_column"),
        ):
            if column is not None and column not in columns:
                raise LayerExitError(
                    f"split {split_name!r} of the dataset has no column {column!r} (the {option}); "
                    f"columns: {', '.join(map(repr, columns))}"
                )
        piece = RawSplit(f"split {split_name!r} of the dataset", "row")
        texts = part[text_column]
        pairs = part[text_pair_column] if text_pair_column is not None else [None] * len(part)
        for number, (text, pair, label) in enumerate(zip(texts, pairs, part[label_column], strict=True)):
            if label is None or (class_names is not None and label == -1):
                piece.skipped["no label"] += 1
                continue
            if class_names is not None:
                if not isinstance(label, int) or not 0 <= label < len(class_names):
                    raise LayerExitError(
                        f"{piece.where(number)}: label {label!r} is not a class index 0..{len(class_names) - 1}"
                    )
                label = class_names[label]
            piece.add(number, text, pair, raw_label(label, piece.where(number)), text_pair_column is not None)
        if split != "train" and piece.skipped["no label"] == len(part):
            dropped[str(split_name)] = "no labels (e.g. a GLUE test split)"
            continue
        if not piece.rows:
            raise LayerExitError(f"split {split_name!r} of the dataset has no usable rows")
        raw[split] = piece
    label_names, splits = index_labels(raw, list(class_names) if class_names is not None else None)
    splits, rule = with_dev(splits, name, "the dataset's train split")
    info = {
        "source": {s: str(n) for s, (n, _) in chosen.items()},
        "format": "Hugging Face datasets",
        "split_rule": rule,
        "ignored_splits": ignored,
        "dropped_splits": dropped,
        "skipped": merge_skipped(raw),
    }
    return finish_task(name, label_names, "accuracy", splits, info, max_train, max_eval, seed)
