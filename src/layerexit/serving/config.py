"""``layerexit serve``'s options as one typed dataclass: the command's flags are generated from it, the
in-process engine receives it pickled, ``/healthz`` shows it and the Ray Serve builder validates its
``key=value`` arguments into it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from layerexit.errors import LayerExitError
from layerexit.options import option
from layerexit.runtime.base import RUNTIMES
from layerexit.runtime.registry import runtime_entry
from layerexit.serving.engine import POLICIES, SCHEDULERS


@dataclass(frozen=True)
class EngineConfig:
    """Everything ``layerexit serve`` takes: the run, the engine, its scheduler and the HTTP limits."""

    run: str = option("", "run folder written by `layerexit train` or `layerexit retrofit`", positional=True)
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on")
    runtime: str = option("torch", "how to run the model", choices=RUNTIMES)
    strategy: str | None = option(None, "exit strategy; None: the calibrated one, else the dev-selected one")
    scheduler: str = option("pooled", "full, batch or pooled (docs/serve.md)", choices=SCHEDULERS)
    policy: str = option(
        "deepest", "pooled: which layer runs next (deepest: waves; fullest queue; oldest row's)", choices=POLICIES
    )
    max_batch: int = option(32, "rows per layer step (or per dynamic batch)")
    max_wait_ms: float = option(5.0, "full/batch: longest wait for a batch; pooled fullest: for a row")
    max_queue: int = option(256, "inputs held at most; beyond, 503")
    max_texts: int = option(64, "texts per request at most; beyond, 413")
    max_body_bytes: int = option(
        1 << 20, "request body size in bytes at most (1 MiB), checked while it is read, before parsing; beyond, 413"
    )
    threads: int = option(0, "torch / ONNX Runtime threads (0: default)")
    max_restarts: int = option(
        3, "engine restarts tried in a row after it dies or stalls (back-off 0.5 s, doubling) before the server exits 1"
    )
    stall_s: float = option(
        30.0, "seconds with inputs waiting and no engine step finished before the engine counts as stalled"
    )
    engine: Literal["auto", "process", "thread"] = option(
        "auto",
        "the engine in a process of its own (no GIL shared with HTTP) or a thread of the server; "
        "auto: a process for torch, a thread for ONNX Runtime",
    )

    def __post_init__(self) -> None:
        for name, known in (("runtime", RUNTIMES), ("scheduler", SCHEDULERS), ("policy", POLICIES)):
            if getattr(self, name) not in known:
                raise LayerExitError(f"--{name} must be one of {', '.join(known)}, got {getattr(self, name)!r}")
        for name in ("max_batch", "max_queue", "max_texts", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise LayerExitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.threads < 0 or self.max_restarts < 0:
            raise LayerExitError("--max-wait-ms, --threads and --max-restarts must be >= 0")
        if self.stall_s <= 0:
            raise LayerExitError(f"--stall-s must be > 0, got {self.stall_s}")

    @property
    def place(self) -> str:
        """Where the engine runs: ``auto`` is a process of its own for a runtime whose threads take the GIL
        back often (PyTorch, after each operator), else a thread of the server, where an extra process only
        adds a hop (the runtime's registry entry; docs/serve.md)."""
        if self.engine != "auto":
            return self.engine
        return runtime_entry(self.runtime).engine_place

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> EngineConfig:
        """A config from ``key=value`` pairs whose values may be strings (as Ray Serve's ``serve run`` passes
        them), each converted to its field's type and checked; a wrong key or value names itself."""
        from pydantic import TypeAdapter, ValidationError

        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise LayerExitError(
                f"unknown options {unknown}; known: {', '.join(f.name for f in dataclasses.fields(cls))}"
            )
        if not values.get("run"):
            raise LayerExitError("give the run folder: run=RUN")
        try:
            return TypeAdapter(cls).validate_python(dict(values))
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise LayerExitError(f"bad serve options: {problems}") from None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
