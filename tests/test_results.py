"""The committed study tables are rebuilt from the committed per-run reports alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUDIES = sorted(p for p in (ROOT / "docs" / "results").glob("*") if (p / "compare.json").is_file())


@pytest.mark.parametrize("folder", STUDIES, ids=lambda p: p.name)
def test_results_script_rebuilds_the_committed_table(folder: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "results.py"), "build", str(folder)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == (folder / "compare.md").read_text().strip()
    assert "| ours (ensemble loss) |" in out


def test_there_is_a_committed_study() -> None:
    assert STUDIES, "docs/results/ should hold at least one comparison"
