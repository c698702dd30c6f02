"""One ONNX graph for a whole early exit: the embeddings, every layer with its exit, and the strategy's
decision after each layer, nested in ``If`` nodes so that layer l+1 runs only while some row has not left.

The exit loop (:mod:`layerexit.runtime.loop`) calls a runtime once per layer and decides in Python. On
ONNX Runtime that costs, per layer, a session call, the copies around it, the strategy's step and, with
a thread pool per session, waking the layer session's threads; for a MiniLM at batch 1 that is a third
of the time. Built from the export's own graphs (checked against the manifest), this graph runs the same
layers on the same rows in one call. The batched form does inside the graph what the loop's ``take``
does: rows that leave are dropped before the next layer, and when some left, the trailing columns no
remaining row uses are cut; the single-row form has none of that.

It decides exactly as :meth:`Strategy.step` does:

* votes, patience counters and argmaxes are integer logic, and voting's summed probabilities are added in
  float64 in the same order, so they are bit for bit the Python step's;
* an entropy or a top probability is compared with its threshold in float32, where ONNX Runtime's ``Log``
  may differ from PyTorch's in the last bits. The graph therefore also returns the smallest distance of
  any such score from its threshold, and a call in which some score came within :data:`MARGIN` of a
  threshold is run again through the per-layer loop, whose decision is the reference.

Strategies without a graph form here (none in :mod:`layerexit.strategies` today, but a user's own) run
through the per-layer loop. The learned agreement rule's score is float64 arithmetic that ONNX Runtime may
order differently; it goes into the margin like an entropy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from layerexit import strategies
from layerexit.strategies import Strategy, voting_denominator

MARGIN = 1e-4
"""A row whose entropy or top probability came closer than this to a threshold is decided again by the
per-layer loop. Float32 entropies of the same probabilities differ between runtimes by about 1e-7."""

OUTPUTS = ("positions", "probs", "exit_layer", "prediction", "margin")
"""The fused graph's outputs, one row per input row in the order they left: its position in the batch (n,),
its exit's probabilities (n, C), the 1-based exit layer (n,) and the prediction (n,); then the smallest
distance of a compared score from its threshold (1,) (``inf`` when nothing was compared)."""


@dataclass
class _Scope:
    """The nodes and constants of one graph scope. A layer's weights are initializers of the scope its
    nodes run in: ONNX Runtime pre-packs a scope's own constant weights for its matrix kernels but not
    weights read from an outer scope, and the two kernels round differently."""

    constants: list[Any]
    opset: int
    nodes: list[Any] = field(default_factory=list)
    counter: list[int] = field(default_factory=lambda: [0])

    def child(self) -> _Scope:
        return _Scope([], self.opset, [], self.counter)

    def name(self, hint: str) -> str:
        self.counter[0] += 1
        return f"fx{self.counter[0]}_{hint}"

    def const(self, value: Any, dtype: Any, hint: str = "c") -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.constants.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, hint: str = "", **attrs: Any) -> str:
        from onnx import helper

        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out


State = dict[str, str]
Decision = tuple[str, str, str | None]
"""``(fire (1,) bool, prediction (1,) int64, score distance from threshold (1,) float32 or None)``."""
Builder = Callable[[Any, _Scope, int, str, int, State], Decision]
"""``(strategy, scope, layer, probs, num_labels, state) -> decision``; ``state`` is updated in place."""


def _argmax(g: _Scope, x: str) -> str:
    return g.op("ArgMax", x, axis=-1, keepdims=0, hint="argmax")  # first maximum, as torch.argmax


def _max(g: _Scope, x: str, keepdims: int) -> str:
    """The largest value over the last axis (``ReduceMax`` took its axes as an attribute before opset 18)."""
    if g.opset >= 18:
        return g.op("ReduceMax", x, g.const([-1], np.int64), keepdims=keepdims)
    return g.op("ReduceMax", x, axes=[-1], keepdims=keepdims)


def _entropy(g: _Scope, probs: str, normalized: bool, num_labels: int, dtype: Any = np.float32) -> str:
    """:func:`layerexit.strategies.entropy` (n,), in ``probs``' type ``dtype``."""
    logs = g.op("Log", g.op("Max", probs, g.const(1e-12, dtype)))
    total = g.op("ReduceSum", g.op("Mul", probs, logs), g.const([-1], np.int64), keepdims=0)
    h = g.op("Neg", total, hint="entropy")
    return g.op("Div", h, g.const(math.log(num_labels), dtype)) if normalized else h


