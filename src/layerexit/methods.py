"""Training methods, one entry each: what a method is, in one place.

An entry (:class:`Method`) holds a method's name, its help, its options (a dataclass of its own, each
option with one default and one spelling from the ``--flag`` to the loss), its stages, its own exit
strategy, its label in comparisons, and what runs after its training. ``layerexit train``, ``compare``
and the report read this registry; the one training loop (:mod:`layerexit.training.loop`) knows nothing
about any particular method.

A stage names its loss over the logits of every exit, ``(L, B, C)``, which parameters it trains, and
how deep the forward pass must go. Adding a method: its loss in :mod:`layerexit.losses`, its entry
here (``register_method``), its test. A method with options mirrors each one in
:class:`layerexit.config.TrainConfig` with ``option_of`` (one line each), since a run's ``config.json`` is flat.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor

from layerexit import losses
from layerexit.errors import LayerExitError
from layerexit.options import option
from layerexit.strategies import Entropy, MaxProb, Patience, Voting

Trainable = Literal["all", "internal_exits", "cached_exits"]
"""What a stage trains: everything, the internal exits through the frozen encoder (a forward pass per
batch), or the internal exits on pooled states the frozen encoder computed once (``cached_exits``:
:func:`layerexit.training.retrofit.fit_cached_stage`, which has its own loss and schedule)."""
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Stage:
    name: str
    loss: LossFn | None
    """Over the logits of every exit; ``None`` for a ``cached_exits`` stage, which trains on its own terms."""
    trainable: Trainable
    depth: int
    """How many layers the forward pass runs; exits deeper than this get no logits."""
    exits: tuple[int, ...]
    """1-based exits whose dev metric selects the best checkpoint of this stage."""
    targets: Literal["labels", "teacher"] = "labels"
    """What the loss gets besides the logits: the labels (B,), or ``teacher``, the probabilities (B, C) that
    the model gave each training row when the stage began (its final exit, dropout off): the frozen model
    of the stage before, computed once and kept in the run folder."""
    equilibrium: bool = False
    """Gradient equilibrium in the forward pass (:meth:`layerexit.model.EarlyExitModel.forward`)."""
    alternate: LossFn | None = None
    """Used instead of ``loss`` on every other optimizer step (BERxiT's alternating steps)."""


@dataclass(frozen=True)
class MethodOptions:
    """The options of a method without any; the base of every method's options."""

    def check(self) -> None:
        """What the options must satisfy when their method is the one trained (``__post_init__`` checks
        what they must satisfy always)."""


@dataclass(frozen=True)
class EnsembleOptions(MethodOptions):
    """The ensemble objective's options (the paper's Eq. 14/24; docs/design.md, Definitions)."""

    lam: float = option(
        0.1,
        "diversity weight lambda of the ensemble objective (paper: 0.1-0.5; the default was chosen on dev: "
        "docs/results.md)",
        flag="--lambda",
    )
    weighting: Literal["auto", "uniform", "linear"] = option(
        "auto",
        "exit weights alpha of the ensemble objective: uniform (the paper's choice for ALBERT) or linear i/sum(i) "
        "(BERT, PABEE); auto = uniform for ALBERT, linear for every other encoder. The diversity weights beta "
        "follow alpha (beta_i = alpha_i, beta_L = 0 by default), so lambda weighs exit i's diversity term against "
        "its own relevancy term under either weighting",
    )
    drop_last_diversity: bool = option(True, "beta_L = 0: no diversity term on the last exit")
    detach_teacher: bool = option(True, "the earlier exit is a fixed target in the diversity term")
    min_over: Literal["batch", "sample"] = option(
        "batch", "diversity: closest earlier exit chosen per batch (paper) or per sample"
    )

    def __post_init__(self) -> None:
        if not self.lam >= 0:
            raise LayerExitError(f"--lambda must be >= 0, got {self.lam}")


@dataclass(frozen=True)
class StaticOptions(MethodOptions):
    """The static model's option: how many layers it keeps."""

    static_layers: int = option(0, "layers kept by the `static` objective")

    def check(self) -> None:
        if self.static_layers < 1:
            raise LayerExitError("objective 'static' needs --static-layers >= 1")


@dataclass(frozen=True)
class JointDistillOptions(MethodOptions):
    """The joint-distill method's second stage: the whole model trained again from the fine-tuned one, every
    exit distilled towards the frozen fine-tuned model's answers on the training texts."""

    equilibrium: bool = option(
        True,
        "joint-distill: gradient equilibrium (ElasticBERT): each layer gets the mean of the gradients of the exits "
        "above it, not their sum",
    )
    alternate: bool = option(
        False, "joint-distill: BERxiT's alternating steps: every other optimizer step trains the last exit alone"
    )


@dataclass(frozen=True)
class RetrofitOptions(MethodOptions):
    """The retrofit method's second stage: exits fitted on the frozen fine-tuned encoder's cached states, as
    ``layerexit retrofit`` fits them (defaults chosen on dev there: docs/retrofit.md)."""

    exit_epochs: int = option(
        100, "retrofit: epochs of the internal exits over the cached states (each keeps its best epoch)"
    )
    exit_lr: float = option(2e-3, "retrofit: peak learning rate of the internal exits on the cached states")
    exit_loss: Literal["distill", "labels", "both"] = option(
        "distill", "retrofit: what the internal exits learn: the final exit's distribution, the labels, or both"
    )
    exit_pooling: Literal["auto", "mean", "first", "last", "pair"] = option(
        "auto",
        "retrofit: how the internal exits pool; auto = a decoder's last token, pair features for text pairs, else "
        "the mean (as `layerexit retrofit`)",
    )

    def __post_init__(self) -> None:
        if self.exit_epochs < 1:
            raise LayerExitError(f"--exit-epochs must be >= 1, got {self.exit_epochs}")
        if not self.exit_lr > 0:
            raise LayerExitError(f"--exit-lr must be positive, got {self.exit_lr}")


StagesFn = Callable[[int, Any, str], list[Stage]]
"""(number of layers, the method's options, the encoder's model type) -> the stages to train."""


@dataclass(frozen=True)
class Method:
    """One training method."""

    name: str
    help: str
    stages: StagesFn
    options: type[MethodOptions] = MethodOptions
    label: str = ""
    """Its row in comparisons (``compare``'s table and plot, the report); the name when empty."""
    native_strategy: str | None = None
    """The strategy family the method was made for, bold in ``compare``'s table."""
    also_plotted: tuple[str, ...] = ()
    """Strategy families ``compare``'s plot draws besides the native one."""
    first_stage: str | None = None
    """A method whose whole training is this one's first stage (``compare`` trains it once per seed and
    starts this one at its second stage from it)."""
    after_training: Callable[[Tensor, Tensor], list[float]] | None = None
    """Per-exit temperatures fitted on the dev logits (L, N, C) and labels once training has ended."""
    takes_layers: bool = False
    """A static model: written ``name:N`` in ``compare --methods``, N its layer count, compared at that exit."""
    trains_internal_exits: bool = True
    """False: only its full model is compared (its internal exits are untrained, an oracle over them is
    meaningless); drawn as a line in the plots."""
    settings: Callable[[Any], str] | None = None
    """A short text of its options (given them) for titles, e.g. ``λ = 0.1``."""

    @property
    def display(self) -> str:
        return self.label or self.name

    def options_of(self, config: Any) -> MethodOptions:
        """This method's options, read from the fields of the same names of ``config`` (a TrainConfig)."""
        return self.options(**{f.name: getattr(config, f.name) for f in fields(self.options)})

    def describe(self, config: Mapping[str, Any]) -> str:
        """Its ``settings`` text for a saved configuration (a dict), ``""`` when it shows none."""
        if self.settings is None:
            return ""
        names = [f.name for f in fields(self.options)]
        return self.settings(self.options(**{n: config[n] for n in names if n in config}))

    def build(self, num_layers: int, options: MethodOptions | None = None, model_type: str = "") -> list[Stage]:
        """The stages to train (``options``: the defaults when ``None``; ``model_type`` resolves ``auto``)."""
        return self.stages(num_layers, options if options is not None else self.options(), model_type)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a training method to the registry (its name must be new)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered already")
    if not issubclass(method.options, MethodOptions):
        raise TypeError(f"{method.name}: options must subclass MethodOptions")
    METHODS[method.name] = method
    return method


def build(name: str, num_layers: int, options: MethodOptions | None = None, model_type: str = "") -> list[Stage]:
    """The stages of method ``name``; ``ValueError`` for an unknown method or unusable options."""
    if name not in METHODS:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name].build(num_layers, options, model_type)


