"""The paper's analysis figures for one evaluated run.

* ``exit_distribution.png`` (Figure 8): how many samples leave at each layer under each selected
  strategy, split into right and wrong predictions;
* ``closest_exit.png`` (Figure 6b): during training, how often each earlier exit was the closest
  one (smallest cross-entropy) to each exit, i.e. the one the diversity term pushed away from;
* ``voting_values.png`` (Figure 7): the values V_l = max votes / l**k can take at each layer for
  k in {0, 0.25, 0.5, 0.75}, sized by how many samples of the split reach them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from layerexit import strategies
from layerexit.errors import LayerExitError
from layerexit.evaluation.figures import pyplot, save_figure
from layerexit.evaluation.sweep import VOTING_KS
from layerexit.run_folder import RunFolder


def voting_values(probs: Tensor, k: float) -> Tensor:
    """V_l of Eq. 23 at every layer for every sample: (L, N)."""
    num_layers, num_samples, num_classes = probs.shape
    votes = torch.zeros(num_samples, num_classes)
    out = torch.zeros(num_layers, num_samples)
    for layer in range(1, num_layers + 1):
        votes.scatter_add_(1, probs[layer - 1].argmax(-1, keepdim=True), torch.ones(num_samples, 1))
        out[layer - 1] = votes.max(-1).values / strategies.voting_denominator(layer, k)
    return out


def plot_exit_distribution(
    probs: Tensor,
    labels: Tensor,
    settings: dict[str, str],
    path: Path,
    bind: Callable[[strategies.Strategy], strategies.Strategy] = lambda s: s,
) -> None:
    plt = pyplot()
    num_layers = probs.shape[0]
    fig, axes = plt.subplots(1, len(settings), figsize=(3.2 * len(settings), 3.0), dpi=110, sharey=True, squeeze=False)
    layers = torch.arange(1, num_layers + 1)
    for ax, (family, setting) in zip(axes[0], settings.items(), strict=True):
        exit_layer, prediction = bind(strategies.parse(setting)).replay(probs, labels)
        right = torch.bincount(exit_layer[prediction == labels], minlength=num_layers + 1)[1:]
        wrong = torch.bincount(exit_layer[prediction != labels], minlength=num_layers + 1)[1:]
        ax.bar(layers.numpy(), right.numpy(), color="C2", label="right")
        ax.bar(layers.numpy(), wrong.numpy(), bottom=right.numpy(), color="C3", label="wrong")
        speedup = num_layers / float(exit_layer.float().mean())
        ax.set_title(f"{family} ({speedup:.2f}x)\n{setting}", fontsize=7)
        ax.set_xlabel("exit layer")
        ax.set_xticks(layers.numpy())
    axes[0][0].set_ylabel("samples")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_closest_exit(counts: list[list[int]], path: Path, stage: str) -> None:
    plt = pyplot()
    matrix = torch.tensor(counts, dtype=torch.float)[1:]  # rows: exits 2..L
    shares = matrix / matrix.sum(1, keepdim=True).clamp_min(1)
    num_layers = matrix.shape[1]
    fig, ax = plt.subplots(figsize=(4.2, 3.6), dpi=110)
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(num_layers), [str(j) for j in range(1, num_layers + 1)])
    ax.set_yticks(range(num_layers - 1), [str(i) for i in range(2, num_layers + 1)])
    ax.set_xlabel("closest earlier exit j")
    ax.set_ylabel("exit i")
    ax.set_title(f"share of training steps ({stage})", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    save_figure(fig, path)


def plot_voting_values(probs: Tensor, path: Path) -> None:
    plt = pyplot()
    num_layers, num_samples = probs.shape[0], probs.shape[1]
    color = strategies.Voting.family.style.color
    fig, axes = plt.subplots(1, len(VOTING_KS), figsize=(3.0 * len(VOTING_KS), 3.0), dpi=110, squeeze=False)
    for ax, k in zip(axes[0], VOTING_KS, strict=True):
        values = voting_values(probs, k)  # (L, N)
        for layer in range(1, num_layers + 1):
            possible = [v / strategies.voting_denominator(layer, k) for v in range(1, layer + 1)]
            observed = values[layer - 1]
            sizes = [4 + 120 * float((observed == p).float().mean()) for p in possible]
            ax.scatter([layer] * len(possible), possible, s=sizes, color=color, alpha=0.6, edgecolors="none")
        ax.set_title(f"k = {k:g}", fontsize=9)
        ax.set_xlabel("layer l")
        ax.set_xticks(range(1, num_layers + 1))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("V_l (dot size: share of samples)")
    fig.suptitle(f"voting values over {num_samples} samples", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def analyze_run(run_dir: Path | RunFolder, split: str = "test") -> list[Path]:
    """Write the three figures into ``<run>/eval/``; returns their paths."""
    run = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
    out = run.eval_dir()
    if not run.probs_file(split).is_file() or not run.report_file().is_file():
        raise LayerExitError(f"{run} has no evaluation of split {split!r}; run `layerexit evaluate {run}` first")
    probs, labels = run.read_probs(split)
    report = run.report()
    settings = {f: e["setting"] for f, e in report["selected"].items() if e is not None and f != "static"}
    written = []
    if settings:
        plot_exit_distribution(probs, labels, settings, out / "exit_distribution.png", run.bind)
        written.append(out / "exit_distribution.png")
    plot_voting_values(probs, out / "voting_values.png")
    written.append(out / "voting_values.png")
    for stage, counts_file in run.closest_exit_files().items():
        counts = run.read_json(counts_file, "closest-exit counts").get("counts")
        if not isinstance(counts, list):
            raise LayerExitError(f"{counts_file}: no 'counts' list")
        if sum(map(sum, counts)):
            target = out / f"closest_exit_{stage}.png"
            plot_closest_exit(counts, target, stage)
            written.append(target)
    return written
