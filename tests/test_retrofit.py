"""Retrofit: a fine-tuned classifier keeps its head and its answers at full depth; its exits train on cached states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification, pipeline

from layerexit.cli import main
from layerexit.errors import LayerExitError
from layerexit.model import EarlyExitModel
from layerexit.run_folder import RunFolder
from layerexit.training.retrofit import RetrofitConfig

from .conftest import ARCHITECTURES, NEWER_ARCHITECTURES, random_batch, tiny_config
from .test_end_to_end import make_encoder, make_task

LABELS = {0: "neg", 1: "pos"}


def tiny_classifier(arch: str, folder: Path, num_labels: int = 3) -> AutoModelForSequenceClassification:
    torch.manual_seed(0)
    config = tiny_config(arch)
    config.num_labels = num_labels
    config.id2label = {i: f"class-{i}" for i in range(num_labels)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    model = AutoModelForSequenceClassification.from_config(config).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("arch", ARCHITECTURES + NEWER_ARCHITECTURES)
def test_full_depth_is_the_classifier(arch: str, tmp_path: Path) -> None:
    """Exit L is the classifier's own head: the same logits as its forward, before and after saving."""
    classifier = tiny_classifier(arch, tmp_path / "classifier")
    model = EarlyExitModel.from_classifier(str(tmp_path / "classifier"), head="mlp", pooling="mean")
    assert model.config.final_head == "native"
    assert model.config.label_names == ["class-0", "class-1", "class-2"]
    model.save_pretrained(tmp_path / "run")
    loaded = EarlyExitModel.from_pretrained(tmp_path / "run")
    ids, mask = random_batch()
    with torch.no_grad():
        expected = classifier(input_ids=ids, attention_mask=mask).logits
        for candidate in (model, loaded):
            logits = candidate(ids, mask).logits  # (L, B, C)
            assert logits.shape == (4, ids.shape[0], 3)
            torch.testing.assert_close(logits[-1], expected, rtol=1e-5, atol=1e-6)


def test_an_encoder_is_not_a_classifier(tmp_path: Path) -> None:
    make_encoder(tmp_path / "encoder")  # AutoModel: transformers gives it a fresh head, which is not the user's
    folder = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2ForSequenceClassification

    GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(folder)
    with pytest.raises(LayerExitError, match="cannot retrofit a 'gpt2' classifier"):
        EarlyExitModel.from_classifier(str(folder))


