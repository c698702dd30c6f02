"""Starting a two-stage run (DeeBERT, FastBERT) from a finished run that trained its first stage.

Both methods begin by fine-tuning the encoder and the final exit, which is the whole of the
``finetune`` method. With the same configuration and seed that stage gives the same weights, so
``layerexit compare`` trains it once per seed (the ``finetune`` run) and starts DeeBERT and FastBERT
at their second stage from it. Each stage after the first draws its dropout from a generator seeded
for that stage, so a run started this way ends with the same weights as one that trained its first
stage itself (``tests/test_reuse.py`` pins this).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from layerexit.atomic import write_text
from layerexit.config import TrainConfig
from layerexit.errors import LayerExitError
from layerexit.methods import METHODS, Stage, build
from layerexit.run_folder import RunFolder

# options that only the methods read (their losses and later stages): they cannot change a fine-tuning stage
_LOSS_ONLY = frozenset({"objective", "output"}.union(*(m.options.__dataclass_fields__ for m in METHODS.values())))


def first_stage_result(source: Path, config: TrainConfig, stages: list[Stage]) -> dict[str, Any]:
    """The stage result of ``source``, a finished run whose training is ``config``'s first stage; an
    error naming what differs otherwise."""
    folder = RunFolder(source)
    if len(stages) < 2:
        raise LayerExitError(f"objective {config.objective!r} has one stage: only a two-stage run starts from another")
    if not folder.training_finished():
        raise LayerExitError(f"{source}: training has not finished ({folder.summary_file.name} missing)")
    theirs = folder.config()
    try:
        built = build(theirs.objective, stages[0].depth, theirs.method_options())
    except ValueError as err:
        raise LayerExitError(f"{folder.config_file}: {err}") from None
    their_stages = [s.name for s in built]
    if their_stages != [stages[0].name]:
        raise LayerExitError(
            f"{source} trained the stages {their_stages} ({theirs.objective!r}), not only "
            f"{config.objective!r}'s first stage {stages[0].name!r}"
        )
    ours, other = asdict(config), asdict(theirs)
    differ = sorted(k for k in ours if k not in _LOSS_ONLY and ours[k] != other.get(k))
    if differ:
        shown = ", ".join(f"{k}: {other.get(k)!r} there, {ours[k]!r} here" for k in differ)
        raise LayerExitError(f"{source} was trained with other options than this run ({shown})")
    results = folder.summary().get("stages")
    if not isinstance(results, list) or len(results) != 1 or not isinstance(results[0], dict):
        raise LayerExitError(f"{folder.summary_file}: one stage result expected under 'stages'")
    return results[0]


def copy_first_stage_files(source: Path, run_dir: Path, stage: str) -> int:
    """Give ``run_dir`` the first stage's training log and closest-exit counts; returns the log's size."""
    theirs, ours = RunFolder(source), RunFolder(run_dir)
    log = theirs.train_log_file.read_text(encoding="utf-8") if theirs.train_log_file.is_file() else ""
    write_text(ours.train_log_file, log)
    counts = theirs.closest_exit_file(stage)
    if counts.is_file():
        write_text(ours.closest_exit_file(stage), counts.read_text(encoding="utf-8"))
    return ours.train_log_file.stat().st_size