def parse_method(spec: str, num_layers: int | None = None) -> tuple[str, int]:
    """``name`` or ``name:N`` (a method that takes a layer count) -> (objective, layers or 0)."""
    name, _, layers = spec.partition(":")
    if name not in METHODS:
        known = ", ".join(METHODS)
        raise LayerExitError(f"unknown method {spec!r}; known: {known} (static as static:N)")
    if METHODS[name].takes_layers:
        if not layers.isdigit() or int(layers) < 1:
            raise LayerExitError(f"method {spec!r}: write a static model as {name}:N with N >= 1 layers")
        return name, int(layers)
    if layers:
        raise LayerExitError(f"method {spec!r}: only static takes a layer count")
    return name, 0


def objective_help() -> str:
    return "; ".join(f"{m.name}: {m.help}" for m in METHODS.values())


def labels() -> dict[str, str]:
    """Each labelled method's row label in comparisons."""
    return {m.name: m.label for m in METHODS.values() if m.label}


def native_strategies() -> dict[str, str]:
    """Each method's own strategy family, for the methods that have one."""
    return {m.name: m.native_strategy for m in METHODS.values() if m.native_strategy}


def markdown_table() -> str:
    """The methods as a Markdown table (name, label, own strategy, what it trains, options)."""
    lines = ["| method | label | own strategy | what it trains | options |", "|---|---|---|---|---|"]
    for m in METHODS.values():
        flags = ", ".join(
            f"`{f.metadata.get('flag') or '--' + f.name.replace('_', '-')}` ({f.default!r})" for f in fields(m.options)
        )
        lines.append(f"| `{m.name}` | {m.display} | {m.native_strategy or ''} | {m.help} | {flags} |")
    return "\n".join(lines)


