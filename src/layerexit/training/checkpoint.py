"""Resumable training: ``<run>/checkpoint/``, written atomically, read back with every field checked.

A checkpoint holds what the training loop needs to continue exactly where it stopped:

* ``model.safetensors``: the weights being trained (the best ones so far are the run's own
  ``model.safetensors``);
* ``optimizer.safetensors``: the optimizer's tensors (AdamW's moments and step counts), keyed
  ``<parameter index>.<name>``; the rest of the optimizer (its parameter groups) is in ``state.json``;
* ``rng.safetensors``: every process's random generators (torch, CUDA, Python's ``random``, numpy)
  and the data-order generator as it was at the start of the current epoch;
* ``state.json``, written last: the configuration, the position (stage, epoch, batches consumed,
  optimizer steps), the learning-rate schedule, the best dev score so far, the closest-exit counts,
  the finished stages' results and how far ``train_log.jsonl`` had got.

Only safetensors and JSON are read; nothing is unpickled. The folder is written as
``checkpoint.tmp/`` (each file fsynced), then the previous ``checkpoint/`` is moved to
``checkpoint.old/`` and the new one renamed into place, so a kill at any moment leaves a complete
checkpoint: ``checkpoint/``, or ``checkpoint.old/`` when the kill fell between the two renames.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file
from torch import Tensor

from layerexit.atomic import fsync_path, read_json_object, save_safetensors
from layerexit.config import TrainConfig, load_train_config
from layerexit.errors import LayerExitError
from layerexit.run_folder import RunFolder

FORMAT_VERSION = 1
STATE = "state.json"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", STATE)
RESUME_FREE = ("output", "threads", "checkpoint_every")
"""Options that may change between a run and its resumption: they do not change the result."""
FINISHED = "finished"


@dataclass
class Position:
    """Where training stands: the next batch to run is batch ``batch`` (0-based) of ``epoch`` of ``stage``."""

    stage: int
    epoch: int
    """1-based; ``epochs + 1`` once the stage's last epoch is done."""
    batch: int
    """Batches of ``epoch`` already consumed (always the end of an optimizer step)."""
    step: int
    """Optimizer steps taken in this stage."""


@dataclass
class Checkpoint:
    position: Position
    state: dict[str, Any]
    """The rest of ``state.json``: running loss, best, closest, results, log offset, seconds, ..."""
    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Tensor]
    path: Path


# ---------------------------------------------------------------------------------------------
# Random generators


