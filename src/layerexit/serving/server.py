"""``layerexit serve``: a run behind the HTTP API, on uvicorn.

    layerexit serve RUN --port 8000 --runtime onnx --scheduler pooled --max-batch 32 --max-wait-ms 5

The run's calibrated strategy is used unless ``--strategy`` is given (else its dev-selected one).
SIGTERM (or Ctrl-C) stops accepting connections, answers every accepted request, then exits.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from layerexit.runtime.base import RUNTIMES
from layerexit.serving.engine import POLICIES, SCHEDULERS, Engine


def build(args: argparse.Namespace) -> tuple[Any, Engine]:
    """The app and its engine for a run, as the options say."""
    from layerexit.predictor import Predictor
    from layerexit.serving.app import Model, build_app

    predictor = Predictor.from_run(args.run, args.strategy, threads=args.threads or None, runtime=args.runtime)
    engine = Engine(
        predictor.runtime,
        predictor.strategy,
        scheduler=args.scheduler,
        policy=args.policy,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        pad_id=predictor.pad_id,
        threads=args.threads or None,
    )
    model = Model(
        tokenizer=predictor.tokenizer,
        label_names=predictor.label_names,
        max_length=predictor.max_length,
        token_types=predictor.model.backbone.uses_token_type_ids,
    )
    info = {
        "strategy": str(predictor.strategy),
        "strategy_source": predictor.strategy_source,
        "runtime": predictor.runtime.name,
        "num_layers": predictor.model.num_layers,
        "policy": args.policy,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "max_queue": args.max_queue,
    }
    return build_app(engine, model, max_texts=args.max_texts, info=info), engine


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    app, engine = build(args)
    print(
        f"serving {args.run} on http://{args.host}:{args.port} ({args.scheduler}, {engine.runtime.name}, "
        f"strategy {engine.strategy})",
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
        default="fullest",
        help="pooled: which layer runs next (the fullest queue, or the oldest row's)",
    )
    serve.add_argument("--max-batch", type=int, default=32, help="rows per layer step (or per dynamic batch)")
    serve.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="full/batch: longest wait for a batch; pooled fullest: for a row"
    )
    serve.add_argument("--max-queue", type=int, default=256, help="inputs held at most; beyond, 503")
    serve.add_argument("--max-texts", type=int, default=64, help="texts per request at most; beyond, 413")
    serve.add_argument("--threads", type=int, default=0, help="torch / ONNX Runtime threads (0: default)")

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
