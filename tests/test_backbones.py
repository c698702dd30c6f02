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


@pytest.mark.parametrize("arch", ["bert", "roberta", "electra"])
def test_inference_path_of_bert_layers_equals_the_module_path_bit_for_bit(arch: str) -> None:
    """In eval mode BERT-like layers run as plain functions (no module calls); on a padded batch every
    layer gives exactly the module path's numbers."""
    torch.manual_seed(0)
    backbone = wrap(AutoModel.from_config(tiny_config(arch), attn_implementation="sdpa").eval())
    ids, mask = random_batch()
    with torch.no_grad():
        hidden = backbone.embed(ids, mask)
        kwargs = backbone.layer_kwargs(hidden, mask)
        for index in range(backbone.num_layers):
            assert backbone._inference_weights(index) is not None  # the fast path is the one taken
            fast = backbone.layer(index, hidden, kwargs)
            module = backbone.model.encoder.layer[index](hidden, kwargs["attention_mask"])
            module = module[0] if isinstance(module, tuple) else module
            assert torch.equal(fast, module)
            hidden = fast
    # without padding the mask is left out, exactly as the model's own mask builder leaves it out
    from transformers.masking_utils import create_bidirectional_mask

    unpadded = torch.ones_like(mask)
    own = create_bidirectional_mask(config=backbone.config, inputs_embeds=hidden, attention_mask=unpadded)
    assert own is None and backbone.layer_kwargs(hidden, unpadded) == {"attention_mask": None}


def test_inference_path_is_left_in_training_and_for_other_attention() -> None:
    torch.manual_seed(0)
    backbone = wrap(AutoModel.from_config(tiny_config("bert"), attn_implementation="sdpa"))
    ids, mask = random_batch()
    hidden = backbone.embed(ids, mask)
    kwargs = backbone.layer_kwargs(hidden, mask)
    backbone.train()  # dropout: only the module path applies it
    torch.manual_seed(1)
    trained = backbone.layer(0, hidden, kwargs)
    torch.manual_seed(1)
    expected = backbone.model.encoder.layer[0](hidden, kwargs["attention_mask"])
    assert torch.equal(trained, expected[0] if isinstance(expected, tuple) else expected)
    assert trained.requires_grad
    config = tiny_config("bert")
    config.position_embedding_type = "relative_key"
    # relative position scores: the module path
    assert wrap(AutoModel.from_config(config).eval())._inference_weights(0) is None