def capture_rng(cuda: bool = False) -> dict[str, Tensor]:
    """This process's generators as tensors (so that processes can gather them); ``cuda``: also the GPU's."""
    import numpy as np

    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = cast(tuple, np.random.get_state())
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor([version, *mt], dtype=torch.int64),
        "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy": torch.tensor([*keys.tolist(), pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
    }
    if cuda:
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Tensor]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    python = state["python"].tolist()
    has_gauss, gauss = state["python_gauss"].tolist()
    random.setstate((int(python[0]), tuple(int(v) for v in python[1:]), gauss if has_gauss else None))
    numpy = state["numpy"].tolist()
    np.random.set_state(
        ("MT19937", np.array(numpy[:-2], dtype=np.uint32), int(numpy[-2]), int(numpy[-1]), float(state["numpy_gauss"]))
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Optimizer state as tensors + JSON


def split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": plain}


def join_optimizer_state(tensors: dict[str, Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, _, key = name.partition(".")
        state.setdefault(int(index), {})[key] = value
    for index, entry in rest["state"].items():
        state.setdefault(int(index), {}).update(entry)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def check_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer, where: Path) -> None:
    """The saved optimizer must have the same groups, parameter counts and tensor shapes."""
    groups = optimizer.param_groups
    saved = state["param_groups"]
    if len(saved) != len(groups) or any(
        len(s.get("params", [])) != len(g["params"]) for s, g in zip(saved, groups, strict=False)
    ):
        raise LayerExitError(f"{where}: the optimizer state does not match the model's trainable parameters")
    params = [p for g in groups for p in g["params"]]
    ids = [i for s in saved for i in s["params"]]
    if sorted(ids) != list(range(len(params))):
        raise LayerExitError(f"{where}: the optimizer state does not match the model's trainable parameters")
    by_id = dict(zip(ids, params, strict=True))
    for index, entry in state["state"].items():
        if index not in by_id:
            raise LayerExitError(f"{where}: optimizer state for unknown parameter {index}")
        for key, value in entry.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != by_id[index].shape:
                raise LayerExitError(
                    f"{where}: optimizer {key} of parameter {index} has shape {tuple(value.shape)}, "
                    f"the parameter has {tuple(by_id[index].shape)}"
                )


# ---------------------------------------------------------------------------------------------
# Writing


def save(
    run_dir: Path,
    *,
    position: Position,
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: dict[str, Tensor],
) -> Path:
    """Write ``<run>/checkpoint/`` atomically (process 0 only; ``rng`` holds every process's generators)."""
    tmp = RunFolder(run_dir).checkpoint_dir(".tmp")
    final = RunFolder(run_dir).checkpoint_dir()
    old = RunFolder(run_dir).checkpoint_dir(".old")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        tensors, rest = split_optimizer_state(optimizer.state_dict())
        for name, data in (("model", weights), ("optimizer", tensors), ("rng", rng)):
            file = tmp / f"{name}.safetensors"
            save_safetensors(data, file, metadata={"layerexit_checkpoint": str(FORMAT_VERSION)})
            fsync_path(file)
        content = {"format": FORMAT_VERSION, "position": asdict(position), **state, "optimizer": rest}
        (tmp / STATE).write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")
        fsync_path(tmp / STATE)
        fsync_path(tmp)
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
        tmp.rename(final)
        fsync_path(run_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno is not None and not err.filename:
            raise OSError(err.errno, err.strerror, str(final)) from err
        raise
    if old.exists():
        shutil.rmtree(old)
    return final


def remove(run_dir: Path) -> None:
    """Drop the checkpoint once the run is finished (train_summary.json written)."""
    for suffix in ("", ".old", ".tmp"):
        if RunFolder(run_dir).checkpoint_dir(suffix).exists():
            shutil.rmtree(RunFolder(run_dir).checkpoint_dir(suffix))


# ---------------------------------------------------------------------------------------------
# Reading


def _differences(a: TrainConfig, b: TrainConfig) -> list[str]:
    out = []
    for f in fields(TrainConfig):
        if f.name in RESUME_FREE:
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x != y:
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            out.append(f"{flag} {x!r} (run) vs {y!r} (now)")
    return out


def resume_config(run_dir: Path, config: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    """The configuration to resume with: the run's saved one, where the command line may leave options
    out; an option it gives must agree with the run, except those in ``RESUME_FREE``."""
    path = RunFolder(run_dir).config_file
    if not path.is_file():
        return config
    saved = load_train_config(path)
    merged = TrainConfig(**{**asdict(saved), **{k: v for k, v in given.items() if k in RESUME_FREE}})
    wanted = TrainConfig(**{**asdict(saved), **given})
    diffs = _differences(saved, wanted)
    if diffs:
        raise LayerExitError(f"cannot resume {run_dir} with other options: {'; '.join(diffs)}")
    return merged


def _is_empty(folder: Path) -> bool:
    return not folder.exists() or all(p.name.endswith(".tmp") for p in folder.iterdir())


def find(run_dir: Path, config: TrainConfig, world_size: int) -> Checkpoint | str | None:
    """What ``--resume`` continues from: a checkpoint, ``FINISHED``, or None (start at the beginning,
    in the same folder: the run was killed before its first checkpoint)."""
    if _is_empty(run_dir):
        return None
    if not run_dir.is_dir():
        raise LayerExitError(f"{run_dir} is not a folder")
    config_path = RunFolder(run_dir).config_file
    if not config_path.is_file():
        raise LayerExitError(f"{run_dir} is not a layerexit run folder (config.json missing); nothing to resume")
    saved = load_train_config(config_path)
    diffs = _differences(saved, config)
    if diffs:
        raise LayerExitError(f"cannot resume {run_dir} with other options: {'; '.join(diffs)}")
    if RunFolder(run_dir).training_finished():
        return FINISHED
    for suffix in ("", ".old"):
        folder = RunFolder(run_dir).checkpoint_dir(suffix)
        if folder.is_dir():
            return load(folder, config, world_size)
    return None


def load(folder: Path, config: TrainConfig, world_size: int) -> Checkpoint:
    """Read a checkpoint folder, checking that it is whole and belongs to ``config``."""
    for name in FILES:
        if not (folder / name).is_file():
            raise LayerExitError(f"{folder} is an incomplete checkpoint: {name} is missing")
    path = folder / STATE
    state = read_json_object(path, "a checkpoint's training state")
    expected = {
        "format",
        "position",
        "config",
        "world_size",
        "running",
        "best",
        "closest",
        "results",
        "log_offset",
        "seconds",
        "scheduler",
        "scaler",
        "optimizer",
    }
    unknown = sorted(set(state) - expected)
    missing = sorted(expected - set(state))
    if unknown or missing:
        raise LayerExitError(f"{path}: not a checkpoint of this version (unknown keys {unknown}, missing {missing})")
    if state["format"] != FORMAT_VERSION:
        raise LayerExitError(f"{path}: checkpoint format {state['format']!r} is not supported")
    try:
        position = Position(**state.pop("position"))
        if not all(isinstance(getattr(position, f.name), int) for f in fields(Position)):
            raise TypeError("position fields must be integers")
        saved = TrainConfig(**state["config"])
    except (TypeError, LayerExitError) as err:
        raise LayerExitError(f"{path}: damaged checkpoint ({err})") from None
    diffs = _differences(saved, config)
    if diffs:
        raise LayerExitError(f"{path}: the checkpoint belongs to another configuration: {'; '.join(diffs)}")
    if state["world_size"] != world_size:
        raise LayerExitError(
            f"{path}: the run was trained by {state['world_size']} processes; resume it with "
            f"--num-processes {state['world_size']} (now {world_size})"
        )
    tensors = {}
    for name in ("model", "optimizer", "rng"):
        file = folder / f"{name}.safetensors"
        try:
            tensors[name] = load_file(str(file))
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise LayerExitError(f"{file}: not a readable safetensors file ({err})") from None
    try:
        optimizer = join_optimizer_state(tensors["optimizer"], state.pop("optimizer"))
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise LayerExitError(f"{path}: damaged optimizer state ({err})") from None
    return Checkpoint(position, state, tensors["model"], optimizer, tensors["rng"], folder)


def rng_for(checkpoint: Checkpoint, rank: int) -> dict[str, Tensor]:
    """This process's generators out of a checkpoint's ``rng.safetensors``."""
    suffix = f".rank{rank}"
    state = {k[: -len(suffix)]: v for k, v in checkpoint.rng.items() if k.endswith(suffix)}
    needed = ("torch", "python", "python_gauss", "numpy", "numpy_gauss")
    if any(k not in state for k in needed) or "data_order" not in checkpoint.rng:
        raise LayerExitError(f"{checkpoint.path}/rng.safetensors: random generator states are missing")
    return state


def best_to_json(best: dict[str, Any]) -> dict[str, Any]:
    return {**best, "score": None if best["score"] == -math.inf else best["score"]}


def best_from_json(best: dict[str, Any]) -> dict[str, Any]:
    return {**best, "score": -math.inf if best.get("score") is None else float(best["score"])}
