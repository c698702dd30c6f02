"""``load_task``: one entry point that reads a spec as a built-in name, a file, or a folder."""

from __future__ import annotations

import os
from pathlib import Path

from layerexit.data.benchmarks import GLUE_KEYS, LAYOUTS, format_key, load_layout, pick_layout
from layerexit.data.builtin import BUILTINS, load_builtin
from layerexit.data.files import SUFFIXES, Columns, read_user_file, user_task
from layerexit.data.hf import task_from_hf
from layerexit.data.tasks import SPLIT_STEMS, TaskData, check_limit, finish_task, index_labels, merge_skipped, with_dev
from layerexit.errors import LayerExitError


def _split_files(folder: Path) -> dict[str, Path]:
    """The train/dev/test files of a user's folder (``dev`` may be named validation, valid or val)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        split = SPLIT_STEMS.get(path.stem.lower())
        if path.is_file() and split and path.suffix.lower() in SUFFIXES:
            found.setdefault(split, []).append(path)
    for split, paths in found.items():
        if len(paths) > 1:
            raise LayerExitError(f"{folder}: more than one {split} file ({', '.join(p.name for p in paths)}); keep one")
    if "train" not in found:
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:20]) or "nothing"
        known = ", ".join(f"'{k}'" for k in sorted(LAYOUTS))
        raise LayerExitError(
            f"{folder}: no train file (train.csv, train.tsv, train.jsonl or train.txt, with dev/validation "
            f"and test files alongside) and not a known benchmark folder ({known}); found: {present}"
        )
    return {split: found[split][0] for split in ("train", "dev", "test") if split in found}


def _is_saved_hf_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def load_task(
    spec: str | Path,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
    encoding: str | None = None,
) -> TaskData:
    """Load a task from a built-in name, a file, a folder, or a benchmark folder (see the module docstring).

    ``text_column``, ``text_pair_column`` and ``label_column`` name the columns (JSONL keys) of
    CSV/TSV/JSONL files and saved Hugging Face datasets; built-in tasks and benchmark layouts have
    fixed columns and reject them. ``max_train``/``max_eval`` keep a seeded, label-stratified
    subset of train / of each evaluation split, taken after splitting, so ``seed`` never changes
    the splits themselves. ``encoding`` defaults to UTF-8 (latin-1 for TREC).
    """
    check_limit(max_train, "max_train")
    check_limit(max_eval, "max_eval")
    cols = Columns(text_column, text_pair_column, label_column or None)
    custom_columns = cols != Columns("text", None, "label")
    spec_text = str(spec)
    if spec_text in BUILTINS:
        if custom_columns or encoding is not None:
            raise LayerExitError(
                f"built-in task {spec_text!r} has fixed columns and encoding; "
                "text_column, text_pair_column, label_column and encoding apply to your own files"
            )
        label_names, splits, info = load_builtin(spec_text)
        return finish_task(spec_text, label_names, "accuracy", splits, info, max_train, max_eval, seed)

    fmt, path, given = _parse_spec(spec_text)
    if not path.exists():
        known = ", ".join(BUILTINS)
        raise LayerExitError(
            f"{spec_text!r} is neither a built-in task ({known}) nor an existing file or folder"
            + (f" (no such path: {path})" if fmt else "")
        )
    if path.is_file():
        if fmt:
            raise LayerExitError(f"{path}: a {fmt} spec needs a folder in the benchmark's standard layout")
        raw = read_user_file(path, cols, encoding or "utf-8")
        return user_task(
            path.stem,
            {"train": raw},
            {"train": given},
            {"format": path.suffix.lower()[1:]},
            max_train,
            max_eval,
            seed,
        )

    key = format_key(fmt) if fmt else format_key(path.name)
    layout = pick_layout(path, key) if key else None
    if fmt and layout is None:
        key_layouts = LAYOUTS[key] if key else []
        expected = " or ".join(", ".join(lay.files.values()) for lay in key_layouts)
        raise LayerExitError(f"{path}: not a {fmt} folder (expected {expected})")
    if layout is not None:
        if custom_columns:
            raise LayerExitError(
                f"{path} is read as {layout.name}, which has fixed columns; text_column, "
                "text_pair_column and label_column apply to your own CSV/TSV/JSONL files"
            )
        raw_layout, sources = load_layout(path, layout, encoding, given)
        _, splits = index_labels(raw_layout, layout.values)
        label_names = list(layout.names)
        splits, rule = with_dev(splits, layout.name, sources["train"])
        info = {
            "format": layout.name,
            "source": sources,
            "split_rule": rule,
            "note": layout.note,
            "skipped": merge_skipped(raw_layout),
        }
        return finish_task(layout.name, label_names, layout.metric, splits, info, max_train, max_eval, seed)

    if _is_saved_hf_dataset(path):
        try:
            import datasets
        except ImportError as exc:
            raise LayerExitError(
                f"{path} is a saved Hugging Face dataset; reading it needs the `datasets` "
                "package: pip install 'layerexit[datasets]'"
            ) from exc
        return task_from_hf(
            datasets.load_from_disk(str(path)),
            name=path.name,
            text_column=text_column,
            text_pair_column=text_pair_column,
            label_column=label_column,
            max_train=max_train,
            max_eval=max_eval,
            seed=seed,
        )

    files = _split_files(path)
    parts = {split: read_user_file(p, cols, encoding or "utf-8") for split, p in files.items()}
    sources = {split: os.path.join(given, p.name) for split, p in files.items()}
    return user_task(path.name, parts, sources, {"format": "folder"}, max_train, max_eval, seed)


def _parse_spec(spec: str) -> tuple[str | None, Path, str]:
    """Split ``glue:TASK:PATH`` / ``FORMAT:PATH`` into the format name, the path, and the path as typed.

    Plain paths pass (format None). The path as typed (not expanded, not made absolute) is what
    ``info["source"]`` records.
    """
    head, sep, rest = spec.partition(":")
    if sep and head.lower() == "glue":
        task, sep2, path = rest.partition(":")
        if not sep2 or format_key(task) not in GLUE_KEYS:
            raise LayerExitError(
                f"{spec!r}: expected glue:TASK:PATH with TASK one of SST-2, MRPC, CoLA, RTE, QQP, QNLI, MNLI"
            )
        return task, Path(path).expanduser(), path
    if sep and len(head) > 1 and format_key(head) is not None:
        return head, Path(rest).expanduser(), rest
    return None, Path(spec).expanduser(), spec