def _distance(g: _Scope, score: str, threshold: str) -> str:
    return g.op("Abs", g.op("Sub", score, threshold), hint="distance")


def _entropy_rule(s: strategies.Entropy, g: _Scope, layer: int, probs: str, num_labels: int, state: State) -> Decision:
    h = _entropy(g, probs, s.normalized, num_labels)
    threshold = g.const([s.threshold], np.float32)
    return g.op("Less", h, threshold), _argmax(g, probs), _distance(g, h, threshold)


def _maxprob_rule(s: strategies.MaxProb, g: _Scope, layer: int, probs: str, num_labels: int, state: State) -> Decision:
    top = _max(g, probs, keepdims=0)
    threshold = g.const([s.threshold], np.float32)
    return g.op("GreaterOrEqual", top, threshold), _argmax(g, probs), _distance(g, top, threshold)


def _patience_rule(
    s: strategies.Patience, g: _Scope, layer: int, probs: str, num_labels: int, state: State
) -> Decision:
    pred = _argmax(g, probs)
    if layer == 1:
        counter = g.op("Sub", pred, pred)  # zeros, one per row
    else:
        same = g.op("Equal", pred, state["previous"])
        counter = g.op("Where", same, g.op("Add", state["counter"], g.const([1], np.int64)), g.const([0], np.int64))
    state["previous"], state["counter"] = pred, counter
    return g.op("Equal", counter, g.const([s.patience], np.int64)), pred, None


def _pcee_rule(s: strategies.Pcee, g: _Scope, layer: int, probs: str, num_labels: int, state: State) -> Decision:
    h = _entropy(g, probs, True, num_labels)
    threshold = g.const([s.threshold], np.float32)
    confident = g.op("Cast", g.op("Less", h, threshold), to=7)  # int64: 1 where confident
    counter = confident if layer == 1 else g.op("Mul", g.op("Add", state["counter"], g.const([1], np.int64)), confident)
    state["counter"] = counter
    fire = g.op("GreaterOrEqual", counter, g.const([s.patience], np.int64))
    return fire, _argmax(g, probs), _distance(g, h, threshold)


def _votes(s: strategies.Voting, g: _Scope, layer: int, probs: str, num_labels: int, state: State) -> tuple[str, str]:
    """Voting's step: ``(fire, prediction)``, with votes and float64 mass carried in ``state``."""
    choice = g.op("Unsqueeze", _argmax(g, probs), g.const([-1], np.int64))  # (1, 1)
    ballot = g.op("Cast", g.op("Equal", choice, g.const(np.arange(num_labels), np.int64)), to=7)  # (1, C) int64
    mass = g.op("Cast", probs, to=11)  # float64
    if layer > 1:
        ballot, mass = g.op("Add", state["votes"], ballot), g.op("Add", state["mass"], mass)
    state["votes"], state["mass"] = ballot, mass
    top = _max(g, ballot, keepdims=1)  # (1, 1)
    tied = g.op("Equal", ballot, top)
    pred = _argmax(g, g.op("Where", tied, mass, g.const(-1.0, np.float64)))
    score = g.op("Div", g.op("Cast", g.op("Squeeze", top, g.const([-1], np.int64)), to=11),
                 g.const(voting_denominator(layer, s.k), np.float64))  # fmt: skip
    return g.op("GreaterOrEqual", score, g.const(s.threshold, np.float64)), pred


def _voting_rule(s: strategies.Voting, g: _Scope, layer: int, probs: str, num_labels: int, state: State) -> Decision:
    fire, pred = _votes(s, g, layer, probs, num_labels, state)
    return fire, pred, None