@pytest.fixture(scope="module")
def user_classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(classifier folder, task folder): a tiny BERT fine-tuned on the keyword task with plain transformers and
    torch, saved with save_pretrained, as a user would make one."""
    root = tmp_path_factory.mktemp("user")
    encoder = make_encoder(root / "encoder")
    task = make_task(root / "task", {"train": 160, "dev": 60, "test": 60})
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        encoder, num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}
    )
    rows = [line.rsplit(",", 1) for line in (task / "train.csv").read_text().splitlines()[1:]]
    texts, labels = [t for t, _ in rows], torch.tensor([int(y == "pos") for _, y in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(40):
        rows_ = torch.arange(step * 16, step * 16 + 16) % len(texts)
        batch = tokenizer([texts[i] for i in rows_], padding=True, return_tensors="pt")
        loss = model(**batch, labels=labels[rows_]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    classifier = root / "classifier"
    model.save_pretrained(classifier)
    tokenizer.save_pretrained(classifier)
    return classifier, task


def retrofit_args(classifier: Path, task: Path | str, run: Path, *extra: str) -> list[str]:
    return ["retrofit", str(classifier), "--task", str(task), "--output", str(run), "--epochs", "15",
            "--batch-size", "32", "--max-length", "32", "--threads", "1", "--quiet", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def retrofitted(user_classifier: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    classifier, task = user_classifier
    run = tmp_path_factory.mktemp("retrofit") / "run"
    assert main(retrofit_args(classifier, task, run)) == 0
    return run


def test_retrofit_keeps_the_classifiers_answers(user_classifier: tuple[Path, Path], retrofitted: Path) -> None:
    classifier, task = user_classifier
    run = retrofitted
    folder = RunFolder(run)
    report = folder.report()
    assert folder.config().objective == "retrofit"
    assert json.loads(folder.retrofit_file.read_text())["loss"] == "distill"
    # full depth on test: the probabilities of transformers' own pipeline, label names included
    probs, _ = folder.read_probs("test")
    texts = [line.rsplit(",", 1)[0] for line in (task / "test.csv").read_text().splitlines()[1:]]
    classify = pipeline("text-classification", model=str(classifier), top_k=None)
    for i, answer in enumerate(classify(texts[:20])):
        by_name = {a["label"]: a["score"] for a in answer}
        assert by_name == pytest.approx({"neg": float(probs[-1, i, 0]), "pos": float(probs[-1, i, 1])}, abs=1e-5)
    assert report["splits"]["test"]["per_layer"]["accuracy"][-1] > 0.9  # the classifier learned the task
    summary = folder.summary()
    assert summary["labelled"] and len(summary["exits"]) == 3  # the three internal exits
    assert all(1 <= e["best_epoch"] <= 15 for e in summary["exits"])
    assert len(summary["held_out_loss_by_epoch"]) == 15
    # an ordinary run folder: calibrate against the classifier's own answers, then predict
    assert (
        main(
            ["calibrate", str(run), "--max-drop", "0.1", "--loss", "disagreement", "--strategies", "entropy", "--quiet"]
        )
        == 0
    )
    assert main(["predict", str(run), "good movie", "--quiet"]) == 0
    assert main(["export", str(run), "--runtime", "onnx", "--quiet"]) == 0
    assert main(["bench", str(run), "--samples", "8", "--batch-sizes", "1", "4", "--repeats", "1", "--threads", "1",
                 "--runtime", "torch", "onnx", "--quiet"]) == 0  # fmt: skip
    assert json.loads(folder.bench_file.read_text())
    assert main(["report", str(run), "--quiet"]) == 0
    assert "retrofit" in (run / "report.html").read_text()


def test_a_retrofitted_run_answers_over_http(user_classifier: tuple[Path, Path], retrofitted: Path) -> None:
    """Served at full depth (entropy 0 never fires) it answers what the classifier's pipeline answers."""
    from fastapi.testclient import TestClient

    from layerexit.predictor import Predictor
    from layerexit.serving.app import Model, build_app
    from layerexit.serving.engine import Engine

    classifier, _ = user_classifier
    texts = ["good alpha beta", "bad gamma", "delta good epsilon bad"]
    expected = pipeline("text-classification", model=str(classifier))(texts)
    for strategy, layers in (("entropy(threshold=0)", {4}), ("entropy(threshold=0.9)", {1, 2, 3, 4})):
        predictor = Predictor.from_run(retrofitted, strategy)
        engine = Engine(predictor.runtime, predictor.strategy, scheduler="pooled", max_queue=8)
        model = Model(predictor.tokenizer, predictor.label_names, 32, predictor.model.backbone.uses_token_type_ids)
        with TestClient(build_app(engine, model, max_texts=4)) as client:
            response = client.post("/v1/classify", json={"texts": texts})
        assert response.status_code == 200
        results = response.json()["results"]
        assert {r["exit_layer"] for r in results} <= layers
        if strategy == "entropy(threshold=0)":
            assert [r["label"] for r in results] == [e["label"] for e in expected]
            assert [r["probability"] for r in results] == pytest.approx([e["score"] for e in expected], abs=1e-5)


def test_retrofit_without_labels(user_classifier: tuple[Path, Path], tmp_path: Path) -> None:
    """Texts alone: the exits learn the classifier's distribution; accuracy is agreement with it."""
    classifier, task = user_classifier
    texts = tmp_path / "texts"
    texts.mkdir()
    for split in ("train", "dev", "test"):
        lines = [line.rsplit(",", 1)[0] for line in (task / f"{split}.csv").read_text().splitlines()[1:]]
        (texts / f"{split}.txt").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    assert main(retrofit_args(classifier, texts, run)) == 0
    report = RunFolder(run).report()
    assert report["labels"].startswith("reference")
    assert report["splits"]["test"]["per_layer"]["accuracy"][-1] == 1.0  # the classifier agrees with itself
    assert RunFolder(run).data_info()["label_names"] == ["neg", "pos"]
    with pytest.raises(LayerExitError, match="needs labels"):
        from layerexit.training.retrofit import retrofit

        retrofit(RetrofitConfig(str(classifier), str(texts), str(tmp_path / "r2"), loss="both", max_length=32))


def test_labels_in_another_order_are_mapped_by_name(user_classifier: tuple[Path, Path], tmp_path: Path) -> None:
    """The data's sorted label names (neg, pos) map onto the classifier's id2label, whatever its order."""
    classifier, task = user_classifier
    swapped = tmp_path / "swapped"
    model = AutoModelForSequenceClassification.from_pretrained(classifier)
    model.config.id2label = {0: "pos", 1: "neg"}  # the same weights, the labels named the other way round
    model.config.label2id = {"pos": 0, "neg": 1}
    model.save_pretrained(swapped)
    AutoTokenizer.from_pretrained(classifier).save_pretrained(swapped)
    run = tmp_path / "run"
    assert main(retrofit_args(swapped, task, run, "--loss", "labels", "--no-evaluate")) == 0
    assert RunFolder(run).data_info()["label_names"] == ["pos", "neg"]
    assert main(["evaluate", str(run), "--quiet"]) == 0
    # the classifier now "predicts" the opposite names, so against the data's labels it is always wrong
    assert RunFolder(run).report()["splits"]["test"]["per_layer"]["accuracy"][-1] < 0.1


