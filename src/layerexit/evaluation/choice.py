"""The result of calibration: the setting chosen for one strategy family (:class:`Choice`), and the
pick of the default among the families' choices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal

from layerexit import strategies
from layerexit.errors import LayerExitError
from layerexit.evaluation.replay import LOSSES, Loss
from layerexit.strategies import Strategy

Mode = Literal["speedup", "risk"]


@dataclass(frozen=True)
class Choice:
    """The setting chosen for one strategy family, with the calibration numbers behind it.

    ``speedup``, ``disagreement``, ``metric_value`` and ``risk`` are measured on the calibration
    split (``n_calibration`` samples). ``full_model`` marks the fallback of risk mode when no
    setting of the family faster than the full model passed: the strategy is then ``static`` at
    the last layer, which is the full model and meets any bound.
    """

    family: str
    strategy: Strategy
    mode: Mode
    speedup: float
    disagreement: float
    n_calibration: int
    method: str
    metric: str | None = None
    metric_value: float | None = None
    loss: Loss | None = None
    risk: float | None = None
    p_value: float | None = None
    target_speedup: float | None = None
    max_drop: float | None = None
    confidence: float | None = None
    full_model: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the strategy as its text form, e.g. ``voting(k=0.5, threshold=2)``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["strategy"] = str(self.strategy)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Choice:
        """Inverse of :meth:`to_dict`; LayerExitError on a missing, unknown or ill-typed field."""
        if not isinstance(data, Mapping):
            raise LayerExitError(f"a calibration choice must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LayerExitError(f"a calibration choice has unknown field {unknown[0]!r}")
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING]
        if missing:
            raise LayerExitError(f"a calibration choice lacks field {missing[0]!r}")
        if not isinstance(data["strategy"], str):
            raise LayerExitError("a calibration choice's strategy must be text, e.g. 'voting(k=0.5, threshold=2)'")
        values = dict(data)
        values["strategy"] = strategies.parse(data["strategy"])
        _check_field_types(values)
        choice = cls(**values)
        if choice.mode not in ("speedup", "risk"):
            raise LayerExitError(f"a calibration choice has unknown mode {choice.mode!r}")
        if choice.loss is not None and choice.loss not in LOSSES:
            raise LayerExitError(f"a calibration choice has unknown loss {choice.loss!r}")
        if choice.strategy.name != choice.family and not choice.full_model:
            raise LayerExitError(
                f"a calibration choice for {choice.family!r} holds a {choice.strategy.name!r} strategy"
            )
        return choice


def _check_field_types(values: Mapping[str, Any]) -> None:
    kinds: dict[str, tuple[type, ...]] = {
        "family": (str,),
        "mode": (str,),
        "method": (str,),
        "metric": (str, type(None)),
        "loss": (str, type(None)),
        "n_calibration": (int,),
        "full_model": (bool,),
    }
    for name, value in values.items():
        if name == "strategy":
            continue
        allowed = kinds.get(name, (int, float, type(None)))
        if isinstance(value, bool) and bool not in allowed:
            allowed = ()
        if not isinstance(value, allowed):
            raise LayerExitError(f"a calibration choice's field {name!r} has the wrong type ({type(value).__name__})")


def pick_default(choices: Sequence[Choice]) -> Choice:
    """The choice to use by default across families.

    Speed-up mode: the best calibration metric (ties: faster). Risk mode: the fastest (ties: lower
    calibration risk); every accepted setting of :func:`~layerexit.evaluation.risk.for_risk` is
    covered by one guarantee, so choosing among them by speed keeps it.
    """
    if not choices:
        raise LayerExitError("no calibration choice to pick from")
    if choices[0].mode == "speedup":
        return max(choices, key=lambda c: (c.metric_value or 0.0, c.speedup))
    return max(choices, key=lambda c: (c.speedup, -(c.risk or 0.0)))
