"""mkdocs hook: the command reference (``reference/commands.md``) generated from the argparse parser.

The page is built from ``layerexit.cli.build_parser()`` at every docs build, so it cannot drift from
``--help``: each command's description, then one table row per option (flags, default, choices, help).
"""

from __future__ import annotations

import argparse
from typing import Any

PAGE = "reference/commands.md"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(action: argparse.Action) -> str:
    if action.required or action.default in (None, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
        return ""
    if isinstance(action, argparse._StoreTrueAction) and action.default is False:
        return ""
    value = action.default
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value)
    return f"`{value}`" if value != "" else "`''`"


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest.upper()}`"
    names = list(action.option_strings)
    if isinstance(action, argparse.BooleanOptionalAction):
        names = [n for n in names if not n.startswith("--no-")]
        return " ".join(f"`{n}` / `--no-{n[2:]}`" for n in names)
    return ", ".join(f"`{n}`" for n in names)


def _help(action: argparse.Action) -> str:
    text = (action.help or "").replace(" (default: %(default)s)", "")
    if "%(" in text:
        text = text % {"default": action.default, "prog": "layerexit"}
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        text += " Choices: " + ", ".join(f"`{c}`" for c in action.choices) + "."
    return _cell(text)


def render(parser: argparse.ArgumentParser) -> str:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    out = [
        "# Commands",
        "",
        "Every command of `layerexit`, generated from the parser itself at each docs build (the same text as "
        "`layerexit COMMAND --help`). User errors print one `error:` line and exit with status 2.",
        "",
    ]
    for name, command in sub.choices.items():
        out += [f"## `layerexit {name}`", "", _cell(helps.get(name) or command.description or ""), ""]
        out += ["```", command.format_usage().strip(), "```", ""]
        out += ["| option | default | what it does |", "|---|---|---|"]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            out.append(f"| {_flags(action)} | {_default(action)} | {_help(action)} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    from layerexit.cli import build_parser

    return render(build_parser())
