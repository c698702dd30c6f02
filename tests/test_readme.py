"""Every ``layerexit`` command in the README and the docs' quickstarts parses as written (its command exists,
its flags are spelled right, its values have the right types), so the front page cannot drift from the CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from layerexit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "docs" / "getting-started.md", ROOT / "docs" / "retrofit.md"]


def commands(page: Path) -> list[str]:
    """The ``layerexit ...`` lines of a page's bash blocks, continuation lines joined, comments dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("layerexit "):
                found.append(line)
    return found


CASES = [(page.name, line) for page in PAGES for line in commands(page)]


def test_the_pages_have_commands() -> None:
    assert len([c for c in CASES if c[0] == "README.md"]) >= 10


@pytest.mark.parametrize(("page", "line"), CASES)
def test_each_command_parses(page: str, line: str) -> None:
    argv = shlex.split(line)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as err:
        raise AssertionError(f"{page}: `{line}` does not parse") from err
    assert args.command == argv[0]
