"""Train then evaluate from the command line, on a tiny random encoder saved to a local folder."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, BertTokenizerFast

from layerexit.cli import main

from .conftest import tiny_config

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "zeta", "iota"]


def make_encoder(folder: Path) -> Path:
    """A tiny BERT with a word-level vocabulary, saved like a hub checkpoint."""
    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", *WORDS]
    BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(folder)
    config = tiny_config("bert")
    config.vocab_size = len(vocab)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    return folder


def make_task(folder: Path, sizes: dict[str, int]) -> Path:
    """Sentiment by keyword: 'good' -> pos, 'bad' -> neg, amid random filler words."""
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for split, n in sizes.items():
        with (folder / f"{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for i in range(n):
                label = "pos" if i % 2 else "neg"
                words = rng.choices(WORDS, k=rng.randint(3, 10))
                words.insert(rng.randrange(len(words) + 1), "good" if label == "pos" else "bad")
                writer.writerow([" ".join(words), label])
    return folder


def test_train_then_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    encoder = make_encoder(tmp_path / "encoder")
    task = make_task(tmp_path / "task", {"train": 192, "dev": 64, "test": 64})
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--model",
            str(encoder),
            "--task",
            str(task),
            "--output",
            str(run),
            "--epochs",
            "4",
            "--batch-size",
            "16",
            "--lr",
            "3e-3",
            "--head-lr",
            "3e-3",
            "--warmup-ratio",
            "0",
            "--objective",
            "ensemble",
            "--lambda",
            "0.2",
            "--quiet",
            "--seed",
            "3",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "Best setting per strategy" in out and "voting" in out

    for name in (
        "config.json",
        "data.json",
        "layerexit.json",
        "model.safetensors",
        "train_log.jsonl",
        "train_summary.json",
        "closest_exit_ensemble.json",
    ):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["lam"] == 0.2 and config["objective"] == "ensemble" and config["seed"] == 3

    report = json.loads((run / "eval" / "report.json").read_text())
    test = report["splits"]["test"]
    assert test["size"] == 64
    assert len(test["per_layer"]["accuracy"]) == 4
    assert test["full_model"]["accuracy"] > 0.8, "the keyword task is learnable; training must have worked"
    assert test["oracle"]["accuracy"] >= test["full_model"]["accuracy"]
    assert set(report["selected"]) == {"entropy", "maxprob", "patience", "voting", "hybrid", "static"}
    rows = list(csv.DictReader((run / "eval" / "points.csv").open()))
    assert {r["split"] for r in rows} == {"dev", "test"}
    assert any(r["strategy"] == "voting" and r["k"] == "0.75" for r in rows)
    exits = list(csv.DictReader((run / "eval" / "exit_layers.csv").open()))
    assert len(exits) == 64 and all(1 <= int(r["oracle_exit"]) <= 4 for r in exits)
    full_accuracy = sum(r["full_pred"] == r["label"] for r in exits) / len(exits)
    assert all(r["full_exit"] == "4" for r in exits)
    assert full_accuracy == pytest.approx(test["full_model"]["accuracy"])
    assert (run / "eval" / "tradeoff.png").stat().st_size > 10_000

    # evaluating again reuses the stored probabilities and gives the same report
    assert main(["evaluate", str(run), "--quiet"]) == 0
    again = json.loads((run / "eval" / "report.json").read_text())
    assert again["selected"] == report["selected"]
    assert report["forward_seconds"], "the first evaluation times its forward passes"
    assert again["forward_seconds"] == report["forward_seconds"], "a replay keeps the measured times"


def test_training_is_reproducible(tmp_path: Path) -> None:
    encoder = make_encoder(tmp_path / "encoder")
    task = make_task(tmp_path / "task", {"train": 64, "dev": 32})
    weights = []
    for i in range(2):
        run = tmp_path / f"run{i}"
        args = [
            "train",
            "--model",
            str(encoder),
            "--task",
            str(task),
            "--output",
            str(run),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--quiet",
            "--no-evaluate",
        ]
        assert main(args) == 0
        weights.append(load_file(str(run / "model.safetensors")))
    # tensors, not file bytes: safetensors writes its metadata in hash-map order, which varies by process
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--task", "no-such-task"], "no-such-task"),
        (["train", "--lambda", "-1"], "--lambda must be >= 0"),
        (["train", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["evaluate", "/nonexistent/run"], "not a layerexit run folder"),
    ],
)
def test_user_errors_are_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main([*args, "--quiet"] if args[0] == "evaluate" else [*args, "--output", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_existing_run_folder_is_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    assert main(["train", "--output", str(run), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run / "precious.txt").read_text() == "keep me"


def test_compare_trains_every_method_once_and_reuses_finished_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    encoder = make_encoder(tmp_path / "encoder")
    task = make_task(tmp_path / "task", {"train": 96, "dev": 48, "test": 48})
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--model",
        str(encoder),
        "--task",
        str(task),
        "--output",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--lr",
        "3e-3",
        "--head-lr",
        "3e-3",
        "--quiet",
        "--methods",
        "finetune,static:2,deebert,fastbert,pabee,righttool,ensemble",
        "--seeds",
        "0",
        "1",
    ]
    assert main(args) == 0
    table = capsys.readouterr().out
    for name in ("DeeBERT", "FastBERT", "PABEE", "RightTool", "ours (ensemble loss)", "static:2"):
        assert name in table
    summary = json.loads((out / "compare.json").read_text())
    assert summary["cells"]["static:2"]["static"]["speedup"] == 2.0
    assert len(summary["cells"]["ensemble"]["voting"]["values"]) == 2  # two seeds
    assert (out / "compare.png").stat().st_size > 10_000
    assert json.loads((out / "righttool-seed0" / "layerexit.json").read_text())["temperatures"]
    for method in ("deebert", "fastbert"):  # their first stage is the finetune run of the seed, trained once
        stages = json.loads((out / f"{method}-seed1" / "train_summary.json").read_text())["stages"]
        assert [s["stage"] for s in stages] == [
            "finetune",
            "self-distillation" if method == "fastbert" else "internal-exits",
        ]
        assert stages[0]["trained_in"] == str(out / "finetune-seed1")

    # a second call retrains nothing: the run folders are left as they are
    stamp = (out / "ensemble-seed0" / "model.safetensors").stat().st_mtime_ns
    (out / "pabee-seed1" / "train_summary.json").unlink()  # as if interrupted
    assert main(args) == 0
    assert (out / "ensemble-seed0" / "model.safetensors").stat().st_mtime_ns == stamp
    assert (out / "pabee-seed1" / "train_summary.json").is_file()

    # a comparison of its own starts DeeBERT from this one's fine-tuning and trains no finetune run
    other = tmp_path / "cmp-deebert"
    at = args.index("--output") + 1
    own = [*args[:at], str(other), *args[at + 1 :]]
    own[own.index("--methods") + 1 : own.index("--seeds") + 3] = ["deebert", "--seeds", "1"]
    assert main([*own, "--finetune-from", str(out)]) == 0
    stages = json.loads((other / "deebert-seed1" / "train_summary.json").read_text())["stages"]
    assert stages[0]["trained_in"] == str(out / "finetune-seed1")
    assert not (other / "finetune-seed1").exists()
    assert main([*own[:-1], "3", "--finetune-from", str(out)]) == 2
    assert f"{out / 'finetune-seed3'}: no finished finetune run of seed 3" in capsys.readouterr().err
    assert not (other / "deebert-seed3").exists() and not (out / "finetune-seed3").exists()

    assert main(["analyze", str(out / "ensemble-seed0")]) == 0
    for figure in ("exit_distribution.png", "voting_values.png", "closest_exit_ensemble.png"):
        assert (out / "ensemble-seed0" / "eval" / figure).is_file()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    encoder = make_encoder(root / "encoder")
    task = make_task(root / "task", {"train": 128, "dev": 96, "test": 96})
    run = root / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(encoder),
                "--task",
                str(task),
                "--output",
                str(run),
                "--epochs",
                "2",
                "--batch-size",
                "16",
                "--lr",
                "3e-3",
                "--head-lr",
                "3e-3",
                "--quiet",
            ]
        )
        == 0
    )
    return run


def test_predict_from_arguments_file_and_stdin(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    capsys.readouterr()
    assert (
        main(["predict", str(trained_run), "alpha good beta", "bad gamma", "--strategy", "patience(patience=1)"]) == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == ["alpha good beta", "bad gamma"]
    for line in lines:
        assert line["label"] in ("neg", "pos") and 1 <= line["exit_layer"] <= 4 and line["latency_ms"] > 0

    # texts may also come after the options, or on both sides of them
    assert (
        main(["predict", str(trained_run), "--strategy", "patience(patience=1)", "alpha good beta", "bad gamma"]) == 0
    )
    after = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(a["text"], a["label"]) for a in after] == [(b["text"], b["label"]) for b in lines]
    assert (
        main(["predict", str(trained_run), "alpha good beta", "--strategy", "patience(patience=1)", "bad gamma"]) == 0
    )
    assert [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()] == [
        "alpha good beta",
        "bad gamma",
    ]
    with pytest.raises(SystemExit):
        main(["predict", str(trained_run), "--strategy", "patience(patience=1)", "x", "--no-such-option"])
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and "--no-such-option" in err

    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('{"sentence": "good alpha"}\n{"sentence": ""}\n{"sentence": "bad"}\n')
    assert main(["predict", str(trained_run), "--file", str(inputs), "--text-column", "sentence"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2 and "skipped 1 rows" in captured.err
    assert "selected on dev" in captured.err  # no strategy given: the one evaluate selected

    # a second text for a model trained on single texts is refused, naming the run and the option
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"sentence": "good alpha", "other": "beta"}\n')
    args = ["predict", str(trained_run), "--file", str(pairs), "--text-column", "sentence", "--pair-column", "other"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(trained_run) in err and "trained on single texts" in err and "--pair-column" in err

    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("good good\nbad bad\n"))
    assert main(["predict", str(trained_run)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2

    assert main(["predict", str(trained_run), "x", "--strategy", "oracle()"]) == 2
    assert "needs labels" in capsys.readouterr().err


def _bench(run: Path, out: Path, samples: str, batch_sizes: list[str], *extra: str) -> int:
    """`layerexit bench` with a fixed static strategy, one repeat and one thread (fast, deterministic exits)."""
    fixed = ["--strategy", "static(layer=2)", "--repeats", "1", "--threads", "1", "--output", str(out), "--quiet"]
    return main(["bench", str(run), *fixed, "--samples", samples, "--batch-sizes", *batch_sizes, *extra])


def test_bench_writes_both_speedups(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert _bench(trained_run, out, "24", ["1", "8"]) == 0
    results = json.loads(out.read_text())
    assert results["mean_exit_layer"] == 2.0 and results["samples"] == 24 and results["threads"] == 1
    for size in ("1", "8"):
        entry = results["batch_sizes"][size]
        assert entry["layer_speedup"] == 2.0  # static(layer=2) of 4 layers
        full, early = entry["full"], entry["early_exit"]
        # the wall-clock speed-up is the ratio of the two rows' totals over the same 24 inputs, and the
        # throughput is inputs over total time (rounding aside): the table says what it measured
        # totals are stored rounded to 1e-4 s: allow exactly what that rounding can move each ratio by
        ratio = full["total_s"] / early["total_s"]
        slack = ratio * (5e-5 / full["total_s"] + 5e-5 / early["total_s"]) + 1e-4
        assert entry["wallclock_speedup"] == pytest.approx(ratio, abs=slack)
        assert entry["wallclock_over_layer"] == pytest.approx(entry["wallclock_speedup"] / 2.0, abs=1e-3)
        # the exit loop run to the last layer, against early exit: the layer saving alone
        loop = entry["all_layers"]["total_s"]
        looped = loop / early["total_s"]
        slack = looped * (5e-5 / loop + 5e-5 / early["total_s"]) + 1e-4
        assert entry["early_exit_vs_all_layers"] == pytest.approx(looped, abs=slack)
        # with one pass, the pass-by-pass range is that pass's speed-up: the median itself
        low, high = entry["early_exit_vs_full_passes"]
        assert low == high == pytest.approx(entry["wallclock_speedup"], rel=1e-3)
        for row in (full, early):
            rate = 24 / row["total_s"]
            assert row["throughput_per_s"] == pytest.approx(rate, abs=rate * 5e-5 / row["total_s"] + 0.1)
            assert 0 < row["median_ms"] <= row["p90_ms"]
    printed = capsys.readouterr().out
    assert "wall-clock" in printed and f"{results['batch_sizes']['8']['wallclock_speedup']:.2f}x" in printed
    assert "torch early exit vs torch full model, pass by pass" in printed


def test_bench_at_a_chosen_length(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--tokens N` times inputs of exactly N tokens, made by joining the split's texts."""
    out = tmp_path / "bench.json"
    assert _bench(trained_run, out, "4", ["1", "2"], "--tokens", "40") == 0
    results = json.loads(out.read_text())
    assert results["samples"] == 4 and results["mean_tokens"] == 40
    assert _bench(trained_run, out, "4", ["1"], "--tokens", "4000") == 2
    assert "--tokens must be between 4 and the model's" in capsys.readouterr().err
    assert _bench(trained_run, out, "500", ["1"], "--tokens", "60") == 2
    assert "make only" in capsys.readouterr().err