# the stages' losses, over the logits of every exit (L, B, C)


def resolve_weighting(options: EnsembleOptions, model_type: str) -> losses.Weighting:
    """``auto``: uniform exit weights for ALBERT (one layer shared across depth), linear i / sum(i) for
    every other encoder: the paper's recipe (its Appendix A.4 found uniform weights poor on BERT)."""
    if options.weighting != "auto":
        return options.weighting
    return "uniform" if model_type == "albert" else "linear"


def ensemble_loss(logits: Tensor, labels: Tensor, *, options: EnsembleOptions, weighting: losses.Weighting) -> Tensor:
    rel_w, div_w = losses.ensemble_weights(logits.shape[0], weighting, options.drop_last_diversity, logits.device)
    return losses.ensemble(
        logits,
        labels,
        lam=options.lam,
        relevancy_weights=rel_w,
        diversity_weights=div_w,
        detach_teacher=options.detach_teacher,
        min_over=options.min_over,
    )


def internal_relevancy(logits: Tensor, labels: Tensor) -> Tensor:
    return losses.relevancy(logits[:-1], labels)


def internal_distillation(logits: Tensor, labels: Tensor) -> Tensor:
    return losses.distillation(logits)


def linear_relevancy(logits: Tensor, labels: Tensor) -> Tensor:
    return losses.relevancy(logits, labels, losses.layer_weights(logits.shape[0], "linear", logits.device))


def fit_temperature(logits: Tensor, labels: Tensor, steps: int = 100) -> float:
    """The temperature T minimising the dev NLL of softmax(logits / T) (Guo et al., 2017). logits: (N, C)."""
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def exit_temperatures(logits: Tensor, labels: Tensor) -> list[float]:
    """One temperature per exit, each fitted on its own dev logits: (L, N, C) -> [T_1, ..., T_L]."""
    return [fit_temperature(layer_logits, labels) for layer_logits in logits]


# the stages of each method


def teacher_every_exit(logits: Tensor, teacher: Tensor) -> Tensor:
    return losses.teacher_distillation(logits, teacher)


def teacher_last_exit(logits: Tensor, teacher: Tensor) -> Tensor:
    return losses.teacher_distillation(logits[-1:], teacher)


def _every(num_layers: int) -> tuple[int, ...]:
    return tuple(range(1, num_layers + 1))


def _finetune(num_layers: int) -> Stage:
    return Stage("finetune", losses.final_exit_ce, "all", num_layers, (num_layers,))


def _ensemble(num_layers: int, options: EnsembleOptions, model_type: str) -> list[Stage]:
    weighting = resolve_weighting(options, model_type)
    loss = partial(ensemble_loss, options=options, weighting=weighting)
    return [Stage("ensemble", loss, "all", num_layers, _every(num_layers))]


def _joint(name: str, loss: LossFn) -> StagesFn:
    return lambda num_layers, options, model_type: [Stage(name, loss, "all", num_layers, _every(num_layers))]


