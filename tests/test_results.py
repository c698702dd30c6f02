"""The committed study tables are rebuilt from the committed per-run reports alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
STUDIES = sorted(p for p in (ROOT / "studies" / "results").glob("*") if (p / "compare.json").is_file())


def test_results_script_builds_a_table_from_the_command_line() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "results.py"), "build", str(STUDIES[0])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == (STUDIES[0] / "compare.md").read_text().strip()


@pytest.mark.parametrize("folder", STUDIES, ids=lambda p: p.name)
def test_results_script_rebuilds_the_committed_table(folder: Path) -> None:
    out = _study_module("results").build(folder)  # in this process: a subprocess per folder costs seconds
    assert out.strip() == (folder / "compare.md").read_text().strip()
    from layerexit.compare import LABELS, parse_method

    methods = json.loads((folder / "compare.json").read_text())["methods"]
    for spec in methods:  # every method the comparison ran has its row
        name = parse_method(spec)[0]
        label = LABELS.get(name, spec) if name != "static" else spec
        assert f"| {label}" in out, spec


def test_there_is_a_committed_study() -> None:
    assert STUDIES, "studies/results/ should hold at least one comparison"


def _study_module(name: str = "studylib"):  # scripts/ is not a package: load a module by path
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_study_script_reproduces_every_table_of_docs_results() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "study.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "16 tables match" in done.stdout


def test_study_check_fails_on_an_edited_number(tmp_path: Path) -> None:
    doc = (ROOT / "docs" / "results.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| ours + patience |"))
    edited = row.replace("(1.", "(9.", 1)
    assert edited != row
    (tmp_path / "results.md").write_text(doc.replace(row, edited))
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "study.py"), "--check", "--doc", str(tmp_path / "results.md")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "stale: tables fullmain" in done.stderr  # the first such row is the full-scale study's


def test_study_refuses_a_document_without_the_table_blocks(tmp_path: Path) -> None:
    (tmp_path / "results.md").write_text("# Results\n\nno tables here\n")
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "study.py"), "--check", "--doc", str(tmp_path / "results.md")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "has no block for" in done.stderr and "study:NAME" in done.stderr


def test_study_numbers_on_hand_made_cases() -> None:
    study = _study_module()
    points = [(1.0, 0.90), (1.5, 0.80), (2.0, 0.85), (3.0, 0.70)]
    assert study.envelope(points, 1.4) == 0.85  # best among settings at least 1.4x faster
    assert study.envelope(points, 2.5) == 0.70
    assert str(study.envelope(points, 3.5)) == "nan"
    same = np.array([1.0, 0.0, 1.0, 1.0])
    lo, hi = study.bootstrap([np.stack([same, same])], lambda gs: float(gs[0][0].mean() - gs[0][1].mean()))
    assert lo == hi == 0.0, "a paired difference of identical predictions has no spread"
    a = np.array([1.0] * 60 + [0.0] * 40)
    lo, hi = study.bootstrap([a], lambda gs: float(gs[0].mean()))
    assert lo < 0.6 < hi and 0.15 < hi - lo < 0.25  # about 2 * 1.96 * sqrt(0.24 / 100) = 0.19

    def mean_of_seeds(gs: list[np.ndarray]) -> float:
        return float(np.mean([g.mean() for g in gs]))

    # two seeds right on the same examples: shared draws resample them together, so the interval is one
    # seed's; drawn independently the seeds' luck would average out and the interval would shrink
    assert study.bootstrap([a, a], mean_of_seeds, shared=True) == (lo, hi)
    lo2, hi2 = study.bootstrap([a, a], mean_of_seeds)
    assert hi2 - lo2 < 0.85 * (hi - lo)


def test_full_study_reads_folder_suffixes_and_chooses_lambda_on_dev() -> None:
    _study_module("studylib")
    full = _study_module("study_full")
    for suffix in (
        "",
        "-seeds12",
        "-finetune",
        "-baselines",
        "-lam0.2",
        "-lam0.2-seeds12",
        "-uniform-lam0.1",
        "-finetune-seeds1",
    ):
        assert full.SUFFIX.match(suffix), suffix
    for suffix in (
        "-lam",
        "-other",
        "-lam0.2-extra",
        "-3seeds",
        "-seeds1-finetune",
        "-finetune-deebert",
        "-lam0.1-onelr",
        "-lam0.1-epochs3",
    ):
        assert not full.SUFFIX.match(suffix), suffix
    got = full.SUFFIX.match("-uniform-lam0.5-seeds12")
    assert got.group("lam") == "0.5" and got.group("uniform")

    def run(dev: float) -> object:
        report = {"metric": "accuracy", "select_split": "dev", "selected": {"voting": {"dev": {"accuracy": dev}}}}
        return full.Run(Path("x"), "ensemble", 0, report, [], [], {})

    assert full.choose_lambda({0.5: run(0.90), 0.1: run(0.91), 0.2: run(0.91)}) == 0.1  # ties to the smaller
    assert full.choose_lambda({0.1: run(0.90), 0.2: run(0.92)}) == 0.2
    assert full.choose_lambda({}) is None


def test_full_study_script_all_makes_the_committed_folders(tmp_path: Path) -> None:
    """`full_study.sh all` names one compare folder per committed studies/results/full-* folder, no other."""
    fake = tmp_path / "python"  # stands for the interpreter: prints the compare command it was given
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "full_study.sh"), "all"],
        env={"PATH": "/usr/bin:/bin", "PY": str(fake), "OUT": "OUT"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    made = [line.split("--output OUT/", 1)[1].split()[0] for line in out.splitlines() if "--output OUT/" in line]
    committed = sorted(p.name.removeprefix("full-") for p in (ROOT / "studies" / "results").glob("full-*"))
    assert sorted(made) == committed
    assert len(made) == len(set(made))


def test_full_study_script_recipe_makes_the_committed_recipe_folders(tmp_path: Path) -> None:
    """`full_study.sh recipe` retrofits one run per committed studies/results/recipe/ folder, no other."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    out_dir = tmp_path / "OUT"
    for prefix in ("tweets-binary-minilm", "snli-binary-minilm", "tweets-binary-mpnet"):
        for seed in range(3):
            folder = f"{prefix}-finetune{'' if seed == 0 else f'-seeds{seed}'}/finetune-seed{seed}/eval"
            (out_dir / folder).mkdir(parents=True)
            (out_dir / folder / "report.json").write_text("{}")
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "full_study.sh"), "recipe"],
        env={"PATH": "/usr/bin:/bin", "PY": str(fake), "OUT": str(out_dir)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    made = [
        line.split(f"--output {out_dir}/", 1)[1].split()[0]
        for line in out.splitlines()
        if line.startswith("-m layerexit.cli retrofit")
    ]
    for line in out.splitlines():  # a joint run: its method's folder of the comparison, named by setting
        if line.startswith("-m layerexit.cli compare"):
            words = line.split()
            value = {flag: words[words.index(flag) + 1] for flag in ("--task", "--model", "--methods", "--seeds")}
            encoder = value["--model"].split("-")[0]
            variant = "-alt" if "--alternate" in words else ""  # BERxiT's alternating steps
            made.append(f"{value['--task']}-{encoder}-{value['--methods']}{variant}-seed{value['--seeds']}")
    committed = sorted(p.name for p in (ROOT / "studies" / "results" / "recipe").iterdir() if p.is_dir())
    assert sorted(made) == committed and len(made) == len(set(made))


def test_refresh_copies_reports_of_runs_evaluated_again_but_not_of_runs_trained_again(tmp_path: Path) -> None:
    source, dest = tmp_path / "source", tmp_path / "dest"
    for folder in (source, dest):
        (folder / "run" / "eval").mkdir(parents=True)
        for name in ("config.json", "data.json", "train_summary.json"):
            (folder / "run" / name).write_text('{"seconds": 1}\n')
    (dest / "compare.json").write_text(json.dumps({"runs": {"pabee/seed0": "somewhere/run"}}))
    for name in ("report.json", "points.csv", "exit_layers.csv"):
        (source / "run" / "eval" / name).write_text("evaluated again\n")

    def refresh() -> subprocess.CompletedProcess[str]:
        script = ROOT / "scripts" / "results.py"
        return subprocess.run(
            [sys.executable, str(script), "refresh", str(source), str(dest)], capture_output=True, text=True
        )

    assert refresh().returncode == 0
    assert (dest / "run" / "eval" / "report.json").read_text() == "evaluated again\n"
    (source / "run" / "train_summary.json").write_text('{"seconds": 2}\n')  # the same step trained again
    (source / "run" / "eval" / "report.json").write_text("trained again\n")
    failed = refresh()
    assert failed.returncode == 1 and "train_summary.json differs from the committed" in failed.stderr
    assert (dest / "run" / "eval" / "report.json").read_text() == "evaluated again\n"
