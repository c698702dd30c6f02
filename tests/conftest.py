"""Tiny random encoders built in code: fast, no network."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AlbertConfig,
    AutoModel,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    LlamaConfig,
    ModernBertConfig,
    MPNetConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
)

from layerexit.backbones import wrap
from layerexit.model import EarlyExitModel, ExitConfig

VOCAB = 99
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def tiny_config(arch: str) -> PretrainedConfig:
    if arch == "bert":
        return BertConfig(**_COMMON)
    if arch == "albert":
        return AlbertConfig(**_COMMON, embedding_size=16, num_hidden_groups=2)
    if arch == "roberta":
        return RobertaConfig(**_COMMON, pad_token_id=1)
    if arch == "distilbert":
        return DistilBertConfig(
            vocab_size=VOCAB,
            dim=32,
            n_layers=4,
            n_heads=4,
            hidden_dim=37,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
        )
    if arch == "electra":
        return ElectraConfig(**_COMMON, embedding_size=16)
    if arch == "mpnet":
        return MPNetConfig(**_COMMON)
    if arch == "deberta-v2":
        return DebertaV2Config(
            **_COMMON,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            conv_kernel_size=3,
            position_buckets=16,
            max_relative_positions=32,
            norm_rel_ebd="layer_norm",
        )
    if arch == "modernbert":  # a 4-token window, so the sliding-window layers differ from the global ones
        return ModernBertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=64,
            local_attention=4,
            layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            cls_token_id=2,
            sep_token_id=3,
        )
    decoders = {"qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3": Qwen3Config}
    if arch in decoders:
        return decoders[arch](
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            pad_token_id=0,
        )
    raise ValueError(arch)


ARCHITECTURES = ["bert", "albert", "roberta", "distilbert", "electra", "mpnet", "deberta-v2"]
"""The encoders every part of the project is tested on (the ONNX export included)."""
NEWER_ARCHITECTURES = ["modernbert", "qwen2", "llama", "qwen3"]
"""ModernBERT and decoder-only classifiers: parity, training, retrofit and the PyTorch runtime."""


def tiny_model(
    arch: str = "bert", num_labels: int = 3, head: str = "mlp", pooling: str = "mean", seed: int = 0
) -> EarlyExitModel:
    torch.manual_seed(seed)
    encoder = AutoModel.from_config(tiny_config(arch))
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    config = ExitConfig(
        backbone=f"tiny-{arch}",
        num_labels=num_labels,
        head=head,
        pooling=pooling,  # type: ignore[arg-type]
        separator_id=SEPARATOR if pooling == "pair" else None,
        dropout=0.0,
    )
    return EarlyExitModel(wrap(encoder), config).eval()


SEPARATOR = 3
"""The separator token of tiny models whose exits pool text pairs (``[SEP]`` in the tests' vocabularies)."""


def random_batch(batch: int = 6, length: int = 11, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a right-padded attention mask with varied lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, length), generator=g)
    lengths = torch.randint(2, length + 1, (batch,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    return ids, mask


@pytest.fixture
def bert_model() -> EarlyExitModel:
    return tiny_model("bert")
