"""Options as dataclass fields that carry their command-line help (``metadata["help"]``), flag and choices.

The lowest layer of the configuration: the training methods' own options (:mod:`layerexit.methods`)
and the run configurations (:mod:`layerexit.config`) are both declared with :func:`option`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any


def option(
    default: Any,
    help: str,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    positional: bool = False,
) -> Any:
    """A dataclass field with its command-line help (and optionally its flag name and choices; ``positional``:
    a required positional argument on the command line, named by the field)."""
    metadata: dict[str, Any] = {"help": help, "flag": flag, "choices": choices}
    if positional:
        metadata["positional"] = True
    return field(default=default, metadata=metadata)


def option_of(cls: type, name: str) -> Any:
    """The field ``name`` of the dataclass ``cls`` again, same default, help, flag and choices: a flat
    configuration carries a method's options under their one name and default this way."""
    declared = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field(default=declared.default, metadata=declared.metadata)