def test_data_labelled_with_other_names_is_a_clear_error(user_classifier: tuple[Path, Path], tmp_path: Path) -> None:
    classifier, _ = user_classifier
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"good w{i},happy\nbad w{i},sad\n" for i in range(20)))
    assert main(retrofit_args(classifier, data, tmp_path / "run")) == 2


def _names_by_prefix(task: object) -> dict[str, str]:
    """The label name of each kind of text ('a...' or 'b...'), over every split."""
    seen: dict[str, set[str]] = {}
    for examples in task.splits.values():  # type: ignore[attr-defined]
        for ex in examples:
            seen.setdefault(ex.text[0], set()).add(task.label_names[ex.label])  # type: ignore[attr-defined]
    assert all(len(v) == 1 for v in seen.values())
    return {k: v.pop() for k, v in seen.items()}


@pytest.mark.parametrize(
    ("a", "b", "names"),
    [
        ("true", "false", ["false", "true"]),
        ("1.0", "0.0", ["0", "1"]),
        ("1", "0", ["0", "1"]),
        ('"yes"', '"no"', ["no", "yes"]),
    ],
)
def test_labels_as_users_store_them_jsonl(tmp_path: Path, a: str, b: str, names: list[str]) -> None:
    from layerexit.data import load_task

    path = tmp_path / "data.jsonl"
    path.write_text("".join(f'{{"text": "a{i}", "label": {a}}}\n{{"text": "b{i}", "label": {b}}}\n' for i in range(30)))
    task = load_task(path)
    assert task.label_names == names
    assert _names_by_prefix(task) == {"a": names[1], "b": names[0]}


@pytest.mark.parametrize(("a", "b", "names"), [("True", "False", ["False", "True"]), ("1.0", "0.0", ["0", "1"])])
def test_labels_as_users_store_them_csv(tmp_path: Path, a: str, b: str, names: list[str]) -> None:
    from layerexit.data import load_task

    path = tmp_path / "data.csv"
    path.write_text("text,label\n" + "".join(f"a{i},{a}\nb{i},{b}\n" for i in range(30)))
    task = load_task(path)
    assert task.label_names == names
    assert _names_by_prefix(task) == {"a": names[1], "b": names[0]}


