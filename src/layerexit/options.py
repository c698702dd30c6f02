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
    nargs: str | None = None,
    parse: Any = None,
    metavar: str | None = None,
    required: bool = False,
) -> Any:
    """A dataclass field with its command-line help, and optionally: its flag name, its choices,
    ``positional`` (a positional argument named by the field, required unless ``nargs`` is ``*``),
    ``nargs`` (a list field takes ``+`` by default), ``parse`` (a function from the flag's text to the value),
    ``metavar`` and ``required`` (a flag that must be given). A list default is copied for each instance."""
    metadata: dict[str, Any] = {"help": help, "flag": flag, "choices": choices}
    extras = {"positional": positional, "nargs": nargs, "parse": parse, "metavar": metavar, "required": required}
    metadata.update({key: value for key, value in extras.items() if value})
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def option_of(cls: type, name: str) -> Any:
    """The field ``name`` of the dataclass ``cls`` again, same default, help, flag and choices: a flat
    configuration carries a method's options under their one name and default this way."""
    declared = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field(default=declared.default, metadata=declared.metadata)
