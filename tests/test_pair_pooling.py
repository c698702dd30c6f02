"""Pair pooling: exits that compare the two texts of an input, on every runtime, in batches and in the server."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from layerexit.errors import LayerExitError
from layerexit.model import EarlyExitModel, ExitConfig
from layerexit.pooling import pool, second_text
from layerexit.runtime.loop import all_exits, early_exit, early_exit_forward
from layerexit.runtime.torch_runtime import TorchRuntime

from .conftest import SEPARATOR, random_batch, tiny_model
from .test_model import _peaked, _varied


def pair_batch(batch: int = 12, length: int = 13, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[CLS] a [SEP] b [SEP]`` rows of varied lengths, the first text of varied length too;
    the last row is a single text (no second one)."""
    ids, mask = random_batch(batch, length, seed)
    g = torch.Generator().manual_seed(seed)
    for row in range(batch):
        n = int(mask[row].sum())
        if n < 4:
            continue
        ids[row, n - 1] = SEPARATOR
        if row < batch - 1:
            ids[row, int(torch.randint(1, n - 2, (1,), generator=g))] = SEPARATOR
    return ids, mask


def test_second_text_is_what_follows_the_first_separator() -> None:
    bert = torch.tensor([[2, 5, 6, 3, 7, 8, 3, 0, 0], [2, 5, 3, 0, 0, 0, 0, 0, 0]])  # [CLS] a [SEP] b [SEP]; single
    mask = (bert != 0).long()
    assert second_text(bert, mask, 3).tolist() == [[0, 0, 0, 0, 1, 1, 1, 0, 0], [0] * 9]
    roberta = torch.tensor([[0, 5, 2, 2, 7, 2, 1]])  # <s> a </s></s> b </s> <pad>
    assert second_text(roberta, torch.tensor([[1, 1, 1, 1, 1, 1, 0]]), 2).tolist() == [[0, 0, 0, 1, 1, 1, 0]]


def test_pair_features_are_u_v_their_distance_and_product() -> None:
    hidden = torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    second = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    got = pool(hidden, mask, "pair", second)
    assert got.shape == (2, 16)
    for row, (a, b) in enumerate([(slice(0, 3), slice(3, 5)), (slice(0, 2), slice(2, 6))]):
        u, v = hidden[row, a].mean(0), hidden[row, b].mean(0)
        torch.testing.assert_close(got[row], torch.cat([u, v, (u - v).abs(), u * v]))
    with pytest.raises(ValueError, match="second text"):
        pool(hidden, mask, "pair")


def test_pair_pooling_needs_a_separator_and_is_saved_with_it(tmp_path: Path) -> None:
    with pytest.raises(LayerExitError, match="separator_id"):
        ExitConfig(backbone="x", num_labels=2, pooling="pair")
    model = tiny_model(pooling="pair")
    model.save_pretrained(tmp_path)
    loaded = EarlyExitModel.from_pretrained(tmp_path)
    assert (loaded.config.pooling, loaded.config.separator_id) == ("pair", SEPARATOR)
    ids, mask = pair_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask).logits, model(ids, mask).logits)


def test_the_exits_read_the_second_text() -> None:
    """Moving the separator moves the second text, and changes a pair exit's answer."""
    pair = tiny_model(pooling="pair")
    ids, mask = pair_batch(batch=2, length=10)
    ids[:, 9], mask[:, 9] = SEPARATOR, 1
    moved = ids.clone()
    moved[:, 1:9] = ids[:, 1:9].masked_fill(ids[:, 1:9] == SEPARATOR, 7)
    moved[:, 2] = SEPARATOR
    assert not torch.equal(second_text(ids, mask, SEPARATOR), second_text(moved, mask, SEPARATOR))
    with torch.no_grad():
        assert (pair(ids, mask).logits - pair(moved, mask).logits).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["entropy", "patience", "voting"])
