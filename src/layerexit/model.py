"""The early-exit model: a Hugging Face encoder with an internal classifier after every layer.

The encoder is wrapped, never copied (:mod:`layerexit.backbones` runs it layer by layer). The
classifier after layer L is the model's ordinary final classifier: exiting at L is the full model.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, cast

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from layerexit.atomic import fsync_path, read_json_object, replacing, save_safetensors, write_json
from layerexit.backbones import Backbone, without_pooler, wrap
from layerexit.errors import LayerExitError
from layerexit.pooling import POOLINGS, Pooling, pool, pooled_size, second_text

HeadKind = Literal["mlp", "linear"]
FinalHead = Literal["exit", "native"]

CONFIG_NAME = "layerexit.json"
WEIGHTS_NAME = "model.safetensors"
BACKBONE_DIR = "backbone"
FORMAT_VERSION = 1


@dataclass
class ExitConfig:
    """Everything needed to rebuild an early-exit model around its backbone."""

    backbone: str
    """Hub name or local folder the encoder came from (an alias such as ``minilm-l6`` is kept)."""
    num_labels: int
    head: HeadKind = "mlp"
    """``mlp``: the paper's one-hidden-layer classifier; ``linear``: PABEE's single linear layer."""
    pooling: Pooling = "mean"
    """``mean`` over the attention mask, the ``first`` token's state, the ``last`` real token's (decoders), or
    ``pair`` features of a two-text input (:mod:`layerexit.pooling`)."""
    separator_id: int | None = None
    """The token id that ends the first text of a pair (the tokenizer's ``sep_token_id``): ``pair`` needs it."""
    dropout: float = 0.1
    label_names: list[str] = field(default_factory=list)
    num_layers: int = 0
    """Set from the backbone when the model is built; checked again on load."""
    backbone_revision: str | None = None
    temperatures: list[float] = field(default_factory=list)
    """Per-exit softmax temperatures (RightTool's calibration); empty means 1 everywhere."""
    final_head: FinalHead = "exit"
    """``exit``: the last exit is an exit like the others; ``native``: it is the head of the fine-tuned
    classifier the model was retrofitted to (:mod:`layerexit.native_heads`), so full depth answers as it does."""
    final_pooling: Pooling | None = None
    """The last exit's pooling where it differs from the internal exits' (``None``: the same): the last exit of
    a fine-tuned run kept by ``layerexit retrofit`` while new internal exits pool otherwise."""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.num_labels < 2:
            raise LayerExitError(f"num_labels must be at least 2, got {self.num_labels}")
        if self.head not in ("mlp", "linear"):
            raise LayerExitError(f"head must be 'mlp' or 'linear', got {self.head!r}")
        if self.pooling not in POOLINGS:
            raise LayerExitError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.final_pooling is not None and self.final_pooling not in POOLINGS:
            raise LayerExitError(f"final_pooling must be one of {', '.join(POOLINGS)}, got {self.final_pooling!r}")
        if self.reads_pairs and self.separator_id is None:
            raise LayerExitError("pair pooling needs separator_id: the token that ends the first text")
        if self.final_head not in ("exit", "native"):
            raise LayerExitError(f"final_head must be 'exit' or 'native', got {self.final_head!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LayerExitError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.label_names and len(self.label_names) != self.num_labels:
            raise LayerExitError(f"{len(self.label_names)} label names given for {self.num_labels} labels")
        if self.temperatures and (
            len(self.temperatures) != self.num_layers or not all(t > 0 for t in self.temperatures)
        ):
            raise LayerExitError(f"temperatures must be {self.num_layers} positive numbers, got {self.temperatures}")
        if self.format_version != FORMAT_VERSION:
            raise LayerExitError(
                f"model format version {self.format_version} is not supported (expected {FORMAT_VERSION})"
            )

    @property
    def reads_pairs(self) -> bool:
        """Whether some exit pools text pairs (and so reads the second text's tokens)."""
        return "pair" in (self.pooling, self.final_pooling)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ExitConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LayerExitError(f"{source}: unknown keys {unknown}; expected some of {sorted(known)}")
        kinds: dict[str, Any] = {"backbone": str, "num_labels": int, "num_layers": int, "format_version": int}
        kinds.update(dropout=(int, float), head=str, pooling=str, final_head=str)
        if data.get("separator_id") is not None:
            kinds["separator_id"] = int
        if data.get("final_pooling") is not None:
            kinds["final_pooling"] = str
        for key, kind in kinds.items():
            if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
                raise LayerExitError(f"{source}: {key} has the wrong type ({data[key]!r})")
        for key, kind in (("label_names", str), ("temperatures", (int, float))):
            value = data.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
                raise LayerExitError(f"{source}: {key} must be a list of {'strings' if kind is str else 'numbers'}")
        try:
            return cls(**data)
        except TypeError as err:  # a required key is missing
            raise LayerExitError(f"{source}: {err}") from None


@dataclass
class EarlyExitOutput:
    """What a full forward pass returns: the logits of every exit."""

    logits: Tensor
    """(L, B, C): exit i's logits are ``logits[i - 1]``."""

    @property
    def probs(self) -> Tensor:
        return self.logits.float().softmax(-1)  # (L, B, C)


class ExitHead(nn.Module):
    """An internal classifier: pooling, then a linear layer or a one-hidden-layer MLP (H hidden units)."""

    def __init__(self, hidden_size: int, num_labels: int, head: HeadKind, pooling: Pooling, dropout: float):
        super().__init__()
        self.pooling = pooling
        width = pooled_size(hidden_size, pooling)
        self.dropout = nn.Dropout(dropout)
        self.hidden: nn.Linear | None = nn.Linear(width, hidden_size) if head == "mlp" else None
        self.classifier = nn.Linear(hidden_size if head == "mlp" else width, num_labels)
        self.temperature = 1.0

    def forward(self, hidden: Tensor, padding_mask: Tensor, second: Tensor | None = None) -> Tensor:
        """``second``: the second text's tokens (B, T), for ``pair`` pooling."""
        return self.classify(pool(hidden, padding_mask, self.pooling, second))

    def classify(self, pooled: Tensor) -> Tensor:
        """Logits from the pooled state (B, H or 4H): what training on cached pooled states calls."""
        training = self.training  # in eval, dropout is the identity: not even called (batch-1 latency)
        x = self.dropout(pooled) if training else pooled  # (B, H)
        if self.hidden is not None:
            x = torch.tanh(self.hidden(x))  # (B, H)
            x = self.dropout(x) if training else x
        logits = self.classifier(x)  # (B, C)
        return logits if self.temperature == 1.0 else logits / self.temperature


class ScaleGradient(torch.autograd.Function):
    """The identity forward; the gradient times ``scale`` backward (gradient equilibrium)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class EarlyExitModel(nn.Module):
    """An encoder with one exit per layer. ``forward`` runs every layer (training, offline replay);
    :mod:`layerexit.runtime.loop` runs only the layers each sample needs."""

    def __init__(self, backbone: Backbone, config: ExitConfig, final: nn.Module | None = None) -> None:
        """``final``: the fine-tuned classifier's own head as the last exit (``config.final_head == "native"``)."""
        super().__init__()
        if (final is not None) != (config.final_head == "native"):
            raise LayerExitError("a native final head is given exactly when config.final_head is 'native'")
        if config.num_layers not in (0, backbone.num_layers):
            raise LayerExitError(
                f"config has {config.num_layers} exits but the backbone has {backbone.num_layers} layers"
            )
        config.num_layers = backbone.num_layers
        self.config = config
        self.backbone = backbone
        poolings = [config.pooling] * (backbone.num_layers - 1) + [config.final_pooling or config.pooling]
        self.exits = nn.ModuleList(
            ExitHead(backbone.hidden_size, config.num_labels, config.head, how, config.dropout) for how in poolings
        )
        if final is not None:
            self.exits[-1] = final
        if config.temperatures:
            self.set_temperatures(config.temperatures)

    def set_temperatures(self, temperatures: list[float]) -> None:
        """Divide exit i's logits by ``temperatures[i]`` from now on (and save them with the model)."""
        if len(temperatures) != self.num_layers or not all(t > 0 for t in temperatures):
            raise LayerExitError(f"temperatures must be {self.num_layers} positive numbers, got {temperatures}")
        self.config.temperatures = [float(t) for t in temperatures]
        for head, t in zip(self.exits, temperatures, strict=True):
            cast(ExitHead, head).temperature = float(t)  # a NativeHead has the same attribute

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    def second_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor | None:
        """The second text's tokens (B, T) where some exit pools pairs, else ``None``: computed once per batch."""
        if not self.config.reads_pairs:
            return None
        assert self.config.separator_id is not None  # ExitConfig checks it
        return second_text(input_ids, attention_mask, self.config.separator_id)

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    @classmethod
    def from_backbone(
        cls, name_or_path: str, num_labels: int, *, seed: int | None = None, **config: Any
    ) -> EarlyExitModel:
        """A new model around a pretrained encoder (alias, local folder or hub name); exits are fresh."""
        from transformers import AutoModel

        from layerexit.assets import resolve_encoder

        path = resolve_encoder(name_or_path)
        try:
            encoder = without_pooler(AutoModel.from_pretrained(path, use_safetensors=True))  # never a pickle
        except OSError as err:
            raise LayerExitError(f"cannot load encoder {name_or_path!r}: {err}") from None
        if seed is not None:
            torch.manual_seed(seed)
        exit_config = ExitConfig(
            backbone=name_or_path,
            num_labels=num_labels,
            backbone_revision=getattr(encoder.config, "_commit_hash", None),
            **config,
        )
        return cls(wrap(encoder), exit_config)

    @classmethod
    def from_classifier(cls, name_or_path: str, *, seed: int | None = None, **config: Any) -> EarlyExitModel:
        """Exits around a fine-tuned sequence classifier (local folder or hub name): its encoder, and its own
        head as the last exit, unchanged; the internal exits are fresh. Labels and their names are its own.
        ``pooling="auto"`` pools the last token of a decoder and the mean of an encoder's tokens."""
        from transformers import AutoModelForSequenceClassification

        from layerexit.native_heads import label_names, split_classifier

        try:
            classifier = AutoModelForSequenceClassification.from_pretrained(name_or_path, use_safetensors=True)
        except (OSError, ValueError) as err:
            raise LayerExitError(
                f"cannot load a sequence classifier from {name_or_path!r} (safetensors weights are needed): {err}"
            ) from None
        encoder, head = split_classifier(classifier)
        backbone = wrap(encoder)
        if config.get("pooling", "auto") == "auto":
            config["pooling"] = "last" if backbone.causal else "mean"
        if seed is not None:
            torch.manual_seed(seed)
        names = label_names(classifier.config)
        exit_config = ExitConfig(
            backbone=name_or_path,
            num_labels=len(names),
            label_names=names,
            backbone_revision=getattr(classifier.config, "_commit_hash", None),
            final_head="native",
            **config,
        )
        return cls(backbone, exit_config, final=head).eval()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
        depth: int | None = None,
        equilibrium: bool = False,
    ) -> EarlyExitOutput:
        """Run the first ``depth`` layers (all by default) and every exit among them.

        ``equilibrium`` (training): gradient equilibrium (Li et al., 2019; ElasticBERT). Where layer i's
        output splits into its exit and the deeper layers, with r exits from i on, the exit's gradient is
        scaled by 1/r and the deeper path's by (r-1)/r, so each layer receives the mean of the gradients of
        the exits above it rather than their sum. The forward values are unchanged.
        """
        backbone = self.backbone
        hidden = backbone.embed(input_ids, attention_mask, token_type_ids)  # (B, T, H)
        kwargs = backbone.layer_kwargs(hidden, attention_mask)
        second = self.second_text(input_ids, attention_mask)
        logits = []
        n = depth or self.num_layers
        for i in range(n):
            hidden = backbone.layer(i, hidden, kwargs)  # (B, T, H)
            into_exit = hidden
            if equilibrium and i < n - 1:
                r = n - i  # exits from this layer on
                into_exit = ScaleGradient.apply(hidden, 1.0 / r)
                hidden = ScaleGradient.apply(hidden, (r - 1) / r)
            logits.append(self.exits[i](into_exit, attention_mask, second))  # (B, C)
        return EarlyExitOutput(logits=torch.stack(logits))  # (depth, B, C)

    def save_pretrained(self, directory: str | os.PathLike[str], tokenizer: Any = None) -> None:
        """Write ``layerexit.json``, ``model.safetensors`` and ``backbone/`` (its config, tokenizer).

        Files are written under temporary names and renamed, so a crash leaves the old ones whole.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        staging = out / (BACKBONE_DIR + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir()
            self.backbone.model.config.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            (out / BACKBONE_DIR).mkdir(exist_ok=True)
            for file in sorted(staging.iterdir()):
                fsync_path(file)
                os.replace(file, out / BACKBONE_DIR / file.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        with replacing(out / WEIGHTS_NAME) as tmp:
            save_safetensors(state, tmp, metadata={"format": "pt", "layerexit_format": str(FORMAT_VERSION)})
        write_json(out / CONFIG_NAME, self.config.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> EarlyExitModel:
        """Load a model saved by :meth:`save_pretrained`. Only safetensors are read, never pickle."""
        from transformers import AutoConfig, AutoModel

        folder = Path(directory)
        config_path = folder / CONFIG_NAME
        weights_path = folder / WEIGHTS_NAME
        if not folder.is_dir():
            raise LayerExitError(f"{folder}: no such folder")
        for needed in (config_path, weights_path, folder / BACKBONE_DIR / "config.json"):
            if not needed.is_file():
                raise LayerExitError(f"{folder} is not a saved layerexit model: {needed.name} is missing")
        config = ExitConfig.from_dict(
            read_json_object(config_path, "the exits' configuration"), source=str(config_path)
        )
        backbone_path = folder / BACKBONE_DIR / "config.json"
        read_json_object(
            backbone_path, "the encoder's configuration"
        )  # a truncated or damaged file gets a plain message
        try:
            backbone_config = AutoConfig.from_pretrained(folder / BACKBONE_DIR)
        except Exception as err:  # transformers raises many types for a config it cannot use
            raise LayerExitError(
                f"{backbone_path}: not an encoder configuration ({type(err).__name__}: {err})"
            ) from None
        # Counts and shapes first, from the file's header and a model without memory: a damaged
        # configuration (a billion labels, a hundred thousand layers) is refused before it costs anything.
        header = _header(weights_path)
        layers = getattr(backbone_config, "num_hidden_layers", None)
        if isinstance(layers, int) and config.num_layers not in (0, layers):
            raise LayerExitError(f"config has {config.num_layers} exits but the backbone has {layers} layers")
        if isinstance(layers, int):
            _check_counts(header, layers, config.num_labels, weights_path)

        def build(device: str) -> EarlyExitModel:
            with torch.device(device):
                try:
                    fresh = replace(config, temperatures=list(config.temperatures))
                    if config.final_head == "native":
                        from transformers import AutoModelForSequenceClassification

                        from layerexit.native_heads import split_classifier

                        encoder, head = split_classifier(
                            AutoModelForSequenceClassification.from_config(backbone_config)
                        )
                        return cls(wrap(encoder), fresh, final=head)
                    encoder = without_pooler(AutoModel.from_config(backbone_config))
                    return cls(wrap(encoder), fresh)
                except LayerExitError:
                    raise
                except Exception as err:  # transformers and torch raise many types for sizes they cannot use
                    why = f"{type(err).__name__}: {err}"
                    raise LayerExitError(f"{backbone_path}: cannot build the encoder ({why})") from None

        check_state(build("meta"), header, weights_path)
        model = build("cpu")
        try:
            state = load_file(str(weights_path))
        except Exception as err:  # safetensors raises its own error types for truncated files
            raise LayerExitError(f"{weights_path}: not a readable safetensors file ({err})") from None
        check_state(model, state, weights_path)
        model.load_state_dict(state)
        return model.eval()


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _header(path: Path) -> dict[str, Tensor]:
    """The tensors a safetensors file declares, as empty (meta) tensors: names, shapes, dtypes; no data read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            declared = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise LayerExitError(f"{path}: not a readable safetensors file ({err})") from None
    unknown = sorted({dtype for _, dtype in declared.values()} - set(_DTYPES))
    if unknown:
        raise LayerExitError(f"{path}: unsupported tensor types {unknown}")
    return {k: torch.empty(shape, dtype=_DTYPES[dtype], device="meta") for k, (shape, dtype) in declared.items()}


def check_state(model: EarlyExitModel, state: dict[str, Tensor], path: Path) -> None:
    """Refuse weights that are not exactly this model's: other exits, labels, names, shapes or kinds."""
    _check_counts(state, model.num_layers, model.num_labels, path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LayerExitError(
            f"{path}: weights do not match the model "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise LayerExitError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key].shape)}"
            )
        if tensor.is_floating_point() != expected[key].is_floating_point():
            raise LayerExitError(f"{path}: {key} is {tensor.dtype}, the model expects {expected[key].dtype}")


def _check_counts(state: dict[str, Tensor], num_layers: int, num_labels: int, path: Path) -> None:
    """The number of exits and of labels the weights are for."""
    exits = {k.split(".")[1] for k in state if k.startswith("exits.")}
    if exits and len(exits) != num_layers:
        raise LayerExitError(f"{path}: the weights have {len(exits)} exits, the model has {num_layers}")
    final = state.get(f"exits.{num_layers - 1}.classifier.weight")
    if final is not None and final.dim() == 2 and final.shape[0] != num_labels:
        raise LayerExitError(
            f"{path}: the weights are for {final.shape[0]} labels, the configuration says {num_labels}"
        )
