"""The report page: built from a real tiny run and a comparison, checked as data and in headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from layerexit import strategies
from layerexit.cli import main
from layerexit.evaluation.analysis import voting_values
from layerexit.evaluation.evaluate import evaluate_probs, write_points_csv
from layerexit.report import build_report
from layerexit.report.inputs import SCALE, pack, shown_strategies, unpack
from layerexit.report.tables import generic_tables
from layerexit.run_folder import load_probs, save_probs

from .runs import train_args
from .test_end_to_end import make_encoder, make_task

pytest.importorskip("plotly", reason="the report needs plotly: pip install 'layerexit[report]'")

SERVING = {
    "server": "uvicorn",
    "results": [
        {"concurrency": 1, "latency": {"p50_ms": 3.2, "p99_ms": 8.1}, "rps": 250.0},
        {"concurrency": 4, "latency": {"p50_ms": 5.0, "p99_ms": 12.3}, "rps": 700.0},
    ],
    "config": {"workers": 2, "batching": {"max_batch": 8}},
}


def flip_labels(task: Path, split: str, every: int) -> None:
    """Give every ``every``-th row of a split the other label: a trained model gets those wrong."""
    path = task / f"{split}.csv"
    rows = list(csv.reader(path.open()))
    for i, row in enumerate(rows[1:]):
        if i % every == 0:
            row[1] = "pos" if row[1] == "neg" else "neg"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(encoder, task): the keyword task, with a sixth of the test labels flipped."""
    root = tmp_path_factory.mktemp("report-assets")
    encoder = make_encoder(root / "encoder")
    task = make_task(root / "task", {"train": 145, "dev": 48, "test": 60})
    flip_labels(task, "test", 6)
    return encoder, task