def _hybrid_rule(s: strategies.Hybrid, g: _Scope, layer: int, probs: str, num_labels: int, state: State) -> Decision:
    vote_fire, vote_pred = _votes(strategies.Voting(s.k, s.threshold), g, layer, probs, num_labels, state)
    h = _entropy(g, probs, True, num_labels)
    threshold = g.const([s.entropy_threshold], np.float32)
    confident = g.op("Less", h, threshold)
    pred = g.op("Where", g.op("Or", vote_fire, g.op("Not", confident)), vote_pred, _argmax(g, probs))
    return g.op("Or", vote_fire, confident), pred, _distance(g, h, threshold)


def _static_rule(s: strategies.Static, g: _Scope, layer: int, probs: str, num_labels: int, state: State) -> Decision:
    pred = _argmax(g, probs)
    return g.op("Expand", g.const([layer >= s.layer], np.bool_), g.op("Shape", pred)), pred, None


def _agreement_rule(
    s: strategies.Agreement, g: _Scope, layer: int, probs: str, num_labels: int, state: State
) -> Decision:
    """The learned rule (:func:`layerexit.strategies.learned.statistics` and ``AgreementRule.score``) in
    float64: per-class votes, mass and lowest probability carried in ``state``, the nine statistics, the
    logistic score. ONNX Runtime may sum the score's dot product in another order than PyTorch, so the score's
    distance from the threshold goes into the margin: a call that comes within :data:`MARGIN` of it runs
    through the loop."""
    from onnx import helper

    from layerexit.strategies.learned import NUM_STATS

    rule = s.fitted
    if num_labels < 2 or rule.num_classes != num_labels or layer > rule.num_layers:
        raise KeyError(s)  # no graph form: the loop decides (and refuses what it must)
    p = g.op("Cast", probs, to=11)  # (n, C) float64
    pred = _argmax(g, probs)  # float32 and float64 order the same
    pick = g.op("Unsqueeze", pred, g.const([-1], np.int64))  # (n, 1)
    ballot = g.op("Cast", g.op("Equal", pick, g.const(np.arange(num_labels), np.int64)), to=11)
    if layer == 1:  # from zeros, zeros and ones: the sums are exact and min(1, p) is p
        votes, mass, low = ballot, p, p
    else:
        votes, mass = g.op("Add", state["votes"], ballot), g.op("Add", state["mass"], p)
        low = g.op("Min", state["low"], p)
    state["votes"], state["mass"], state["low"] = votes, mass, low

    def take(x: str) -> str:  # x[row, prediction], (n, 1)
        return g.op("GatherElements", x, pick, axis=1)

    top2, top2_index = g.name("top2"), g.name("top2_index")  # values (n, 2), largest first; indices unused
    g.nodes.append(helper.make_node("TopK", [p, g.const([2], np.int64)], [top2, top2_index], axis=-1))
    first = g.op("Slice", top2, g.const([0], np.int64), g.const([1], np.int64), g.const([1], np.int64))
    second = g.op("Slice", top2, g.const([1], np.int64), g.const([2], np.int64), g.const([1], np.int64))
    h = g.op("Unsqueeze", _entropy(g, p, True, num_labels, np.float64), g.const([-1], np.int64))  # (n, 1)
    depth = g.const(float(layer), np.float64)
    mean, share, lowest = g.op("Div", take(mass), depth), g.op("Div", take(votes), depth), take(low)
    one = g.const(1.0, np.float64)
    near = g.op("Concat", g.op("Sub", one, first), h, g.op("Sub", one, lowest), axis=1)
    near = g.op("Log", g.op("Max", near, g.const(1e-9, np.float64)))
    stats = g.op("Concat", first, g.op("Sub", first, second), h, mean, lowest, share, near, axis=1)  # (n, 9)
    weights = rule.weights.numpy()
    linear = g.op("MatMul", stats, g.const(weights[:NUM_STATS], np.float64))  # (n,)
    offset = g.const(float(weights[NUM_STATS + layer - 1]) + rule.bias, np.float64)
    score = g.op("Sigmoid", g.op("Add", linear, offset))
    threshold = g.const(s.threshold, np.float64)
    distance = g.op("Cast", _distance(g, score, threshold), to=1)  # float32, as the margin
    return g.op("GreaterOrEqual", score, threshold), pred, distance


