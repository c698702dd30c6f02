"""A fine-tuned classifier's own head, kept as the last exit: the second half of the transformers seam.

``AutoModelForSequenceClassification`` is an encoder (``model.base_model``) plus a head whose shape
differs by family: BERT and ALBERT pool the first token through a dense layer and tanh (the encoder's
``pooler``), RoBERTa, XLM-R, ELECTRA and MPNet run a dense layer and an output projection over the
first token, DistilBERT a ``pre_classifier`` and ReLU, DeBERTa-v2 a ``ContextPooler``, ModernBERT pools
the first token or the mean (``classifier_pooling``) into a dense-activation-norm ``head``, and decoders
(Llama, Qwen2/3, Mistral) score the last real token. The last two read the encoder's final norm, which
:mod:`layerexit.backbones` keeps in the last layer.
:func:`split_classifier` takes such a model apart into the encoder (for :mod:`layerexit.backbones`) and
a :class:`NativeHead` that holds the head's own modules, unchanged, under their own names, and calls
them as the family's ``forward`` does. Exiting at the last layer then answers exactly what the
classifier answers; ``tests/test_retrofit.py`` checks it against transformers' forward for every family.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from layerexit.errors import LayerExitError
from layerexit.pooling import pool

# model_type -> how its sequence-classification head reads the last layer's states
_KINDS = {
    "bert": "pooler",
    "albert": "albert",
    "roberta": "sequence",
    "xlm-roberta": "sequence",
    "camembert": "sequence",
    "electra": "sequence",
    "mpnet": "sequence",
    "distilbert": "distilbert",
    "deberta-v2": "context-pooler",
    "modernbert": "modernbert",
    "llama": "last-token",
    "qwen2": "last-token",
    "qwen3": "last-token",
    "mistral": "last-token",
}


def retrofit_model_types() -> list[str]:
    """Families whose fine-tuned sequence classifiers can be retrofitted."""
    return sorted(_KINDS)


class NativeHead(nn.Module):
    """A sequence classifier's own head: ``(hidden (B, T, H), padding_mask (B, T)) -> logits (B, C)``.

    Its submodules keep the names they have in the original model (``pooler``, ``classifier``,
    ``pre_classifier``, ``dropout``), so its weights are the original's under ``exits.<L-1>.``.
    """

    def __init__(self, kind: str, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.kind = kind
        for name, module in modules.items():
            self.add_module(name, module)
        self.temperature = 1.0
        self.classifier_pooling = "cls"
        """ModernBERT's ``config.classifier_pooling``: ``cls`` (first token) or ``mean``."""

    def forward(self, hidden: Tensor, padding_mask: Tensor, second: Tensor | None = None) -> Tensor:
        """``second`` is accepted, and ignored, so that every exit is called alike."""
        m: Any = self
        if self.kind == "pooler":  # BertPooler: dense + tanh over the first token
            logits = m.classifier(m.dropout(m.pooler(hidden)))
        elif self.kind == "albert":  # the pooler is a plain Linear with its Tanh beside it
            logits = m.classifier(m.dropout(m.pooler_activation(m.pooler(hidden[:, 0]))))
        elif self.kind == "sequence":  # RobertaClassificationHead and its likes read the whole sequence
            logits = m.classifier(hidden)
        elif self.kind == "distilbert":
            pooled = torch.relu(m.pre_classifier(hidden[:, 0]))
            logits = m.classifier(m.dropout(pooled))
        elif self.kind == "context-pooler":  # DeBERTa-v2/v3
            logits = m.classifier(m.dropout(m.pooler(hidden)))
        elif self.kind == "modernbert":
            pooled = pool(hidden, padding_mask, "first" if m.classifier_pooling == "cls" else "mean")
            logits = m.classifier(m.drop(m.head(pooled)))
        elif self.kind == "last-token":  # the rightmost real token; transformers finds it from the pad token id
            logits = m.score(pool(hidden, padding_mask, "last"))
        else:  # pragma: no cover - kinds come from _KINDS
            raise LayerExitError(f"unknown head kind {self.kind!r}")
        return logits if self.temperature == 1.0 else logits / self.temperature


def split_classifier(model: PreTrainedModel) -> tuple[PreTrainedModel, NativeHead]:
    """The encoder of a sequence classifier and its head; the encoder no longer holds the head's pooler."""
    model_type = getattr(model.config, "model_type", "")
    kind = _KINDS.get(model_type)
    if kind is None:
        raise LayerExitError(
            f"cannot retrofit a {model_type!r} classifier; supported families: {', '.join(retrofit_model_types())}"
        )
    encoder: Any = model.base_model
    if encoder is model:
        raise LayerExitError(f"{type(model).__name__} is an encoder, not a sequence classifier (it has no head)")
    m: Any = model
    modules: dict[str, nn.Module]
    if kind == "pooler":
        if encoder.pooler is None:
            raise LayerExitError(f"{type(model).__name__} has no pooler, but its head reads one")
        modules = {"pooler": encoder.pooler, "dropout": m.dropout, "classifier": m.classifier}
        encoder.pooler = None
    elif kind == "albert":
        if encoder.pooler is None:
            raise LayerExitError(f"{type(model).__name__} has no pooler, but its head reads one")
        modules = {
            "pooler": encoder.pooler,
            "pooler_activation": encoder.pooler_activation,
            "dropout": m.dropout,
            "classifier": m.classifier,
        }
        encoder.pooler = None
        encoder.pooler_activation = None
    elif kind == "sequence":
        modules = {"classifier": m.classifier}
        if getattr(encoder, "pooler", None) is not None:  # ELECTRA has none; an unused one is dropped
            encoder.pooler = None
    elif kind == "distilbert":
        modules = {"pre_classifier": m.pre_classifier, "dropout": m.dropout, "classifier": m.classifier}
    elif kind == "context-pooler":
        modules = {"pooler": m.pooler, "dropout": m.dropout, "classifier": m.classifier}
    elif kind == "modernbert":
        modules = {"head": m.head, "drop": m.drop, "classifier": m.classifier}
    else:  # last-token
        modules = {"score": m.score}
    head = NativeHead(kind, modules)
    head.classifier_pooling = str(getattr(model.config, "classifier_pooling", "cls"))
    return encoder, head


def label_names(config: Any) -> list[str]:
    """The classifier's label names in index order, from ``id2label`` (``LABEL_i`` where it names none)."""
    num = int(config.num_labels)
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(num)]