def _two_stage(name: str, loss: LossFn) -> StagesFn:
    def stages(num_layers: int, options: MethodOptions, model_type: str) -> list[Stage]:
        internal = _every(num_layers)[:-1]
        return [_finetune(num_layers), Stage(name, loss, "internal_exits", num_layers, internal)]

    return stages


def _static(num_layers: int, options: StaticOptions, model_type: str) -> list[Stage]:
    layers = options.static_layers
    if not 1 <= layers <= num_layers:
        raise ValueError(f"objective 'static' needs static_layers in [1, {num_layers}], got {layers}")
    return [Stage(f"static-{layers}", losses.final_exit_ce, "all", layers, (layers,))]


def _joint_distill(num_layers: int, options: JointDistillOptions, model_type: str) -> list[Stage]:
    joint = Stage(
        "distill-every-exit",
        teacher_every_exit,
        "all",
        num_layers,
        _every(num_layers),
        targets="teacher",
        equilibrium=options.equilibrium,
        alternate=teacher_last_exit if options.alternate else None,
    )
    return [_finetune(num_layers), joint]


def _retrofit(num_layers: int, options: MethodOptions, model_type: str) -> list[Stage]:
    internal = _every(num_layers)[:-1]
    return [_finetune(num_layers), Stage("exits-on-cached-states", None, "cached_exits", num_layers, internal)]


register_method(
    Method(
        "ensemble",
        "the paper: relevancy - lambda * diversity over all exits",
        _ensemble,
        options=EnsembleOptions,
        label="ours (ensemble loss)",
        native_strategy=Voting.name,
        also_plotted=(Patience.name,),
        settings=lambda o: f"λ = {o.lam:g}",
    )
)
register_method(
    Method(
        "relevancy",
        "cross-entropy at every exit, uniform weights (lambda = 0)",
        _joint("relevancy", losses.relevancy),
        label="relevancy only",
        native_strategy=Patience.name,
    )
)
register_method(
    Method(
        "pabee",
        "PABEE: cross-entropy at every exit weighted by layer index",
        _joint("pabee", linear_relevancy),
        label="PABEE",
        native_strategy=Patience.name,
    )
)
register_method(
    Method(
        "finetune",
        "plain fine-tuning of the backbone and the final exit only",
        lambda num_layers, options, model_type: [_finetune(num_layers)],
        label="full model (fine-tuned)",
        trains_internal_exits=False,
    )
)
register_method(
    Method(
        "deebert",
        "DeeBERT: fine-tune backbone + final exit, then train the internal exits on a frozen backbone",
        _two_stage("internal-exits", internal_relevancy),
        label="DeeBERT",
        native_strategy=Entropy.name,
        first_stage="finetune",
    )
)
register_method(
    Method(
        "fastbert",
        "FastBERT: fine-tune backbone + final exit, then distil the final exit into the internal ones",
        _two_stage("self-distillation", internal_distillation),
        label="FastBERT",
        native_strategy=Entropy.name,
        first_stage="finetune",
    )
)
register_method(
    Method(
        "righttool",
        "RightTool: relevancy (uniform), then per-exit temperatures fitted on dev",
        _joint("righttool", losses.relevancy),
        label="RightTool",
        native_strategy=MaxProb.name,
        after_training=exit_temperatures,
    )
)
register_method(
    Method(
        "static",
        "a model cut to its first `static_layers` layers with one classifier",
        _static,
        options=StaticOptions,
        takes_layers=True,
    )
)
register_method(
    Method(
        "joint-distill",
        "plain fine-tuning, then the whole model trained again with every exit, the last included, distilled "
        "towards the frozen fine-tuned model's answers (gradient equilibrium; BERxiT's alternating steps optional)",
        _joint_distill,
        options=JointDistillOptions,
        label="joint, distilled from the fine-tuned model",
        native_strategy=Entropy.name,
        first_stage="finetune",
        settings=lambda o: ("GE" if o.equilibrium else "no GE") + (", alternating" if o.alternate else ""),
    )
)
register_method(
    Method(
        "retrofit",
        "plain fine-tuning, then internal exits distilled from the final exit on the frozen encoder's cached "
        "states (`layerexit retrofit` does the second stage for a classifier you already have)",
        _retrofit,
        options=RetrofitOptions,
        label="retrofit (frozen fine-tuned encoder)",
        native_strategy=Entropy.name,
        first_stage="finetune",
    )
)
