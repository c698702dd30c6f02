"""Per-token int8 (``onnx-int8-token``): every MatMul with a constant weight rewritten to multiply in int8, with
one activation scale per token computed inside the graph.

Dynamic quantization (``onnx-int8``) computes one activation scale per call from all of its rows, so a row's
answer depends on its batch-mates; static quantization (``onnx-int8-static``) fixes the scales on training
texts and cannot reach the projections inside ONNX Runtime's fused attention. Here each token's activations
get their own symmetric scale (its largest absolute value over 127), so no scale is shared between rows or
with their padding, nothing is calibrated, and one outlying token coarsens no other token. Weights are int8,
symmetric, one scale per output column.

For an activation ``x`` (..., K), once however many MatMuls read it::

    s = max(|x|) / 127 over the last axis            (..., 1)
    q = QuantizeLinear(x / s, 1, 128)                 uint8 (u8 activations, s8 weights: the VNNI pairing)

and for each weight ``W`` (K, N) with column scales ``w``::

    y = MatMulIntegerToFloat(q, Wq, s, w, 128)        the exact integer product, times s (x) w

ONNX Runtime's ``MatMulIntegerToFloat`` multiplies its output by the product of its two scales with
broadcasting, so a per-token scale (..., 1) works as an input scale (``tests/test_onnx_token_int8.py`` checks
the result against numpy). Not ONNX's plain ``MatMulInteger``, ``Cast`` and ``Mul``: ONNX Runtime rewrites
that chain into the same operator but then takes the per-token scale for a scalar (measured wrong).

A fused ``Attention`` is rewritten as its three projections in per-token int8 followed by
``MultiHeadAttention``, the same attention without the projections, with the same bias and padding mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from layerexit.errors import LayerExitError

WEIGHT_FLOOR = 1e-12
"""A column of zero weights gets this scale, not 0."""


class _Rewriter:
    """The new graph's nodes and initializers, built in the order of the old graph's nodes."""

    def __init__(self, weights: dict[str, Any]) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.weights = weights
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.quantized: dict[str, tuple[str, str]] = {}  # activation -> (its uint8 tensor, its per-token scale)
        self.count = 0
        self.one = self.constant("tok_q/one", np.array(1.0, np.float32))
        self.zero_point = self.constant("tok_q/zero_point", np.array(128, np.uint8))
        self.inv127 = self.constant("tok_q/inv127", np.array(1.0 / 127.0, np.float32))

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.numpy_helper.from_array(array, name))
        return name

    def quantize_input(self, x: str) -> tuple[str, str]:
        if x in self.quantized:
            return self.quantized[x]
        p, make = f"tok_q/a{len(self.quantized)}/", self.helper.make_node
        self.nodes += [
            make("Abs", [x], [p + "abs"]),
            make("ReduceMax", [p + "abs"], [p + "amax"], axes=[-1], keepdims=1),
            # a token of zeros gets scale 0: its q is undefined and its products are 0 times 0
            make("Mul", [p + "amax", self.inv127], [p + "scale"]),  # (..., 1)
            make("Div", [x, p + "scale"], [p + "scaled"]),  # within [-127, 127] (times 1 / s: measured no faster)
            make("QuantizeLinear", [p + "scaled", self.one, self.zero_point], [p + "q"]),  # + 128, uint8
        ]
        self.quantized[x] = (p + "q", p + "scale")
        return self.quantized[x]

    def int8_matmul(self, x: str, w: np.ndarray, output: str) -> None:
        """``output = x @ w`` in int8, on x's per-token scales."""
        column_scale = np.maximum(np.abs(w).max(axis=0), WEIGHT_FLOOR) / 127.0
        w_int8 = np.clip(np.round(w / column_scale), -127, 127).astype(np.int8)
        q, scale = self.quantize_input(x)
        p = f"tok_q/w{self.count}/"
        inputs = [
            q,
            self.constant(p + "weight", w_int8),
            scale,
            self.constant(p + "scale", column_scale.astype(np.float32)),
        ]
        self.nodes.append(
            self.helper.make_node("MatMulIntegerToFloat", [*inputs, self.zero_point], [output], domain="com.microsoft")
        )
        self.count += 1

    def matmul(self, node: Any) -> bool:
        """A MatMul of an activation by a constant 2-D weight, rewritten; False for any other node."""
        weight = self.weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or len(weight.dims) != 2 or node.input[0] in self.weights:
            return False
        self.int8_matmul(node.input[0], self.numpy_helper.to_array(weight).astype(np.float32), node.output[0])
        return True

    def attention(self, node: Any) -> bool:
        """ONNX Runtime's fused ``Attention``, rewritten; False for any other node."""
        if node.op_type != "Attention" or node.domain != "com.microsoft":
            return False
        attributes = {a.name: self.helper.get_attribute_value(a) for a in node.attribute}
        inputs = [*node.input, "", "", ""][:4]
        plain = (
            len(node.input) <= 4
            and inputs[1] in self.weights
            and inputs[2] in self.weights
            and set(attributes) <= {"num_heads", "mask_filter_value", "scale"}
        )
        if not plain:
            raise LayerExitError(f"per-token int8 cannot rewrite the fused attention {node.name!r} of this graph")
        qkv = self.numpy_helper.to_array(self.weights[inputs[1]]).astype(np.float32)
        width = qkv.shape[1] // 3
        projected = [f"{node.name}/tok_q/{part}" for part in ("query", "key", "value")]
        for i, name in enumerate(projected):
            self.int8_matmul(inputs[0], qkv[:, i * width : (i + 1) * width], name)
        self.nodes.append(
            self.helper.make_node(
                "MultiHeadAttention",
                [*projected, inputs[2], inputs[3]],  # the bias of all three projections, the padding mask
                list(node.output),
                name=node.name,
                domain="com.microsoft",
                **attributes,
            )
        )
        return True


def quantize_per_token(onnx: Any, source: Path, target: Path) -> int:
    """Rewrite the graph at ``source`` into ``target``; returns how many MatMuls it quantized (a fused
    attention counts three)."""
    model = onnx.load(str(source))
    graph = model.graph
    rewriter = _Rewriter({init.name: init for init in graph.initializer})
    for node in graph.node:
        if not (rewriter.attention(node) or rewriter.matmul(node)):
            rewriter.nodes.append(node)
    used = {name for node in rewriter.nodes for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + [init for init in rewriter.initializers if init.name in used])
    del graph.node[:]
    graph.node.extend(rewriter.nodes)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(target))
    return rewriter.count
