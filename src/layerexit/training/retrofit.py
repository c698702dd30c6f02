"""Retrofit: internal exits for a classifier the user already has, its encoder frozen, its head kept.

``layerexit retrofit CLASSIFIER --task DATA`` loads a fine-tuned sequence classifier, keeps its own head
as the last exit (:mod:`layerexit.native_heads`), runs its frozen encoder once over the training texts,
keeps every layer's pooled state and the classifier's own logits, and then trains each internal exit on
those cached states for as many epochs as it needs: seconds per epoch, not an encoder pass each. Each
exit keeps the epoch whose loss on a held-out share of the training texts is lowest.

The classifier may also be a layerexit run folder, such as a plain ``--objective finetune`` run: its last
exit is kept as the classifier's head is, with its own pooling.

The exits learn from the classifier's own output distribution (``--loss distill``, no labels needed),
from the labels (``labels``), or from both (``both``, the mean of the two losses). Texts without labels
(a ``.txt`` file, or ``--label-column ''``) are labelled by the classifier itself: evaluation then
reports agreement with it as the accuracy. The result is an ordinary run folder.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from layerexit.config import TrainConfig, check_types, option, save_config
from layerexit.data.encoding import Encoded, batches, encode_split, load_tokenizer, separator_id, tokenizer_separator
from layerexit.errors import LayerExitError
from layerexit.methods import RetrofitOptions
from layerexit.metrics import per_layer_scores
from layerexit.model import BACKBONE_DIR, CONFIG_NAME, EarlyExitModel, ExitHead
from layerexit.pooling import POOLINGS, Pooling, pool, pooled_size, second_text
from layerexit.run_folder import RunFolder
from layerexit.runtime.loop import model_probs
from layerexit.training.recipe import is_decoder, seed_everything


@dataclass
class RetrofitConfig:
    """The options of ``layerexit retrofit``; saved as ``retrofit.json`` beside the run's ``config.json``."""

    classifier: str = option(
        "",
        "the fine-tuned sequence classifier: a local folder (save_pretrained), a hub name, or a layerexit run folder "
        "(a `--objective finetune` run: its last exit is kept)",
    )
    task: str = option(
        "",
        "texts to train the exits on: a built-in task, a CSV/TSV/JSONL file or folder (with labels, or without: "
        "--label-column ''), or a .txt file of one text per line",
    )
    output: str = option("", "run folder to create (default: runs/<task>-<classifier>-retrofit-seed<seed>)")
    loss: Literal["distill", "labels", "both"] = option(
        "distill",
        "what the exits learn: the classifier's own output distribution (distill, needs no labels), the labels, "
        "or the mean of both (chosen on dev: docs/retrofit.md)",
    )
    head: Literal["mlp", "linear"] = option("mlp", "internal exits: one-hidden-layer MLP or linear")
    pooling: Literal["auto", "mean", "first", "last", "pair"] = option(
        "auto",
        "how an internal exit pools its layer's tokens; auto = the last token for decoders, pair features for text "
        "pairs (when the tokenizer has a separator token), else the mean (chosen on dev: docs/retrofit.md)",
    )
    epochs: int = option(
        100, "epochs over the cached states; each exit keeps its best epoch on the held-out share (docs/retrofit.md)"
    )
    lr: float = option(2e-3, "peak learning rate of AdamW for the exits (chosen on dev: docs/retrofit.md)")
    batch_size: int = option(128, "exit training batch size (cached states)")
    weight_decay: float = option(0.01, "AdamW weight decay")
    exit_dropout: float = option(0.1, "dropout inside the internal exits")
    holdout: float = option(0.1, "share of the training texts held out to choose each exit's epoch")
    max_length: int = option(128, "tokens per input (longer inputs are truncated, as the classifier's pipeline does)")
    eval_batch_size: int = option(64, "batch size of the encoder pass")
    max_train: int = option(0, "use at most this many training texts (0: all)")
    max_eval: int = option(0, "use at most this many dev and test texts each (0: all)")
    text_column: str = option("text", "column of the text, for data files")
    text_pair_column: str = option("", "column of the second text of a pair, for data files")
    label_column: str = option("label", "column of the label, for data files ('': the texts have no labels)")
    seed: int = option(0, "random seed (exit weights, data order, dropout)")
    data_seed: int = option(0, "seed of the --max-train / --max-eval subsets")
    threads: int = option(0, "torch threads (0: torch's default)")

    def __post_init__(self) -> None:
        check_types(self)
        checks = [
            (bool(self.classifier), "give the fine-tuned classifier (a folder or a hub name)"),
            (bool(self.task), "give --task: the texts to train the exits on"),
            (self.loss in ("distill", "labels", "both"), f"--loss must be distill, labels or both, got {self.loss!r}"),
            (self.head in ("mlp", "linear"), f"--head must be mlp or linear, got {self.head!r}"),
            (
                self.pooling in ("auto", *POOLINGS),
                f"--pooling must be auto, {', '.join(POOLINGS)}, got {self.pooling!r}",
            ),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}"),
            (self.batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be >= 1"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.exit_dropout < 1, f"--exit-dropout must be in [0, 1), got {self.exit_dropout}"),
            (0 < self.holdout < 0.5, f"--holdout must be in (0, 0.5), got {self.holdout}"),
            (self.max_length >= 8, f"--max-length must be >= 8, got {self.max_length}"),
            (self.max_train >= 0 and self.max_eval >= 0, "--max-train and --max-eval must be >= 0"),
            (self.threads >= 0, "--threads must be >= 0"),
            (0 <= self.seed < 2**32 and 0 <= self.data_seed < 2**32, "seeds must be in [0, 2**32)"),
        ]
        for ok, message in checks:
            if not ok:
                raise LayerExitError(message)

    def resolve_pooling(self, decoder: bool, pairs: bool, tokenizer: Any) -> Pooling:
        return exit_pooling(self.pooling, decoder, pairs, tokenizer, self.task)

    def run_name(self) -> str:
        return f"{self.train_config('').slug()}-retrofit-seed{self.seed}"

    def train_config(self, output: str) -> TrainConfig:
        """The run's ``config.json``: what evaluation, serving and the report read from any run."""
        return TrainConfig(
            model=self.classifier,
            task=self.task,
            output=output,
            objective="retrofit",
            head=self.head,
            pooling=self.pooling,
            epochs=self.epochs,
            head_lr=self.lr,
            batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size,
            max_length=self.max_length,
            weight_decay=self.weight_decay,
            max_train=self.max_train,
            max_eval=self.max_eval,
            text_column=self.text_column,
            text_pair_column=self.text_pair_column,
            label_column=self.label_column,
            seed=self.seed,
            data_seed=self.data_seed,
            threads=self.threads,
            exit_dropout=self.exit_dropout,
        )