RULES: dict[type[Strategy], Builder] = {
    strategies.Entropy: _entropy_rule,
    strategies.MaxProb: _maxprob_rule,
    strategies.Patience: _patience_rule,
    strategies.Voting: _voting_rule,
    strategies.Hybrid: _hybrid_rule,
    strategies.Static: _static_rule,
    strategies.Pcee: _pcee_rule,
    strategies.Agreement: _agreement_rule,
}
"""The graph form of each strategy's ``step``, by exact class (a subclass may change ``step``)."""


def fusable(strategy: Strategy) -> bool:
    return type(strategy) in RULES


@dataclass(frozen=True)
class _Rows:
    """The names of the values of the rows still running, in some scope."""

    hidden: str
    mask: str
    second: str | None
    positions: str


def fused_graph(
    embed: Any, layers: list[Any], strategy: Strategy, num_labels: int, input_names: list[str], *, batched: bool
) -> Any:
    """The early-exit graph (an ``onnx.ModelProto``) from an export's loaded graphs.

    ``embed`` and ``layers`` are the export's ``onnx.ModelProto``s; ``input_names`` the fused graph's
    inputs (the embeddings' inputs, ``attention_mask`` and, where layers pool text pairs,
    ``second_text``). ``batched``: rows leave one by one, as in the exit loop: a row that exits is
    dropped before the next layer, and the padding no remaining row uses is cut; else a graph for one row.
    Raises ``KeyError`` for a strategy without a graph form (:func:`fusable`).
    """
    from onnx import TensorProto, compose, helper

    rule = RULES[type(strategy)]
    inputs = {"input_ids", "attention_mask", "token_type_ids", "second_text"}

    def renamed(model: Any, prefix: str, feeds: dict[str, str]) -> Any:
        graph = compose.add_prefix(model, prefix, rename_inputs=False).graph
        for node in graph.node:
            for k, name in enumerate(node.input):
                if name in feeds:
                    node.input[k] = feeds[name]
        return graph

    opsets: dict[str, int] = {}
    for model in (embed, *layers):
        for entry in model.opset_import:
            opsets[entry.domain] = max(opsets.get(entry.domain, 0), entry.version)
    outer = _Scope(constants=[], opset=opsets.get("", opsets.get("ai.onnx", 0)))
    embed_graph = renamed(embed, "e_", {})
    outer.constants.extend(embed_graph.initializer)
    outer.nodes.extend(embed_graph.node)
    graph_inputs = {i.name: i for g in (embed.graph, *(m.graph for m in layers)) for i in g.input if i.name in inputs}
    kinds = (TensorProto.INT64, TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT64, TensorProto.FLOAT)
    # ranks declared (rows unknown): a runtime that plans by rank, such as OpenVINO, can then read the graph
    shapes: tuple[list[int | None], ...] = ([None], [None, num_labels], [None], [None], [1])

    def values(names: Sequence[str]) -> list[Any]:
        return [helper.make_tensor_value_info(n, k, s) for n, k, s in zip(names, kinds, shapes, strict=True)]

    outputs = values(OUTPUTS)

    def level(g: _Scope, layer: int, rows: _Rows, state: State, margin: str) -> tuple[str, ...]:
        """Layer ``layer`` and everything after it in scope ``g``: the names of the five outputs."""
        feeds = {"hidden": rows.hidden, "attention_mask": rows.mask}
        if rows.second is not None:
            feeds["second_text"] = rows.second
        layer_graph = renamed(layers[layer - 1], f"l{layer}_", feeds)
        g.constants.extend(layer_graph.initializer)
        g.nodes.extend(layer_graph.node)
        probs, hidden = f"l{layer}_probs", f"l{layer}_hidden_out"
        fire, pred, distance = rule(strategy, g, layer, probs, num_labels, state)
        if distance is not None:
            margin = g.op("Min", margin, g.op("ReduceMin", distance, keepdims=0), hint="margin")
        depth = g.op("Expand", g.const([layer], np.int64, "layer"), g.op("Shape", rows.positions))
        here = (rows.positions, probs, depth, pred, margin)
        if layer == len(layers):
            return here
        leave, go_on = g.child(), g.child()
        after = _Rows(hidden, rows.mask, rows.second, rows.positions)
        if not batched:
            cond = g.op("Squeeze", fire, g.const([0], np.int64), hint="cond")  # (1,) -> a scalar
            deeper = level(go_on, layer + 1, after, dict(state), margin)
        else:
            cond = g.op(
                "Equal", g.op("ReduceMin", g.op("Cast", fire, to=TensorProto.INT64), keepdims=0), g.const(1, np.int64)
            )
            kept, gone, state = _drop(go_on, after, fire, here[1:4], state)
            deeper = level(go_on, layer + 1, kept, state, margin)
            deeper = (*(go_on.op("Concat", a, b, axis=0) for a, b in zip(gone, deeper[:4], strict=True)), deeper[4])
        results = [g.name(o) for o in OUTPUTS]
        g.nodes.append(
            helper.make_node("If", [cond], results, then_branch=branch(leave, here), else_branch=branch(go_on, deeper))
        )
        return tuple(results)

    def branch(g: _Scope, names: tuple[str, ...]) -> Any:
        """Scope ``g`` as an ``If`` branch whose outputs are copies of ``names`` (which may be outer values)."""
        outs = [g.op("Identity", name, hint=o) for name, o in zip(names, OUTPUTS, strict=True)]
        return helper.make_graph(g.nodes, g.name("branch"), [], values(outs), initializer=g.constants)

    if batched:
        count = outer.op("Gather", outer.op("Shape", "attention_mask"), outer.const(0, np.int64), axis=0)
        positions = outer.op("Range", outer.const(0, np.int64), count, outer.const(1, np.int64), hint="positions")
    else:
        positions = outer.const([0], np.int64, "positions")
    second = "second_text" if "second_text" in input_names else None
    start = _Rows("e_hidden", "attention_mask", second, positions)
    names = level(outer, 1, start, {}, outer.const([np.inf], np.float32, "margin"))
    outer.nodes.extend(helper.make_node("Identity", [name], [o]) for name, o in zip(names, OUTPUTS, strict=True))
    graph = helper.make_graph(
        outer.nodes, "layerexit_fused", [graph_inputs[n] for n in input_names], outputs, initializer=outer.constants
    )
    fused = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    fused.ir_version = max(m.ir_version for m in (embed, *layers))
    return fused


