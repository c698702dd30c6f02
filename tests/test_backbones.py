"""Parity of the layer-by-layer seam with the plain model's ``output_hidden_states``."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, GPT2Config

from layerexit.backbones import wrap
from layerexit.errors import LayerExitError

from .conftest import ARCHITECTURES, NEWER_ARCHITECTURES, random_batch, tiny_config


@pytest.mark.parametrize("arch", ARCHITECTURES + NEWER_ARCHITECTURES)
def test_layer_by_layer_matches_output_hidden_states(arch: str) -> None:
    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config(arch)).eval()
    ids, mask = random_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        reference = list(out.hidden_states[1:])
        states = wrap(model).forward_all(ids, mask)
    if arch in NEWER_ARCHITECTURES:  # the final norm is part of the last layer: its states are last_hidden_state
        reference[-1] = out.last_hidden_state
    assert len(states) == len(reference) == 4
    for ref, got in zip(reference, states, strict=True):
        keep = mask.bool()
        torch.testing.assert_close(got[keep], ref[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "mpnet", "deberta-v2", "modernbert", "qwen2"])
def test_rows_of_a_batch_match_running_them_alone(arch: str) -> None:
    """Dropping rows and padding (what online inference does) leaves each row's states unchanged."""
    torch.manual_seed(0)
    backbone = wrap(AutoModel.from_config(tiny_config(arch)).eval())
    ids, mask = random_batch()
    with torch.no_grad():
        batched = backbone.forward_all(ids, mask)
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            alone = backbone.forward_all(ids[row : row + 1, :n], mask[row : row + 1, :n])
            for full, single in zip(batched, alone, strict=True):
                torch.testing.assert_close(single[0], full[row, :n], rtol=1e-4, atol=1e-5)


def test_unsupported_architecture_is_a_clear_error() -> None:
    model = AutoModel.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(LayerExitError, match="not supported"):
        wrap(model)
