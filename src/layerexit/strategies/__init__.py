"""Exit strategies: small objects that decide, layer by layer, when each sample may stop.

A strategy sees only the exits computed so far. Its one primitive is :meth:`Strategy.step`, which
takes the probabilities of layer ``l`` for the samples still running and says which of them exit
now and what each would predict. :meth:`Strategy.replay` (offline, over stored probabilities of
every layer) and online inference (:mod:`layerexit.runtime.loop`, which drops exited rows) both
drive ``step``, so they give the same exit layer and prediction for every sample by construction.

Layers are counted from 1; a sample that no rule lets out exits at the last layer L.

What is known about a strategy *family* as a whole (the parameter calibration moves, its default
grid of settings, how plots draw it, whether a run may fall back to it) is declared once on its
class: :attr:`Strategy.family` (a :class:`Family`) and :meth:`Strategy.default_grid`. The
sweep, calibration, the plots and the predictor read it from there.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing

from layerexit.errors import LayerExitError
from layerexit.strategies.base import Family, PlotStyle, State, Strategy, entropy, exact, select_state
from layerexit.strategies.learned import Agreement, AgreementRule
from layerexit.strategies.rules import (
    VOTING_KS,
    Entropy,
    Hybrid,
    MaxProb,
    Oracle,
    Patience,
    Pcee,
    Static,
    Voting,
    voting_denominator,
    voting_thresholds,
)

__all__ = [
    "FAMILIES",
    "KNOWN_FAMILIES",
    "STRATEGIES",
    "VOTING_KS",
    "Agreement",
    "AgreementRule",
    "Entropy",
    "Family",
    "Hybrid",
    "MaxProb",
    "Oracle",
    "Patience",
    "Pcee",
    "PlotStyle",
    "State",
    "Static",
    "Strategy",
    "Voting",
    "entropy",
    "exact",
    "family_of",
    "parse",
    "preferred_families",
    "select_state",
    "voting_denominator",
    "voting_thresholds",
]

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Entropy, MaxProb, Patience, Voting, Hybrid, Static, Pcee, Agreement, Oracle)
}

KNOWN_FAMILIES: tuple[str, ...] = tuple(name for name, cls in STRATEGIES.items() if cls.family is not None)
"""Every family one can sweep and calibrate by name: every registered strategy that declares a
:class:`Family` (all but the oracle)."""

FAMILIES: tuple[str, ...] = tuple(
    name for name in KNOWN_FAMILIES if (family := STRATEGIES[name].family) is not None and family.default
)
"""The families one sweeps and calibrates when none are named, in the order reports list them: the known
families less the opt-in ones (:attr:`Family.default`)."""


def family_of(name: str) -> Family:
    """The declaration of family ``name``; LayerExitError when ``name`` is not one of :data:`KNOWN_FAMILIES`."""
    cls = STRATEGIES.get(name)
    if cls is None or cls.family is None:
        raise LayerExitError(f"unknown strategy family {name!r}; known: {', '.join(KNOWN_FAMILIES)}")
    return cls.family


def preferred_families() -> list[str]:
    """The families a run may fall back to when no strategy is given, most preferred first
    (:attr:`Family.preference`)."""
    ranked = [(rank, name) for name in FAMILIES if (rank := family_of(name).preference) is not None]
    return [name for _, name in sorted(ranked)]


_SPEC = re.compile(r"^\s*([a-z]+)\s*(?:\((.*)\)|:(.*))?\s*$")


def parse(spec: str) -> Strategy:
    """A strategy from text: ``voting(k=0.5, threshold=2)``, ``entropy:threshold=0.3`` or ``oracle``."""
    match = _SPEC.match(spec)
    if not match:
        raise LayerExitError(f"cannot read strategy {spec!r}; expected e.g. 'voting(k=0.5, threshold=2.0)'")
    name, args = match.group(1), match.group(2) or match.group(3) or ""
    if name not in STRATEGIES:
        raise LayerExitError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    hints = typing.get_type_hints(cls)
    parameters = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, float | int | bool | str] = {}
    for part in filter(None, (p.strip() for p in args.split(","))):
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep:
            raise LayerExitError(f"strategy {spec!r}: expected key=value, got {part!r}")
        if key not in parameters:
            raise LayerExitError(f"strategy {name!r} has no parameter {key!r}; parameters: {parameters}")
        if key in kwargs:
            raise LayerExitError(f"strategy {spec!r}: {key} is given twice")
        kwargs[key] = _value(raw.strip(), hints[key], key, spec)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise LayerExitError(f"strategy {spec!r}: {err}") from None


def _value(raw: str, kind: type, key: str, spec: str) -> float | int | bool | str:
    """A parameter's value, of the parameter's type: true/false, an integer, a number, or a word."""
    if kind is str:
        return raw
    if kind is bool:
        if raw.lower() not in ("true", "false"):
            raise LayerExitError(f"strategy {spec!r}: {key} must be true or false, got {raw!r}")
        return raw.lower() == "true"
    value = _number(raw, spec)
    if isinstance(value, bool):
        raise LayerExitError(f"strategy {spec!r}: {key} must be a number, got {raw!r}")
    if kind is int:
        if not math.isfinite(value) or value != int(value):
            raise LayerExitError(f"strategy {spec!r}: {key} must be an integer, got {raw!r}")
        return int(value)
    return value


def _number(raw: str, spec: str) -> float | bool:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return float(raw)
    except ValueError:
        raise LayerExitError(f"strategy {spec!r}: {raw!r} is not a number") from None