def test_a_label_that_is_no_integer_is_a_clear_error(tmp_path: Path) -> None:
    from layerexit.data import load_task

    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": 0.5}\n' * 4)
    with pytest.raises(LayerExitError, match=r"data.jsonl, line 1: label must be .* float holding an integer"):
        load_task(path)


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "qwen2"])
def test_a_retrofitted_model_exports_to_onnx(arch: str, tmp_path: Path) -> None:
    """The classifier's own head traces with the layers: the graphs give the PyTorch probabilities."""
    from layerexit.runtime.loop import all_exits
    from layerexit.runtime.onnx_export import export_onnx
    from layerexit.runtime.onnx_runtime import OnnxRuntime

    tiny_classifier(arch, tmp_path / "classifier")
    model = EarlyExitModel.from_classifier(str(tmp_path / "classifier"))
    runtime = OnnxRuntime.load(export_onnx(model, tmp_path / "onnx"), threads=1)
    ids, mask = random_batch(batch=5, length=13, seed=3)
    with torch.no_grad():
        reference = model(ids, mask).probs
    torch.testing.assert_close(all_exits(runtime, ids, mask), reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(runtime.full(ids, mask), reference[-1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["modernbert", "qwen2"])
def test_newer_families_also_train_from_scratch(arch: str, tmp_path: Path) -> None:
    """`layerexit train` on a ModernBERT or a decoder encoder (a decoder's exits pool its last token)."""
    from transformers import AutoModel, BertTokenizerFast

    from .test_end_to_end import WORDS

    encoder = tmp_path / "encoder"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", *WORDS]
    BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(encoder)
    config = tiny_config(arch)
    config.vocab_size = len(vocab)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(encoder)
    task = make_task(tmp_path / "task", {"train": 96, "dev": 32, "test": 32})
    run = tmp_path / "run"
    args = ["train", "--model", str(encoder), "--task", str(task), "--output", str(run), "--objective", "pabee",
            "--epochs", "1", "--batch-size", "16", "--max-length", "16", "--threads", "1", "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert json.loads((run / "layerexit.json").read_text())["pooling"] == ("last" if arch == "qwen2" else "first")
    assert len(RunFolder(run).report()["splits"]["test"]["per_layer"]["accuracy"]) == 4


def test_text_pairs_without_labels(user_classifier: tuple[Path, Path], tmp_path: Path) -> None:
    """A CSV of pairs with no label column: --label-column '' reads it unlabelled."""
    classifier, task = user_classifier
    data = tmp_path / "pairs"
    data.mkdir()
    for split in ("train", "dev", "test"):
        texts = [line.rsplit(",", 1)[0] for line in (task / f"{split}.csv").read_text().splitlines()[1:]]
        (data / f"{split}.csv").write_text("premise,hypothesis\n" + "".join(f"{t},{t[::-1]}\n" for t in texts))
    run = tmp_path / "run"
    extra = ("--text-column", "premise", "--text-pair-column", "hypothesis", "--label-column", "")
    assert main(retrofit_args(classifier, data, run, *extra)) == 0
    folder = RunFolder(run)
    assert folder.data_info()["labels"] == "reference" and folder.text_pairs()
    assert folder.report()["splits"]["test"]["per_layer"]["accuracy"][-1] == 1.0
    # pairs: the exits compare the two texts, found by the tokenizer's [SEP], on PyTorch and ONNX Runtime alike
    config = json.loads((run / "layerexit.json").read_text())
    assert (config["pooling"], config["separator_id"]) == (
        "pair",
        AutoTokenizer.from_pretrained(classifier).sep_token_id,
    )
    assert_torch_and_onnx_answer_pairs_alike(run)


def assert_torch_and_onnx_answer_pairs_alike(run: Path) -> None:
    """The exported graphs find the second text as PyTorch does: the same labels and exit layers."""
    from layerexit import Predictor

    texts, pairs = ["alpha good beta", "bad gamma delta"], ["gamma", "beta alpha good"]
    answers = {}
    assert main(["export", str(run), "--runtime", "onnx", "--quiet"]) == 0
    for runtime in ("torch", "onnx"):
        predictor = Predictor.from_run(run, "entropy(threshold=0.3)", threads=1, runtime=runtime)
        answers[runtime] = [(p.label, p.exit_layer) for p in predictor.predict(texts, pairs)]
    assert answers["torch"] == answers["onnx"]


def test_a_cache_larger_than_memory_is_refused_before_the_encoder_pass() -> None:
    from layerexit.training.retrofit import check_cache_fits

    check_cache_fits(1000, 5, 384)  # 7 MiB
    with pytest.raises(LayerExitError, match=r"need .* GiB, more than half of this machine's .* use --max-train"):
        check_cache_fits(10**9, 11, 768)


def test_a_fine_tuned_run_is_retrofitted_with_its_last_exit_kept(
    user_classifier: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A layerexit `--objective finetune` run as the classifier: its last exit (first-token pooled) stays, its
    answers at full depth are the run's own, and the new internal exits pool the pair, on PyTorch and ONNX."""
    _, task = user_classifier
    data = tmp_path / "pairs"
    data.mkdir()
    for split in ("train", "dev", "test"):
        rows = [line.rsplit(",", 1) for line in (task / f"{split}.csv").read_text().splitlines()[1:]]
        lines = "".join(f"{t},{t[::-1]},{y}\n" for t, y in rows)
        (data / f"{split}.csv").write_text("premise,hypothesis,label\n" + lines)
    finetuned = tmp_path / "finetuned"
    encoder = make_encoder(tmp_path / "encoder")
    pair_options = ["--text-column", "premise", "--text-pair-column", "hypothesis"]
    assert main(["train", "--model", str(encoder), "--task", str(data), "--output", str(finetuned), "--objective",
                 "finetune", "--epochs", "2", "--batch-size", "16", "--max-length", "32", "--threads", "1",
                 "--quiet", *pair_options]) == 0  # fmt: skip
    assert json.loads((finetuned / "layerexit.json").read_text())["pooling"] == "first"
    run = tmp_path / "run"
    assert main(retrofit_args(finetuned, data, run, *pair_options)) == 0
    config = json.loads((run / "layerexit.json").read_text())
    assert (config["pooling"], config["final_pooling"], config["final_head"]) == ("pair", "first", "exit")
    before, _ = RunFolder(finetuned).read_probs("test")
    after, _ = RunFolder(run).read_probs("test")
    torch.testing.assert_close(after[-1], before[-1], atol=1e-5, rtol=0)  # the fine-tuned run's answers
    assert_torch_and_onnx_answer_pairs_alike(run)
    capsys.readouterr()
    assert main(retrofit_args(finetuned, data, tmp_path / "linear", "--head", "linear", *pair_options)) == 2
    assert "the run's last exit is a mlp head and retrofit keeps it; give --head mlp" in capsys.readouterr().err