def test_calibrate_both_modes_and_predict_uses_the_choice(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from layerexit import Predictor, strategies

    texts = [" ".join(random.Random(i).choices([*WORDS, "good", "bad"], k=1 + i % 9)) for i in range(30)]
    for mode in (["--target-speedup", "1.5"], ["--max-drop", "0.2", "--confidence", "0.8"]):
        assert main(["calibrate", str(trained_run), *mode, "--quiet"]) == 0
        saved = json.loads((trained_run / "calibration.json").read_text())
        assert saved["mode"] == ("speedup" if mode[0] == "--target-speedup" else "risk")
        chosen = strategies.parse(saved["default"])
        # what runs is exactly what was certified: the stored text parses back to the same setting...
        assert str(chosen) == saved["default"]
        predictor = Predictor.from_run(trained_run, threads=1)
        assert predictor.strategy == chosen and predictor.strategy_source.startswith("calibrated")
        # ... and `predict` gives, input by input, the exit layers offline replay of that setting gives
        capsys.readouterr()
        assert main(["predict", str(trained_run), *texts]) == 0
        captured = capsys.readouterr()
        assert f"strategy: {chosen} (calibrated" in captured.err
        online = [json.loads(line)["exit_layer"] for line in captured.out.splitlines()]
        encoded = predictor.encode(texts)
        from layerexit.data.encoding import collate

        batch = collate(encoded, list(range(len(texts))), predictor.pad_id)
        with torch.inference_mode():
            probs = predictor.model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")).probs
        assert online == chosen.replay(probs)[0].tolist()
    assert main(["calibrate", str(trained_run), "--quiet"]) == 2
    assert "either --target-speedup or --max-drop" in capsys.readouterr().err


def test_predictor_keeps_input_order_across_batch_sizes(trained_run: Path) -> None:
    from layerexit import Predictor

    predictor = Predictor.from_run(trained_run, "entropy(threshold=0.5)")
    rng = random.Random(1)
    texts = [" ".join(rng.choices([*WORDS, "good", "bad"], k=rng.randint(1, 12))) for _ in range(40)]
    one_by_one = predictor.predict(texts, batch_size=1)
    batched = predictor.predict(texts, batch_size=8)
    assert [(p.label, p.exit_layer) for p in one_by_one] == [(p.label, p.exit_layer) for p in batched]
    for p, q in zip(one_by_one, batched, strict=True):
        assert p.probability == pytest.approx(q.probability, abs=1e-4)


def test_onnx_export_evaluate_predict_and_bench(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxruntime")
    assert main(["export", str(trained_run), "--quiet"]) == 0
    assert main(["export", str(trained_run), "--runtime", "onnx-int8", "--quiet"]) == 0
    assert (trained_run / "onnx" / "onnx_manifest.json").is_file()

    assert main(["evaluate", str(trained_run), "--runtime", "onnx", "--quiet"]) == 0
    onnx_report = json.loads((trained_run / "eval-onnx" / "report.json").read_text())
    torch_report = json.loads((trained_run / "eval" / "report.json").read_text())
    assert onnx_report["splits"]["test"]["per_layer"] == torch_report["splits"]["test"]["per_layer"]
    assert main(["evaluate", str(trained_run), "--runtime", "onnx-int8", "--quiet"]) == 0
    assert "onnx-int8" in capsys.readouterr().out  # the accuracy change against PyTorch is printed

    args = ["alpha good", "bad beta gamma", "--strategy", "entropy(threshold=0.5)"]
    assert main(["predict", str(trained_run), *args]) == 0
    with_torch = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["predict", str(trained_run), *args, "--runtime", "onnx"]) == 0
    with_onnx = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(p["label"], p["exit_layer"]) for p in with_torch] == [(p["label"], p["exit_layer"]) for p in with_onnx]

    out = tmp_path / "bench.json"
    assert _bench(trained_run, out, "16", ["1", "4"], "--runtime", "torch", "onnx", "onnx-int8") == 0
    entry = json.loads(out.read_text())["batch_sizes"]["1"]
    # each runtime's ratio is to the layers its own exits saved: static(layer=2) of 4 layers on every runtime
    assert entry["layer_speedup"] == entry["onnx_layer_speedup"] == entry["onnx_int8_layer_speedup"] == 2.0
    printed = capsys.readouterr().out
    assert "from its own exits" in printed
    assert {"full", "all_layers", "early_exit", "onnx_full", "onnx_all_layers", "onnx_early_exit"} <= set(entry)
    assert entry["onnx_early_exit_vs_onnx_all_layers"] > 0
    assert entry["onnx_early_exit_vs_onnx_full"] > 0
    assert entry["onnx_early_exit_vs_onnx_full_passes"] == [entry["onnx_early_exit_vs_onnx_full"]] * 2  # one pass

    # a served model has its one-call graphs (single row and batch) before the first request waits for them
    from layerexit.serving.config import EngineConfig
    from layerexit.serving.server import engine_for_run

    config = EngineConfig(run=str(trained_run), strategy="entropy(threshold=0.5)", runtime="onnx", scheduler="batch")
    engine, _ = engine_for_run(config)
    try:
        assert sorted(batched for _, batched in engine.runner.runtime._fused) == [False, True]
    finally:
        engine.close()


def test_predict_and_bench_refuse_an_unfinished_run(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    run = tmp_path / "unfinished"
    shutil.copytree(trained_run, run)
    (run / "train_summary.json").unlink()
    (run / "checkpoint").mkdir()  # as a run killed mid-training leaves it
    for args in (["predict", str(run), "good"], ["bench", str(run), "--quiet"]):
        assert main(args) == 2
        assert "did not finish" in capsys.readouterr().err