def _drop(
    g: _Scope, rows: _Rows, fire: str, answers: tuple[str, ...], state: State
) -> tuple[_Rows, tuple[str, ...], State]:
    """What the exit loop does when some rows leave and others go on (``take``): the rows that fire give
    their answers (positions, probs, layer, prediction) and the others, with their state, go on; when any
    row left, the trailing columns no remaining row uses are cut. ``(rows going on, answers, state)``."""
    keep = g.op("Not", fire)
    gone = tuple(g.op("Compress", name, fire, axis=0) for name in (rows.positions, *answers))
    hidden, mask, positions = (
        g.op("Compress", name, keep, axis=0) for name in (rows.hidden, rows.mask, rows.positions)
    )
    second = None if rows.second is None else g.op("Compress", rows.second, keep, axis=0)
    state = {key: g.op("Compress", value, keep, axis=0) for key, value in state.items()}
    width = g.op("Gather", g.op("Shape", mask), g.const(1, np.int64), axis=0)  # scalar
    columns = g.op("Range", g.const(1, np.int64), g.op("Add", width, g.const(1, np.int64)), g.const(1, np.int64))
    used = g.op("ReduceMax", g.op("Mul", mask, columns), keepdims=0)  # 1 + the last column any row uses
    length = g.op("Where", g.op("Equal", used, g.const(0, np.int64)), width, used)  # no token at all: keep all
    left = g.op("Greater", g.op("ReduceMax", g.op("Cast", fire, to=7), keepdims=0), g.const(0, np.int64))
    ends = g.op("Reshape", g.op("Where", left, length, width), g.const([1], np.int64))
    starts, axes = g.const([0], np.int64), g.const([1], np.int64)
    hidden, mask = g.op("Slice", hidden, starts, ends, axes), g.op("Slice", mask, starts, ends, axes)
    second = None if second is None else g.op("Slice", second, starts, ends, axes)
    return _Rows(hidden, mask, second, positions), gone, state
