"""Per-token int8 (``onnx-int8-token``): the graph rewrite on its own, against numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from layerexit.errors import LayerExitError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from layerexit.runtime.onnx_token_int8 import quantize_per_token  # noqa: E402

K, N = 48, 40


def _two_matmuls(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """y = x @ a, z = x @ b: two weights reading one activation."""
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=(K, N)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "a"], ["y"]), helper.make_node("MatMul", ["x", "b"], ["z"])],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", K])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "T", N]) for n in ("y", "z")],
        [numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, "b")],
    )
    path = tmp_path / "plain.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by older onnxruntime too (measuring which versions pass needed it)
    onnx.save(model, str(path))
    return path, a, b


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_each_token_is_quantized_on_its_own_scale(tmp_path: Path) -> None:
    source, a, b = _two_matmuls(tmp_path)
    target = tmp_path / "int8.onnx"
    assert quantize_per_token(onnx, source, target) == 2
    ops = [node.op_type for node in onnx.load(str(target)).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 2 and ops.count("QuantizeLinear") == 1  # x quantized once
    assert "MatMul" not in ops

    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 7, K)).astype(np.float32)
    x[0, 0] *= 1000.0  # one outlying token: under one shared scale every other token would lose its resolution
    x[2, 3] = 0.0  # a token of zeros
    y, z = _run(target, x)
    for got, w in ((y, a), (z, b)):
        exact = x @ w
        size = np.abs(exact).max(axis=-1, keepdims=True)
        error = np.abs(got - exact) / np.where(size > 0, size, 1.0)  # relative to each token's own scale
        assert error.max() < 0.03, error.max()
        assert np.array_equal(got[2, 3], np.zeros(N, np.float32))
    # every token alone gives what it gave among the others, bit for bit
    alone = np.concatenate([_run(target, x[i : i + 1, t : t + 1])[0] for i in range(4) for t in range(7)])
    assert np.array_equal(alone.reshape(y.shape), y)


def test_a_fused_attention_it_cannot_rewrite_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node(
                "Attention", ["x", "w", "b", "m"], ["y"], domain="com.microsoft", num_heads=2, unidirectional=1
            )
        ],
        "attention",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", 8]),
            helper.make_tensor_value_info("m", TensorProto.INT32, ["B", "T"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", 8])],
        [
            numpy_helper.from_array(rng.normal(size=(8, 24)).astype(np.float32), "w"),
            numpy_helper.from_array(np.zeros(24, np.float32), "b"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    onnx.save(model, str(tmp_path / "a.onnx"))
    with pytest.raises(LayerExitError, match="cannot rewrite the fused attention"):
        quantize_per_token(onnx, tmp_path / "a.onnx", tmp_path / "b.onnx")


def test_an_export_further_from_pytorch_than_the_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from layerexit.runtime import onnx_export

    from .conftest import tiny_model

    monkeypatch.setattr(onnx_export, "TOKEN_INT8_TOLERANCE", 0.0)  # any int8 rounding is then too much
    with pytest.raises(LayerExitError, match=r"per-token int8 layer_1 graph differs from PyTorch by .* \(limit 0\)"):
        onnx_export.export_onnx(tiny_model("bert"), tmp_path, quantize="token")


@pytest.mark.parametrize("arch", ["albert", "distilbert", "mpnet", "deberta-v2", "qwen2"])
def test_every_architecture_exports_in_per_token_int8(arch: str, tmp_path: Path) -> None:
    """Fused attention (ALBERT, DistilBERT) and attention left as plain MatMuls (MPNet, DeBERTa-v2, Qwen2)
    alike: close to PyTorch, left padding included, and each row answered as it would be alone."""
    import torch

    from layerexit.runtime.loop import all_exits
    from layerexit.runtime.onnx_export import export_onnx
    from layerexit.runtime.onnx_runtime import OnnxRuntime

    from .conftest import random_batch, tiny_model

    model = tiny_model(arch, num_labels=3)
    runtime = OnnxRuntime.load(export_onnx(model, tmp_path, quantize="token"), threads=1)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "layer_1.onnx")).graph.node}
    assert "MatMulIntegerToFloat" in ops and "Attention" not in ops
    ids, mask = random_batch(batch=6, length=12, seed=4)
    mask[1] = mask[1].flip(0)  # one row padded on the left
    with torch.no_grad():
        reference = model(ids, mask).probs
    batched = all_exits(runtime, ids, mask)
    assert float((batched - reference).abs().max()) < 0.05
    alone = torch.cat([all_exits(runtime, ids[i : i + 1], mask[i : i + 1]) for i in range(len(ids))], 1)
    assert float((batched - alone).abs().max()) < 1e-5