def exit_pooling(choice: str, decoder: bool, pairs: bool, tokenizer: Any, task: str) -> Pooling:
    """The internal exits' pooling. ``auto``: a decoder's last token; the pair features for text pairs where
    the tokenizer separates the two texts (chosen on dev: docs/retrofit.md); else the mean."""
    if choice != "auto":
        if choice == "pair" and not pairs:
            raise LayerExitError(f"pair pooling is for inputs of two texts; {task} has single texts")
        return cast(Pooling, choice)
    if decoder:
        return "last"
    return "pair" if pairs and tokenizer_separator(tokenizer) is not None else "mean"


@dataclass
class Cache:
    """What the frozen encoder computed once: pooled states of the internal layers and the classifier's logits."""

    states: Tensor
    """(L - 1, N, H) float32 (4H for pair pooling): the pooled state after each internal layer."""
    reference: Tensor
    """(N, C): the classifier's own logits (the last exit)."""

    def rows(self, index: Tensor) -> Cache:
        return Cache(self.states[:, index], self.reference[index])


def holdout_split(n: int, share: float, seed: int) -> tuple[Tensor, Tensor]:
    """(held-out rows, training rows) of ``n`` cached texts: a seeded ``share`` held out to pick each exit's epoch."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = max(1, round(share * n))
    if n - held < 1:
        raise LayerExitError(f"{n} training text(s) are too few to hold some out")
    return order[:held], order[held:]


@torch.inference_mode()
def cache_states(
    model: EarlyExitModel,
    data: Encoded,
    batch_size: int,
    pad_id: int,
    progress: bool,
    poolings: tuple[Pooling, ...] | None = None,
) -> dict[str, Cache]:
    """One pass of the frozen encoder over ``data``, in batches of similar lengths: for each pooling (the
    exits' own by default), the pooled states of the internal layers, and the classifier's logits."""
    model.eval()
    n, layers = len(data), model.num_layers
    poolings = poolings or (cast(ExitHead, model.exits[0]).pooling,)
    separator = model.config.separator_id  # pair pooling without it fails in pool()
    hidden_size = model.backbone.hidden_size
    states = {how: torch.empty(layers - 1, n, pooled_size(hidden_size, how)) for how in poolings}
    reference = torch.empty(n, model.num_labels)
    bar = tqdm(total=n, desc="encoder pass", unit="text", disable=not progress)
    for batch in batches(data, batch_size, pad_id, by_length=True):
        ids, mask, rows = batch["input_ids"], batch["attention_mask"], batch["index"]
        second = second_text(ids, mask, separator) if separator is not None else None
        hidden = model.backbone.embed(ids, mask, batch.get("token_type_ids"))
        kwargs = model.backbone.layer_kwargs(hidden, mask)
        for i in range(layers):
            hidden = model.backbone.layer(i, hidden, kwargs)
            if i < layers - 1:
                for how in poolings:
                    states[how][i, rows] = pool(hidden, mask, how, second).float()
        reference[rows] = model.exits[-1](hidden, mask, second).float()
        bar.update(len(rows))
    bar.close()
    return {how: Cache(states[how], reference) for how in poolings}


def check_cache_fits(texts: int, layers: int, hidden: int, share: float = 0.5) -> None:
    """Refuse, before the encoder pass, a cache of pooled states larger than ``share`` of this machine's memory."""
    need = texts * layers * hidden * 4  # float32
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every system says
        return
    if need > share * memory:
        raise LayerExitError(
            f"the cached states of {texts:,} training texts ({layers} layers x {hidden} values each) need "
            f"{need / 2**30:.1f} GiB, more than half of this machine's {memory / 2**30:.0f} GiB; "
            f"use --max-train {int(share * memory / (layers * hidden * 4)):,} or fewer"
        )


def is_run_model(path: str) -> bool:
    """Whether ``path`` is a layerexit run folder (its model saved by ``save_pretrained``), not a classifier."""
    return (Path(path) / CONFIG_NAME).is_file()


def keep_last_exit(
    model: EarlyExitModel, head: str, pooling: Pooling, separator: int | None, dropout: float, seed: int, where: str
) -> None:
    """A layerexit run as the classifier (a ``--objective finetune`` run, say): its last exit, trained with the
    encoder, stays as it is; its internal exits are made afresh with retrofit's options. The last exit keeps its
    own pooling (``final_pooling`` in ``layerexit.json``) where the new internal exits pool otherwise."""
    last = model.exits[-1]
    if model.config.temperatures and any(t != 1.0 for t in model.config.temperatures):
        raise LayerExitError(f"{where}: the run's exits have temperatures; retrofit needs a run without them")
    if isinstance(last, ExitHead) and (last.hidden is not None) != (head == "mlp"):
        kind = "mlp" if last.hidden is not None else "linear"
        raise LayerExitError(
            f"{where}: the run's last exit is a {kind} head and retrofit keeps it; give --head {kind} for the "
            "internal exits too"
        )
    kept = last.pooling if isinstance(last, ExitHead) else None
    model.config.final_pooling = kept if kept != pooling else None
    if separator is not None:
        model.config.separator_id = separator
    fresh_exits(model, head, pooling, dropout, seed)
    model.eval()


def fresh_exits(model: EarlyExitModel, head: str, pooling: Pooling, dropout: float, seed: int) -> None:
    """Replace the internal exits by new ones (the last exit, the classifier's head, stays); ``pair`` pooling
    needs the model's ``config.separator_id``."""
    if pooling == "pair" and model.config.separator_id is None:
        raise LayerExitError("pair pooling needs the model's separator_id")
    torch.manual_seed(seed)
    for i in range(model.num_layers - 1):
        model.exits[i] = ExitHead(model.backbone.hidden_size, model.num_labels, cast(Any, head), pooling, dropout)
    model.config.head, model.config.pooling, model.config.dropout = cast(Any, head), pooling, dropout


def exit_loss(logits: Tensor, reference: Tensor, labels: Tensor, loss: str) -> Tensor:
    """The loss of one exit: KL divergence to the classifier's distribution, cross-entropy, or their mean."""
    log_probs = logits.float().log_softmax(-1)
    distill = F.kl_div(log_probs, reference.float().log_softmax(-1), reduction="batchmean", log_target=True)
    if loss == "distill":
        return distill
    hard = F.nll_loss(log_probs, labels)
    return hard if loss == "labels" else (distill + hard) / 2


def fit_exits(
    model: EarlyExitModel,
    train: Cache,
    train_labels: Tensor,
    held: Cache,
    held_labels: Tensor,
    config: RetrofitConfig,
    progress: bool,
) -> tuple[list[dict[str, Any]], list[list[float]]]:
    """Train the internal exits on cached states; each keeps its epoch of lowest held-out loss. Returns each
    exit's chosen epoch and loss, and the held-out loss of every exit after every epoch."""
    heads = [cast(ExitHead, model.exits[i]) for i in range(model.num_layers - 1)]
    params = [p for head in heads for p in head.parameters()]
    decay = [p for p in params if p.dim() > 1]
    rest = [p for p in params if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=config.lr
    )
    n = train.states.shape[1]
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = max(1, int(0.05 * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    generator = torch.Generator().manual_seed(config.seed)
    best: list[dict[str, Any]] = [{"epoch": 0, "loss": math.inf, "state": None} for _ in heads]
    history: list[list[float]] = []
    bar = tqdm(range(1, config.epochs + 1), desc="exits", unit="epoch", disable=not progress)
    for epoch in bar:
        for head in heads:
            head.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            rows = order[start : start + config.batch_size]
            reference, labels = train.reference[rows], train_labels[rows]
            loss = sum(
                exit_loss(head.classify(train.states[i, rows]), reference, labels, config.loss)
                for i, head in enumerate(heads)
            )
            optimizer.zero_grad(set_to_none=True)
            cast(Tensor, loss).backward()
            optimizer.step()
            scheduler.step()
        losses = held_out_losses(heads, held, held_labels, config.loss)
        history.append([round(x, 5) for x in losses])
        for i, value in enumerate(losses):
            if value < best[i]["loss"]:
                best[i] = {"epoch": epoch, "loss": value, "state": copy.deepcopy(heads[i].state_dict())}
        bar.set_postfix(held_out=f"{sum(losses) / len(losses):.4f}")
    for head, chosen in zip(heads, best, strict=True):
        head.load_state_dict(chosen["state"])
        head.eval()
    chosen_epochs = [
        {"exit": i + 1, "best_epoch": chosen["epoch"], "held_out_loss": round(chosen["loss"], 5)}
        for i, chosen in enumerate(best)
    ]
    return chosen_epochs, history


@torch.no_grad()
def held_out_losses(heads: list[ExitHead], held: Cache, labels: Tensor, loss: str) -> list[float]:
    values = []
    for i, head in enumerate(heads):
        head.eval()
        values.append(float(exit_loss(head.classify(held.states[i]), held.reference, labels, loss)))
    return values


def retrofit(config: RetrofitConfig, *, progress: bool = True) -> Path:
    """Add trained internal exits to ``config.classifier``; returns the new run folder."""
    run_dir = Path(config.output or Path("runs") / config.run_name())
    if run_dir.exists() and any(run_dir.iterdir()):
        raise LayerExitError(f"{run_dir} already exists and is not empty; choose another --output or remove it")
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    started = time.perf_counter()
    from_run = is_run_model(config.classifier)
    tokenizer = load_tokenizer(Path(config.classifier) / BACKBONE_DIR if from_run else config.classifier)
    train_config = config.train_config(str(run_dir))
    task = train_config.load_task()
    if from_run:
        model = EarlyExitModel.from_pretrained(config.classifier)
        pooling = config.resolve_pooling(model.backbone.causal, task.has_pairs, tokenizer)
        separator = separator_id(tokenizer) if pooling == "pair" else None
        where = f"{config.classifier}/{CONFIG_NAME}"
        keep_last_exit(model, config.head, pooling, separator, config.exit_dropout, config.seed, where)
    else:
        pooling = config.resolve_pooling(is_decoder(config.classifier), task.has_pairs, tokenizer)
        model = EarlyExitModel.from_classifier(
            config.classifier,
            seed=config.seed,
            head=config.head,
            pooling=pooling,
            separator_id=separator_id(tokenizer) if pooling == "pair" else None,
            dropout=config.exit_dropout,
        )
    positions = model.backbone.max_positions
    if positions is not None and config.max_length > positions:
        raise LayerExitError(f"--max-length {config.max_length} exceeds the classifier's {positions} positions")
    task = task.relabelled(list(model.config.label_names))
    if config.loss in ("labels", "both") and not task.labelled:
        raise LayerExitError(f"--loss {config.loss} needs labels, and {config.task} has none; use --loss distill")
    width = pooled_size(model.backbone.hidden_size, pooling)
    check_cache_fits(len(task.splits["train"]), model.num_layers - 1, width)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = encode_split(tokenizer, task.splits["train"], config.max_length, model.backbone.uses_token_type_ids)
    cache = cache_states(model, encoded, config.eval_batch_size, pad_id, progress)[model.config.pooling]
    encoder_seconds = time.perf_counter() - started
    labels = encoded.labels if task.labelled else cache.reference.argmax(-1)
    held_rows, train_rows = holdout_split(len(encoded), config.holdout, config.seed)
    exits, history = fit_exits(
        model, cache.rows(train_rows), labels[train_rows], cache.rows(held_rows), labels[held_rows], config, progress
    )
    seconds = time.perf_counter() - started

    run = RunFolder(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(train_config, run.config_file)
    run.write_json(run.retrofit_file, asdict(config))
    run.write_task(task, labels="given" if task.labelled else "reference")
    model.save_pretrained(run_dir, tokenizer)
    summary = {
        "method": "retrofit",
        "classifier": config.classifier,
        "train_texts": len(train_rows),
        "held_out_texts": len(held_rows),
        "labelled": task.labelled,
        "pooling": pooling,
        "encoder_pass_seconds": round(encoder_seconds, 1),
        "seconds": round(seconds, 1),
        "exits": exits,
        "held_out_loss_by_epoch": history,
        "config": asdict(config),
    }
    run.write_json(run.summary_file, summary)
    return run_dir


def fit_cached_stage(
    model: EarlyExitModel,
    name: str,
    config: TrainConfig,
    tokenizer: Any,
    train: Encoded,
    dev: Encoded,
    *,
    pairs: bool,
    metric: str,
    progress: bool,
) -> dict[str, Any]:
    """The retrofit method's second stage inside ``layerexit train``: the model's last exit (just fine-tuned)
    stays, its internal exits are made afresh and fitted on the frozen encoder's cached states exactly as
    ``layerexit retrofit`` fits them. Returns the stage's result for ``train_summary.json``."""
    options = config.method_options()
    if not isinstance(options, RetrofitOptions):
        raise LayerExitError(f"objective {config.objective!r} has no exits to fit on cached states")
    model.to("cpu")
    pooling = exit_pooling(options.exit_pooling, model.backbone.causal, pairs, tokenizer, config.task)
    separator = separator_id(tokenizer) if pooling == "pair" else None
    keep_last_exit(model, config.head, pooling, separator, config.exit_dropout, config.seed, config.output)
    fit = RetrofitConfig(
        classifier=config.output or "run",
        task=config.task,
        loss=options.exit_loss,
        head=config.head,
        epochs=options.exit_epochs,
        lr=options.exit_lr,
        weight_decay=config.weight_decay,
        exit_dropout=config.exit_dropout,
        seed=config.seed,
    )
    check_cache_fits(len(train), model.num_layers - 1, pooled_size(model.backbone.hidden_size, pooling))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cache = cache_states(model, train, config.eval_batch_size, pad_id, progress)[pooling]
    held_rows, train_rows = holdout_split(len(train), fit.holdout, fit.seed)
    exits, _ = fit_exits(
        model, cache.rows(train_rows), train.labels[train_rows], cache.rows(held_rows), train.labels[held_rows], fit,
        progress,
    )  # fmt: skip
    probs = model_probs(model, dev, config.eval_batch_size, pad_id, progress=progress)
    scores = per_layer_scores(probs, dev.labels, metric)
    return {
        "stage": name,
        "pooling": pooling,
        "exits": exits,
        "dev_scores": [round(s, 4) for s in scores],
        "train_texts": len(train_rows),
        "held_out_texts": len(held_rows),
    }  # no timings: a stage's result is the same however the run got there (train_summary.json has its seconds)