@pytest.fixture(scope="module")
def run(tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained, evaluated, calibrated and benchmarked run, with a serving measurement beside it."""
    run = tmp_path_factory.mktemp("report") / "run"
    assert main([*train_args(tiny, run), "--evaluate"]) == 0
    assert main(["calibrate", str(run), "--target-speedup", "1.5", "--quiet"]) == 0
    bench = ["bench", str(run), "--samples", "8", "--batch-sizes", "1", "4", "--repeats", "1", "--threads", "1"]
    assert main([*bench, "--quiet"]) == 0
    (run / "serve_bench.json").write_text(json.dumps(SERVING))
    assert main(["report", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def comparison(tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report-compare") / "cmp"
    encoder, task = tiny
    args = ["compare", "--model", str(encoder), "--task", str(task), "--methods", "static:2,pabee", "--seeds", "0"]
    args += ["--output", str(out), "--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--head-lr", "3e-3"]
    assert main([*args, "--threads", "1", "--exit-dropout", "0", "--quiet"]) == 0
    assert main(["report", str(out)]) == 0
    return out


def page_data(html: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', html, re.S)
    assert match, "the page embeds the explorer's data"
    return json.loads(match.group(1))


def one_error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------------------------
# The page as a file


def test_run_page_is_one_offline_file_with_every_section(run: Path) -> None:
    html = (run / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]+src=", html), "no script is fetched: plotly is embedded"
    assert not re.search(r"<link[^>]+href=", html), "no style sheet is fetched"
    assert html.count("Plotly.newPlot") >= 3 and "plotly.js v" in html  # the script, embedded once
    assert html.count("plotly.js v") == 1
    for anchor in ("tradeoff", "per-layer", "selected", "exits", "calibration", "bench", "serving", "explorer"):
        assert f'id="{anchor}"' in html, anchor
    assert "serve_bench.json" in html and "p99_ms" in html and "uvicorn" in html  # rendered generically
    calibration = json.loads((run / "calibration.json").read_text())
    assert calibration["default"] in html and "target: speed-up at least 1.5x" in html


def test_embedded_inputs_are_the_replays_of_the_selected_settings(run: Path) -> None:
    data = page_data((run / "report.html").read_text(encoding="utf-8"))
    probs, labels = load_probs(run / "eval" / "probs_test.safetensors")
    report = json.loads((run / "eval" / "report.json").read_text())
    num_layers, n, c = probs.shape
    assert (data["L"], data["n"], data["C"], data["labelNames"]) == (num_layers, n, c, ["neg", "pos"])
    stored = torch.tensor(unpack(data["probs"])).view(n, num_layers, c).permute(1, 0, 2) / SCALE
    assert float((stored - probs).abs().max()) <= 0.5 / SCALE + 1e-6
    assert torch.equal(torch.tensor(unpack(data["argmax"])).view(n, num_layers).T, probs.argmax(-1))
    assert torch.equal(torch.tensor(unpack(data["y"])), labels)
    settings = {s["name"]: s["setting"] for s in data["strategies"]}
    for family, entry in report["selected"].items():
        if entry is not None:
            assert settings[family] == entry["setting"]
    assert settings["oracle"] == "oracle()" and "calibrated" in settings
    for row in data["strategies"]:
        strategy = strategies.parse(row["setting"])
        exit_layer, prediction = strategy.replay(probs, labels if strategy.needs_labels else None)
        assert unpack(row["exit"]).tolist() == exit_layer.tolist()
        assert unpack(row["pred"]).tolist() == prediction.tolist()
    assert len(data["texts"]) == n and all(isinstance(t, str) and t for t in data["texts"])


def test_pack_keeps_integers_in_one_or_two_bytes() -> None:
    small, large = torch.tensor([0, 3, 255]), torch.tensor([0, 256, 65535])
    assert pack(small)["dtype"] == "u1" and unpack(pack(small)).tolist() == [0, 3, 255]
    assert pack(large)["dtype"] == "u2" and unpack(pack(large)).tolist() == [0, 256, 65535]


def test_generic_tables_render_any_serving_json() -> None:
    captions = [caption for caption, _ in generic_tables(SERVING)]
    assert captions == ["summary", "results"]
    summary, results = (html for _, html in generic_tables(SERVING))
    assert "config.batching.max_batch" in summary and "uvicorn" in summary
    assert "latency.p99_ms" in results and results.count("<tr>") == 3  # header and two rows
    assert "per-batch" in dict(generic_tables({"per-batch": {"1": {"ms": 2.0}, "8": {"ms": 5.0}}}))
    assert generic_tables([1, 2])[0][1].count("<tr>") == 3


def test_no_texts_when_the_task_cannot_be_reloaded(run: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("model.safetensors", "checkpoint*"))
    config = json.loads((copy / "config.json").read_text())
    config["task"] = str(tmp_path / "gone")
    (copy / "config.json").write_text(json.dumps(config))
    html = build_report(copy).read_text(encoding="utf-8")
    assert "Texts unavailable: the task could not be reloaded" in html
    assert page_data(html)["texts"] is None
    html = build_report(copy, tmp_path / "quick.html", texts=False).read_text(encoding="utf-8")
    assert "Texts not loaded (--no-texts)" in html


def test_a_folder_that_is_not_an_evaluated_run_is_one_error_line(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "does not exist" in one_error(capsys, ["report", str(tmp_path / "nothing")])
    assert "is not a layerexit run or compare folder" in one_error(capsys, ["report", str(tmp_path)])
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "layerexit.json").write_text("{}")
    err = one_error(capsys, ["report", str(trained)])
    assert "is not evaluated (eval/report.json missing)" in err and "layerexit evaluate" in err
    (trained / "eval").mkdir()
    (trained / "eval" / "report.json").write_text((run / "eval" / "report.json").read_text())
    assert "eval/points.csv missing" in one_error(capsys, ["report", str(trained)])
    (trained / "eval" / "points.csv").write_text((run / "eval" / "points.csv").read_text())
    assert "probs_test.safetensors missing" in one_error(capsys, ["report", str(trained)])
    err = one_error(capsys, ["report", str(run), "--split", "train"])
    assert "no stored probabilities of split 'train'" in err


# ----------------------------------------------------------------------------------------------
# Size: a run with 10,000 test inputs


def synthetic_run(folder: Path, n: int, num_layers: int = 12, num_classes: int = 3) -> tuple[Path, list[str]]:
    """An evaluated run folder without a model: probabilities that grow surer with depth, the report
    and points that ``evaluate`` writes from them, and texts of about 110 characters each."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    signal = torch.nn.functional.one_hot(labels, num_classes).float()
    depth = torch.linspace(0.2, 3.0, num_layers)[:, None, None]
    probs = (depth * signal + torch.randn(num_layers, n, num_classes, generator=g)).softmax(-1)
    (folder / "eval").mkdir(parents=True)
    # the curves come from 1,000 inputs per split (a quick sweep;
    # the figures' size depends on the grid, not on N); the explorer gets all of them
    dev, test = slice(0, 1000), slice(1000, 2000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: more threads only wait for each other on a busy machine
    try:
        report, points = evaluate_probs(
            {"dev": probs[:, dev], "test": probs[:, test]}, {"dev": labels[dev], "test": labels[test]},
            metric="accuracy", num_classes=num_classes, families=("entropy", "patience", "voting", "static"),
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    (folder / "eval" / "report.json").write_text(json.dumps(report))
    write_points_csv(points, folder / "eval" / "points.csv")
    save_probs(folder / "eval" / "probs_test.safetensors", probs, labels)
    (folder / "layerexit.json").write_text("{}")
    (folder / "data.json").write_text(json.dumps({"label_names": ["negative", "neutral", "positive"]}))
    words = "the service was slow but the food arrived warm and the staff apologised twice before we left"
    texts = [f"#{i} " + " ".join(words.split()[(i + j) % 17] for j in range(18)) for i in range(n)]
    texts[1234] = "a </script><b>bold</b> & <!-- tricky --> text"
    return folder, texts


@pytest.fixture(scope="module")
def large_page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    from layerexit.report import sources
    from layerexit.report.page import run_page

    folder, texts = synthetic_run(tmp_path_factory.mktemp("large") / "run", 10_000)
    src = sources.load_run(folder, texts=False)
    src.texts, src.notes = texts, []
    path = folder / "report.html"
    path.write_text(run_page(src), encoding="utf-8")
    return path, texts


def test_page_for_10000_inputs_stays_a_few_mb(large_page: tuple[Path, list[str]]) -> None:
    import plotly.offline

    path, texts = large_page
    html = path.read_text(encoding="utf-8")
    total = len(html.encode())
    plotly_js = len(plotly.offline.get_plotlyjs().encode())
    data = len(re.search(r'id="explorer-data">(.*?)</script>', html, re.S).group(1).encode())  # type: ignore[union-attr]
    text_bytes = len(json.dumps(texts, ensure_ascii=False).encode())
    print(
        f"\nreport page for 10,000 inputs (12 layers, 3 classes): {total / 1e6:.2f} MB = plotly.js "
        f"{plotly_js / 1e6:.2f} MB + explorer data {data / 1e6:.2f} MB (texts {text_bytes / 1e6:.2f} MB) "
        f"+ figures and page {(total - plotly_js - data) / 1e6:.2f} MB"
    )
    assert data - text_bytes < 1.2e6, "per-input numbers stay compact: bytes, base64, no objects"
    assert total < 8e6


# ----------------------------------------------------------------------------------------------
# In a real browser


@pytest.fixture(scope="module")
def browser() -> Any:
    """The module that opens pages in headless Chromium; skipped (failed under `make test`) without one."""
    from layerexit.report import browser as module

    required = os.environ.get("LAYEREXIT_REQUIRE_BROWSER") == "1"
    reason = ""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (pip install playwright; `make test` installs it)"
    if not reason and module.find_chromium() is None:
        reason = "Chromium not found: apt-get install chromium (`make test` installs it), or set LAYEREXIT_CHROMIUM"
    if reason:
        if required:
            pytest.fail(reason)
        pytest.skip(reason)
    return module


def traces(page: Any, div: str) -> int:
    return int(page.evaluate(f"document.getElementById('{div}').data.length"))


def rendered(page: Any, div: str) -> bool:
    return bool(page.evaluate(f"!!document.querySelector('#{div} .main-svg')"))


def count(page: Any) -> int:
    return int(page.inner_text("#count").split(" of ")[0])


@pytest.mark.browser
def test_run_page_in_chromium(browser: Any, run: Path) -> None:
    probs, labels = load_probs(run / "eval" / "probs_test.safetensors")
    num_layers, n, _ = probs.shape
    report = json.loads((run / "eval" / "report.json").read_text())
    calibration = json.loads((run / "calibration.json").read_text())
    shown = shown_strategies(report, calibration)
    texts = page_data((run / "report.html").read_text(encoding="utf-8"))["texts"]
    with browser.open_page(run / "report.html") as opened:
        page = opened.page
        page.wait_for_selector("#input-layers tbody tr")
        # curves: per split (dev, test), 5 strategy families x (every setting + front), static, oracle,
        # the selected settings, the calibrated default and the full model
        assert traces(page, "fig-tradeoff") == 2 * (5 * 2 + 5)
        test_entropy = page.evaluate(
            "document.getElementById('fig-tradeoff').data.filter(t => t.name === 'entropy (every setting)')[1].x.length"
        )
        assert test_entropy == 51  # the whole entropy grid, on test
        assert traces(page, "fig-per-layer") == 2 * 2  # each split: exits alone, oracle
        assert traces(page, "fig-exits") == 2 * len(shown)  # right and wrong per strategy shown
        for div in ("fig-tradeoff", "fig-per-layer", "fig-exits", "input-probs", "input-votes"):
            assert rendered(page, div), div

        # the explorer: every input, 25 a page
        assert page.inner_text("#count") == f"{n} of {n} inputs match"
        assert page.locator("#inputs tbody tr").count() == 25
        page.click("#next")
        assert page.locator("#inputs tbody tr").count() == min(25, n - 25)
        page.select_option("#f-label", "1")
        assert count(page) == int((labels == 1).sum())
        page.select_option("#f-label", "")
        patience = next(j for j, s in enumerate(shown) if s.name == "patience")
        exit_layer, prediction = shown[patience].strategy.replay(probs)
        page.select_option("#f-strategy", str(patience))
        page.select_option("#f-correct", "wrong")
        wrong = int((prediction != labels).sum())
        assert wrong > 0 and count(page) == wrong
        page.select_option("#f-correct", "")
        layer = int(exit_layer.max())
        page.select_option("#f-exit", str(layer))
        assert count(page) == int((exit_layer == layer).sum())
        page.select_option("#f-exit", "")
        page.fill("#q", "omega")
        assert count(page) == sum("omega" in t for t in texts)
        page.fill("#q", "")

        # picking an input shows its layers, votes, V_l and where each strategy lets it out
        page.select_option("#f-correct", "wrong")
        row = page.locator("#inputs tbody tr").first
        i = int(row.get_attribute("data-index") or -1)
        row.click()
        assert page.inner_text("#d-title").startswith(f"Input #{i} ")
        assert page.inner_text("#d-text") == texts[i]
        layer_rows = page.eval_on_selector_all(
            "#input-layers tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
        )
        assert len(layer_rows) == num_layers
        names = ["neg", "pos"]
        k = next(s.strategy.k for s in shown if s.name == "voting")  # type: ignore[attr-defined]
        values = voting_values(probs, k)[:, i]
        for layer_index, cells in enumerate(layer_rows):
            assert cells[0] == str(layer_index + 1)
            assert cells[1] == names[int(probs[layer_index, i].argmax())]
            assert float(cells[2]) == pytest.approx(float(probs[layer_index, i].max()), abs=0.5 / SCALE + 1e-3)
            assert float(cells[5]) == pytest.approx(float(values[layer_index]), abs=1e-4)
        exits = page.eval_on_selector_all(
            "#input-exits tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
        )
        assert [e[0] for e in exits] == [s.name for s in shown]
        for cells, item in zip(exits, shown, strict=True):
            where, what = item.strategy.replay(probs, labels if item.strategy.needs_labels else None)
            assert cells[2] == str(int(where[i])) and cells[3] == names[int(what[i])]
        assert traces(page, "input-probs") == 2 + 1  # one line per class, the exits
        assert traces(page, "input-votes") == 2 + 2  # votes per class, V_l, the voting threshold
        assert opened.problems == [], opened.problems


@pytest.mark.browser
def test_comparison_page_in_chromium(browser: Any, comparison: Path) -> None:
    with browser.open_page(comparison / "report.html") as opened:
        page = opened.page
        page.wait_for_selector("#fig-compare-grid .main-svg")
        assert traces(page, "fig-compare-overlay") == 2  # pabee's patience curve, the static:2 model
        assert traces(page, "fig-compare-grid") == 5  # pabee's panel: every strategy family's front
        assert traces(page, "fig-compare-per-layer") == 2  # one line per method
        assert page.locator("#compare-cells tbody tr").count() == 2
        assert opened.problems == [], opened.problems


@pytest.mark.browser
def test_page_with_10000_inputs_in_chromium(browser: Any, large_page: tuple[Path, list[str]]) -> None:
    path, texts = large_page
    _, labels = load_probs(path.parent / "eval" / "probs_test.safetensors")
    started = time.perf_counter()
    with browser.open_page(path) as opened:
        page = opened.page
        page.wait_for_selector("#input-layers tbody tr")
        seconds = time.perf_counter() - started
        assert page.inner_text("#count") == "10000 of 10000 inputs match"
        page.fill("#q", "</script><b>bold")
        assert count(page) == 1
        page.locator("#inputs tbody tr").first.click()
        assert page.inner_text("#d-text") == texts[1234], "texts are shown as text, never as HTML"
        assert page.locator("#input-layers tbody tr").count() == 12
        page.fill("#q", "")
        page.select_option("#f-label", "2")
        assert count(page) == int((labels == 2).sum())
        assert opened.problems == [], opened.problems
    print(f"\n10,000-input page loaded and explored in {seconds:.1f} s")
