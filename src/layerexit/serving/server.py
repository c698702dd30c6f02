"""``layerexit serve``: a run behind the HTTP API, on uvicorn.

    layerexit serve RUN --port 8000 --runtime onnx --scheduler pooled --max-batch 32 --max-wait-ms 5

The run's calibrated strategy is used unless ``--strategy`` is given (else its dev-selected one).
SIGTERM (or Ctrl-C) stops accepting connections, answers every accepted request, then exits.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Any

from layerexit.runtime.base import RUNTIMES
from layerexit.serving.engine import POLICIES, SCHEDULERS, Engine, EngineHandle

ENGINE_PLACES = ("auto", "process", "thread")


def engine_place(engine: str, runtime: str) -> str:
    """``auto``: a process of its own for PyTorch, which takes the GIL back after each of a layer's
    operators (:mod:`layerexit.serving.process`), a thread of the server for ONNX Runtime, which takes it
    back once per layer: there the extra process only adds a hop, and under overload it leaves too little
    CPU for HTTP on two cores (README, "Serving")."""
    if engine != "auto":
        return engine
    return "process" if runtime == "torch" else "thread"


ENGINE_OPTIONS = [
    "run",
    "runtime",
    "strategy",
    "scheduler",
    "policy",
    "max_batch",
    "max_wait_ms",
    "max_queue",
    "threads",
]


def engine_for_run(**options: Any) -> tuple[Engine, dict[str, Any]]:
    """The engine for a run (``ENGINE_OPTIONS``, as ``layerexit serve`` takes them) and what the HTTP side
    needs to know of it. Module-level, so :class:`ProcessEngine` can call it in its child."""
    from layerexit.predictor import Predictor

    threads = options["threads"] or None
    predictor = Predictor.from_run(options["run"], options["strategy"], threads=threads, runtime=options["runtime"])
    engine = Engine(
        predictor.runtime,
        predictor.strategy,
        scheduler=options["scheduler"],
        policy=options["policy"],
        max_batch=options["max_batch"],
        max_wait_ms=options["max_wait_ms"],
        max_queue=options["max_queue"],
        pad_id=predictor.pad_id,
        threads=threads,
    )
    info = {
        "scheduler": engine.scheduler,
        "strategy": str(predictor.strategy),
        "strategy_source": predictor.strategy_source,
        "runtime": predictor.runtime.name,
        "num_layers": predictor.model.num_layers,
        "label_names": list(predictor.label_names),
        "token_types": bool(predictor.model.backbone.uses_token_type_ids),
    }
    return engine, info


def build(args: argparse.Namespace) -> tuple[Any, EngineHandle]:
    """The app and its engine for a run, as the options say (``--engine``: in a process of its own or a
    thread of this one; see :func:`engine_place`)."""
    from layerexit.run_folder import RunFolder
    from layerexit.serving.app import Model, build_app
    from layerexit.serving.process import ProcessEngine

    options = {key: getattr(args, key) for key in ENGINE_OPTIONS}
    place = engine_place(args.engine, args.runtime)
    run = RunFolder(args.run).require()
    run.require_finished()  # said here, before any model is loaded or process started
    engine: EngineHandle
    if place == "process":
        process = ProcessEngine(partial(engine_for_run, **options), max_queue=args.max_queue)
        engine, info = process, process.info
    else:
        engine, info = engine_for_run(**options)
    model = Model(
        tokenizer=run.tokenizer(),
        label_names=info["label_names"],
        max_length=run.max_length(),
        token_types=info["token_types"],
        text_pairs=run.text_pairs(),
    )
    shown = {key: info[key] for key in ("strategy", "strategy_source", "runtime", "num_layers")}
    shown.update(
        engine=place,
        policy=args.policy,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
    )
    return build_app(engine, model, max_texts=args.max_texts, max_body_bytes=args.max_body_bytes, info=shown), engine


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    app, _ = build(args)
    info = app.state.info
    print(
        f"serving {args.run} on http://{args.host}:{args.port} ({args.scheduler}, {info['runtime']}, "
        f"strategy {info['strategy']}, engine in a {info['engine']})",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)
    return 0


def add_parsers(command: Any) -> None:
    """Register ``serve`` and ``loadtest`` with the CLI's ``command(name, func, help)`` factory."""
    from layerexit.serving.loadtest import cmd_loadtest

    serve = command("serve", cmd_serve, "Serve a run over HTTP, pooling requests layer by layer (or batching)")
    serve.add_argument("run", help="run folder written by `layerexit train`")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--runtime", choices=RUNTIMES, default="torch", help="how to run the model")
    serve.add_argument("--strategy", default=None, help="exit strategy (default: calibrated, else dev-selected)")
    serve.add_argument("--scheduler", choices=SCHEDULERS, default="pooled", help="full, batch or pooled")
    serve.add_argument(
        "--policy",
        choices=POLICIES,
        default="deepest",
        help="pooled: which layer runs next (deepest: waves; fullest queue; oldest row's)",
    )
    serve.add_argument("--max-batch", type=int, default=32, help="rows per layer step (or per dynamic batch)")
    serve.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="full/batch: longest wait for a batch; pooled fullest: for a row"
    )
    serve.add_argument("--max-queue", type=int, default=256, help="inputs held at most; beyond, 503")
    serve.add_argument("--max-texts", type=int, default=64, help="texts per request at most; beyond, 413")
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=1 << 20,
        help="request body size in bytes at most (1 MiB), checked while it is read, before parsing; beyond, 413",
    )
    serve.add_argument("--threads", type=int, default=0, help="torch / ONNX Runtime threads (0: default)")
    serve.add_argument(
        "--engine",
        choices=ENGINE_PLACES,
        default="auto",
        help="the engine in a process of its own (no GIL shared with HTTP) or a thread of the server; "
        "auto: a process for torch, a thread for ONNX Runtime",
    )

    load = command("loadtest", cmd_loadtest, "Open-loop (Poisson) load test of a layerexit server over a rate sweep")
    load.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000 (loopback only)")
    load.add_argument("--run", required=True, help="run folder whose task split gives the inputs")
    load.add_argument("--split", default="test", help="split to take the inputs from")
    load.add_argument("--rates", type=float, nargs="+", default=[5, 10, 20, 40], help="requests per second")
    load.add_argument("--seconds", type=float, default=10.0, help="duration of each rate")
    load.add_argument("--slo-ms", type=float, default=200.0, help="p99 latency objective")
    load.add_argument("--timeout", type=float, default=10.0, help="client timeout per request, seconds")
    load.add_argument("--seed", type=int, default=0, help="seed of the arrival times and the input order")
    load.add_argument("--output", default="", help="JSON file to write")