def test_online_pair_exits_equal_offline_batched_and_one_by_one(name: str) -> None:
    """Rows leave, padding is cut, and the second-text mask follows the rows it belongs to."""
    model = _peaked(tiny_model("bert", pooling="pair"))
    ids, mask = pair_batch()
    with torch.no_grad():
        probs = model(ids, mask).probs
    strategy = _varied(name, probs)
    offline_layer, offline_pred = strategy.replay(probs)
    batched = early_exit_forward(model, strategy, ids, mask)
    assert torch.equal(batched.exit_layer, offline_layer) and torch.equal(batched.prediction, offline_pred)
    assert batched.exit_layer.unique().numel() >= 2
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        single = early_exit_forward(model, strategy, ids[row : row + 1, :n], mask[row : row + 1, :n])
        assert (single.exit_layer.item(), single.prediction.item()) == (offline_layer[row], offline_pred[row])
        torch.testing.assert_close(single.probs[0], batched.probs[row], atol=1e-5, rtol=1e-4)
    runtime = TorchRuntime(model)
    torch.testing.assert_close(runtime.full(ids, mask), probs[-1], atol=1e-5, rtol=1e-4)


def test_joined_rows_keep_their_second_texts() -> None:
    """The server pools rows of several requests (``join``): each keeps its own second-text mask."""
    runtime = TorchRuntime(tiny_model("bert", pooling="pair"))
    ids, mask = pair_batch(batch=5)
    parts = [runtime.embed(ids[:2, :9], mask[:2, :9]), runtime.embed(ids[2:], mask[2:])]
    joined = runtime.join(parts)
    whole = runtime.embed(ids, mask)
    whole_second = whole.second.clone()
    whole_second[:2, 9:] = 0
    assert torch.equal(joined.second, whole_second)
    _, probs = runtime.layer(1, joined)
    torch.testing.assert_close(probs[2:], runtime.layer(1, runtime.embed(ids[2:], mask[2:]))[1], atol=1e-5, rtol=0)


def test_the_server_answers_pair_rows_as_offline_replay() -> None:
    from layerexit.serving.engine import Engine

    from .test_serving import submit_concurrently

    runtime = TorchRuntime(_peaked(tiny_model("bert", pooling="pair")))
    ids, mask = pair_batch(batch=30, length=13, seed=5)
    inputs = [(ids[r, : int(mask[r].sum())], None) for r in range(30)]
    with torch.inference_mode():
        probs = torch.cat(
            [all_exits(runtime, i[None], torch.ones(1, i.numel(), dtype=torch.long)) for i, _ in inputs], 1
        )
    strategy = _varied("entropy", probs)
    layers, predictions = strategy.replay(probs)
    engine = Engine(runtime, strategy, scheduler="pooled", max_batch=7, max_wait_ms=2, max_queue=100)
    jobs = submit_concurrently(engine, inputs, random.Random(3), largest=4)
    engine.close()
    expected = {id(i): (int(layers[r]), int(predictions[r])) for r, (i, _) in enumerate(inputs)}
    for chunk, job in jobs:
        for (i, _), answer in zip(chunk, job.future.result(), strict=True):
            assert (answer.exit_layer, answer.label) == expected[id(i)]
    assert max(max(r, default=0) for r in engine.stats.batch_rows) > 1


def test_pair_exits_export_to_onnx_with_parity(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from layerexit.runtime.onnx_export import export_onnx
    from layerexit.runtime.onnx_runtime import OnnxRuntime

    model = _peaked(tiny_model("bert", pooling="pair"))
    runtime = OnnxRuntime.load(export_onnx(model, tmp_path), threads=1)
    assert runtime._layer_entries[0].inputs == ("hidden", "attention_mask", "second_text")
    ids, mask = pair_batch()
    with torch.no_grad():
        reference = model(ids, mask).probs
    torch.testing.assert_close(all_exits(runtime, ids, mask), reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(runtime.full(ids, mask), reference[-1], atol=1e-4, rtol=0)
    strategy = _varied("entropy", reference)
    online, torch_online = early_exit(runtime, strategy, ids, mask), early_exit_forward(model, strategy, ids, mask)
    assert torch.equal(online.exit_layer, torch_online.exit_layer)
    assert torch.equal(online.prediction, torch_online.prediction)


def test_pair_pooling_on_single_texts_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from layerexit.cli import main

    from .test_end_to_end import make_encoder, make_task

    encoder, task = make_encoder(tmp_path / "encoder"), make_task(tmp_path / "task", {"train": 16, "dev": 8})
    args = ["train", "--model", str(encoder), "--task", str(task), "--output", str(tmp_path / "run"),
            "--pooling", "pair", "--quiet"]  # fmt: skip
    assert main(args) != 0
    assert "--pooling pair is for inputs of two texts" in capsys.readouterr().err
