"""The one seam that touches transformers internals: running an encoder one layer at a time.

Every architecture is reduced to three operations:

* ``embed(input_ids, padding_mask, token_type_ids)`` -> hidden states entering layer 1, ``(B, T, H)``;
* ``layer_kwargs(hidden, padding_mask)`` -> whatever each layer needs besides the hidden states
  (the attention mask in the format the model's own forward builds, relative position biases).
  It depends only on the batch's shape and padding: online inference rebuilds it after dropping rows;
* ``layer(i, hidden, kwargs)`` -> hidden states after layer ``i`` (0-based).

The parity tests in ``tests/test_backbones.py`` check, for each architecture, that this path
reproduces ``output_hidden_states=True`` of the plain model: a transformers upgrade that changes
internals fails there, loudly, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from layerexit.errors import LayerExitError

LayerKwargs = dict[str, Any]


def _first(output: Any) -> Tensor:
    """Layers return a tensor in some architectures and a tuple in others."""
    return output[0] if isinstance(output, tuple) else output


class Backbone(nn.Module):
    """A Hugging Face encoder, run layer by layer.

    Subclasses say how to embed, how to build the per-layer arguments and how to run layer i.
    The wrapped model is kept whole (``self.model``) so its weights save and load under their
    usual names.
    """

    model_types: tuple[str, ...] = ()

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model: Any = model  # typed loosely: each architecture reaches into its own internals
        self.config = model.config

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def uses_token_type_ids(self) -> bool:
        return int(getattr(self.config, "type_vocab_size", 0) or 0) > 0

    @property
    def num_heads(self) -> int:
        """Attention heads per layer (0 if the config does not say)."""
        return int(getattr(self.config, "num_attention_heads", 0) or getattr(self.config, "n_heads", 0) or 0)

    @property
    def max_positions(self) -> int | None:
        """The longest input, in tokens, the position embeddings cover (None: no limit stated)."""
        positions = getattr(self.config, "max_position_embeddings", None)
        return positions if isinstance(positions, int) else None

    causal: bool = False
    """A decoder: each token sees only the ones before it, so only the last token has read the whole input."""

    fusable: bool = False
    """Whether the attention is the plain pattern ONNX Runtime's transformer optimizer fuses (BERT-like,
    ALBERT, DistilBERT; not MPNet's or DeBERTa's relative-position attention)."""

    @contextmanager
    def eager_attention(self) -> Iterator[None]:
        """Run attention as plain MatMul/Softmax (as for tracing: the pattern ONNX Runtime fuses), then
        restore the encoder's own attention implementation."""
        before = getattr(self.config, "_attn_implementation", None)
        can_switch = getattr(self.model, "_can_set_attn_implementation", lambda: False)()
        switch = before not in (None, "eager") and can_switch
        if switch:
            self.model.set_attn_implementation("eager")
        try:
            yield
        finally:
            if switch:
                self.model.set_attn_implementation(before)

    def embed(self, input_ids: Tensor, padding_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def layer_kwargs(self, hidden: Tensor, padding_mask: Tensor) -> LayerKwargs:
        """The attention mask in the format the model's own forward builds for its layers."""
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=padding_mask)
        return {"attention_mask": mask}

    def layer(self, index: int, hidden: Tensor, kwargs: LayerKwargs) -> Tensor:
        raise NotImplementedError

    def forward_all(
        self, input_ids: Tensor, padding_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> list[Tensor]:
        """Hidden states after every layer, ``L`` tensors of shape (B, T, H)."""
        hidden = self.embed(input_ids, padding_mask, token_type_ids)  # (B, T, H)
        kwargs = self.layer_kwargs(hidden, padding_mask)
        states = []
        for i in range(self.num_layers):
            hidden = self.layer(i, hidden, kwargs)
            states.append(hidden)
        return states


class BertLikeBackbone(Backbone):
    """BERT, RoBERTa, ELECTRA, XLM-R, CamemBERT and other ``encoder.layer`` models."""

    model_types = ("bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "roberta-prelayernorm")
    fusable = True

    def embed(self, input_ids: Tensor, padding_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        kwargs: dict[str, Tensor] = {"input_ids": input_ids}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.model.embeddings(**kwargs)
        project = getattr(self.model, "embeddings_project", None)  # ELECTRA small
        return project(hidden) if project is not None else hidden

    def layer_kwargs(self, hidden: Tensor, padding_mask: Tensor) -> LayerKwargs:
        if self.config._attn_implementation == "sdpa" and bool(padding_mask.all()):
            # no padding: SDPA attends everywhere, the mask the model's own forward would pass is None
            # (tests/test_backbones.py), and building it to find that out costs a tenth of a layer at batch 1
            return {"attention_mask": None}
        return super().layer_kwargs(hidden, padding_mask)

    def layer(self, index: int, hidden: Tensor, kwargs: LayerKwargs) -> Tensor:
        if not self.model.training and self.config._attn_implementation == "sdpa":
            weights = self._inference_weights(index)
            if weights is not None:
                return _bert_layer(hidden, kwargs["attention_mask"], weights)
        return _first(self.model.encoder.layer[index](hidden, kwargs["attention_mask"]))

    def _inference_weights(self, index: int) -> _BertLayerWeights | None:
        """Layer ``index``'s parameters for :func:`_bert_layer`, gathered once (the same parameter objects, so
        later in-place updates are seen), or None where the layer is not the plain post-norm BERT layer."""
        cache: dict[int, _BertLayerWeights | None] = self.__dict__.setdefault("_fast_weights", {})
        if index not in cache:
            cache[index] = _bert_layer_weights(self.config, self.model.encoder.layer[index])
        return cache[index]


BERT_FAST_PATH = ("bert", "roberta", "xlm-roberta", "electra", "camembert")
"""Model types whose layers run in eval mode as :func:`_bert_layer` (with SDPA attention)."""

# The inference path of a BERT-like layer, as plain functions: the module path spends about a fifth of a
# MiniLM layer's time at batch 1 in Python (eight module calls, a keyword-deprecation wrapper that inspects
# its arguments on every call). Same operations in the same order, so the same numbers: the parity tests
# (tests/test_backbones.py) compare it with the module path bit for bit.


@dataclass(frozen=True)
class _BertLayerWeights:
    query: tuple[Tensor, Tensor]
    key: tuple[Tensor, Tensor]
    value: tuple[Tensor, Tensor]
    attention_out: tuple[Tensor, Tensor]
    attention_norm: tuple[Tensor, Tensor, float]
    intermediate: tuple[Tensor, Tensor]
    activation: Any
    output: tuple[Tensor, Tensor]
    output_norm: tuple[Tensor, Tensor, float]
    heads: int
    head_size: int
    scaling: float


def _bert_layer_weights(config: Any, layer: Any) -> _BertLayerWeights | None:
    """None unless ``layer`` is an encoder's post-norm BERT layer with absolute positions (no relative
    attention scores, no decoder or cross attention, no feed-forward chunking)."""
    plain = (
        config.model_type in BERT_FAST_PATH
        and not getattr(config, "is_decoder", False)
        and not getattr(config, "add_cross_attention", False)
        and getattr(config, "position_embedding_type", "absolute") in ("absolute", None)
        and not getattr(config, "chunk_size_feed_forward", 0)
    )
    try:
        attention, intermediate, output = layer.attention, layer.intermediate, layer.output
        own = attention.self
        pairs = (own.query, own.key, own.value, attention.output.dense, intermediate.dense, output.dense)
        linears = tuple((m.weight, m.bias) for m in pairs)
        norms = tuple((n.weight, n.bias, float(n.eps)) for n in (attention.output.LayerNorm, output.LayerNorm))
        heads, head_size, scaling = int(own.num_attention_heads), int(own.attention_head_size), float(own.scaling)
        activation = intermediate.intermediate_act_fn
    except AttributeError:
        return None
    if not plain or any(bias is None for _, bias in linears):
        return None
    query, key, value, attention_out, inner, out = linears
    return _BertLayerWeights(
        query=query,
        key=key,
        value=value,
        attention_out=attention_out,
        attention_norm=norms[0],
        intermediate=inner,
        activation=activation,
        output=out,
        output_norm=norms[1],
        heads=heads,
        head_size=head_size,
        scaling=scaling,
    )


def _bert_layer(hidden: Tensor, mask: Tensor | None, w: _BertLayerWeights) -> Tensor:
    """A BERT layer in eval mode: self-attention through scaled_dot_product_attention with the mask the
    model's own forward builds, then the feed-forward block, each closed by residual and LayerNorm."""
    batch, length, _ = hidden.shape
    heads = (batch, length, w.heads, w.head_size)
    query = F.linear(hidden, *w.query).view(heads).transpose(1, 2)  # (b, h, t, d)
    key = F.linear(hidden, *w.key).view(heads).transpose(1, 2)
    value = F.linear(hidden, *w.value).view(heads).transpose(1, 2)
    attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, scale=w.scaling)
    attended = attended.transpose(1, 2).contiguous().reshape(batch, length, -1).contiguous()  # (b, t, H)
    weight, bias, eps = w.attention_norm
    hidden = F.layer_norm(F.linear(attended, *w.attention_out) + hidden, weight.shape, weight, bias, eps)
    inner = w.activation(F.linear(hidden, *w.intermediate))  # (b, t, I)
    weight, bias, eps = w.output_norm
    return F.layer_norm(F.linear(inner, *w.output) + hidden, weight.shape, weight, bias, eps)


class AlbertBackbone(Backbone):
    """ALBERT: layer i is the i-th application of a shared layer group."""

    model_types = ("albert",)
    fusable = True

    def embed(self, input_ids: Tensor, padding_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        hidden = self.model.embeddings(input_ids, token_type_ids=token_type_ids)
        return self.model.encoder.embedding_hidden_mapping_in(hidden)

    def layer(self, index: int, hidden: Tensor, kwargs: LayerKwargs) -> Tensor:
        groups = self.config.num_hidden_groups
        group = int(index / (self.num_layers / groups))
        return _first(self.model.encoder.albert_layer_groups[group](hidden, kwargs["attention_mask"]))


class DistilBertBackbone(Backbone):
    model_types = ("distilbert",)
    fusable = True

    @property
    def num_layers(self) -> int:
        return int(self.config.n_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.dim)

    @property
    def uses_token_type_ids(self) -> bool:
        return False

    def embed(self, input_ids: Tensor, padding_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        return self.model.embeddings(input_ids)

    def layer(self, index: int, hidden: Tensor, kwargs: LayerKwargs) -> Tensor:
        return _first(self.model.transformer.layer[index](hidden, kwargs["attention_mask"]))


class MPNetBackbone(Backbone):
    """MPNet: every layer also takes the relative position bias of the sequence length."""

    model_types = ("mpnet",)

    @property
    def uses_token_type_ids(self) -> bool:
        return False

    def embed(self, input_ids: Tensor, padding_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        return self.model.embeddings(input_ids=input_ids)

    def layer_kwargs(self, hidden: Tensor, padding_mask: Tensor) -> LayerKwargs:
        kwargs = super().layer_kwargs(hidden, padding_mask)
        kwargs["position_bias"] = self.model.encoder.compute_position_bias(hidden)  # (B, heads, T, T)
        return kwargs

    def layer(self, index: int, hidden: Tensor, kwargs: LayerKwargs) -> Tensor:
        layer = self.model.encoder.layer[index]
        return _first(layer(hidden, kwargs["attention_mask"], kwargs["position_bias"]))


class DebertaV2Backbone(Backbone):
    """DeBERTa-v2/v3: relative embeddings, its own mask format, a convolution after layer 1."""

    model_types = ("deberta-v2",)

    def embed(self, input_ids: Tensor, padding_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self.model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, mask=padding_mask)

    def layer_kwargs(self, hidden: Tensor, padding_mask: Tensor) -> LayerKwargs:
        encoder = self.model.encoder
        return {
            "attention_mask": encoder.get_attention_mask(padding_mask),
            "input_mask": padding_mask,
            "relative_pos": encoder.get_rel_pos(hidden),
            "rel_embeddings": encoder.get_rel_embedding(),
        }

    def layer(self, index: int, hidden: Tensor, kwargs: LayerKwargs) -> Tensor:
        encoder = self.model.encoder
        out = _first(
            encoder.layer[index](
                hidden,
                kwargs["attention_mask"],
                relative_pos=kwargs["relative_pos"],
                rel_embeddings=kwargs["rel_embeddings"],
            )
        )
        if index == 0 and encoder.conv is not None:
            out = encoder.conv(hidden, out, kwargs["input_mask"])
        return out


class ModernBertBackbone(Backbone):
    """ModernBERT: rotary positions, global and sliding-window attention layers in turn, a final norm.

    The final norm belongs to the last layer here, so the last layer's states are the encoder's
    ``last_hidden_state`` (what its classification head reads), as for the decoders below.
    """

    model_types = ("modernbert",)

    def embed(self, input_ids: Tensor, padding_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        return self.model.embeddings(input_ids=input_ids)

    def layer_kwargs(self, hidden: Tensor, padding_mask: Tensor) -> LayerKwargs:
        from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

        mask_kwargs = {"config": self.config, "inputs_embeds": hidden, "attention_mask": padding_mask}
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        return {
            "attention_mask": {
                "full_attention": create_bidirectional_mask(**mask_kwargs),
                "sliding_attention": create_bidirectional_sliding_window_mask(**mask_kwargs),
            },
            "position_embeddings": {
                kind: self.model.rotary_emb(hidden, positions, kind) for kind in set(self.config.layer_types)
            },
        }

    def layer(self, index: int, hidden: Tensor, kwargs: LayerKwargs) -> Tensor:
        layer = self.model.layers[index]
        kind = layer.attention_type
        out = _first(
            layer(
                hidden,
                attention_mask=kwargs["attention_mask"][kind],
                position_embeddings=kwargs["position_embeddings"][kind],
            )
        )
        return self.model.final_norm(out) if index == self.num_layers - 1 else out


class DecoderBackbone(Backbone):
    """Decoder-only models used as classifiers (Llama, Qwen2, Qwen3, Mistral): causal attention, rotary
    positions, a final norm after the last layer (kept in the last layer here, as for ModernBERT).

    Inputs are right-padded, so every real token keeps its position (0, 1, ...) when rows are dropped
    or padding is trimmed.
    """

    model_types = ("llama", "qwen2", "qwen3", "mistral")
    causal = True

    def embed(self, input_ids: Tensor, padding_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def _layer_types(self) -> list[str]:
        return list(getattr(self.config, "layer_types", None) or ["full_attention"] * self.num_layers)

    def layer_kwargs(self, hidden: Tensor, padding_mask: Tensor) -> LayerKwargs:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": hidden,
            "attention_mask": padding_mask,
            "cache": None,
            "position_ids": positions,
        }
        build = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        return {
            "attention_mask": {kind: build[kind](**mask_kwargs) for kind in set(self._layer_types())},
            "position_embeddings": self.model.rotary_emb(hidden, positions),
            "position_ids": positions,
        }

    def layer(self, index: int, hidden: Tensor, kwargs: LayerKwargs) -> Tensor:
        out = _first(
            self.model.layers[index](
                hidden,
                attention_mask=kwargs["attention_mask"][self._layer_types()[index]],
                position_embeddings=kwargs["position_embeddings"],
                position_ids=kwargs["position_ids"],
                use_cache=False,
            )
        )
        return self.model.norm(out) if index == self.num_layers - 1 else out


_BACKBONES: tuple[type[Backbone], ...] = (
    BertLikeBackbone,
    AlbertBackbone,
    DistilBertBackbone,
    MPNetBackbone,
    DebertaV2Backbone,
    ModernBertBackbone,
    DecoderBackbone,
)


def supported_model_types() -> list[str]:
    return sorted(t for cls in _BACKBONES for t in cls.model_types)


def without_pooler(encoder: Any) -> Any:
    """The encoder with its pooler removed: the exits pool for themselves, so it is never used or saved."""
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return encoder


def wrap(model: PreTrainedModel) -> Backbone:
    """The layer-by-layer runner for a Hugging Face encoder (an ``AutoModel``, no head)."""
    model_type = getattr(model.config, "model_type", "")
    for cls in _BACKBONES:
        if model_type in cls.model_types:
            return cls(model)
    raise LayerExitError(
        f"architecture {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
    )
