"""``layerexit serve``: a run behind the HTTP API, on uvicorn.

    layerexit serve RUN --port 8000 --runtime onnx --scheduler pooled --max-batch 32 --max-wait-ms 5

The run's calibrated strategy is used unless ``--strategy`` is given (else its dev-selected one).
SIGTERM (or Ctrl-C) stops accepting connections, answers every accepted request, then exits. An engine
that dies or stalls is restarted (:mod:`layerexit.serving.supervisor`); when it cannot be, the server
exits with status 1.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

from layerexit.config import add_arguments, from_namespace
from layerexit.serving.config import EngineConfig
from layerexit.serving.engine import Engine, EngineHandle
from layerexit.serving.supervisor import Supervisor


def engine_for_run(config: EngineConfig) -> tuple[Engine, dict[str, Any]]:
    """The engine for a run and what the HTTP side needs to know of it. Module-level, so
    :class:`ProcessEngine` can call it in its child with the config pickled."""
    from layerexit.predictor import Predictor

    threads = config.threads or None
    predictor = Predictor.from_run(config.run, config.strategy, threads=threads, runtime=config.runtime)
    predictor.warm_up()  # not the first request: it would wait for the one-call graphs to be built
    engine = Engine(
        predictor.runtime,
        predictor.strategy,
        scheduler=config.scheduler,
        policy=config.policy,
        max_batch=config.max_batch,
        max_wait_ms=config.max_wait_ms,
        max_queue=config.max_queue,
        pad_id=predictor.pad_id,
        threads=threads,
    )
    info = {
        "scheduler": engine.scheduler_name,
        "strategy": str(predictor.strategy),
        "strategy_source": predictor.strategy_source,
        "runtime": predictor.runtime.name,
        "num_layers": predictor.model.num_layers,
        "label_names": list(predictor.label_names),
        "token_types": bool(predictor.model.backbone.uses_token_type_ids),
    }
    return engine, info


def start_engine(config: EngineConfig) -> tuple[EngineHandle, dict[str, Any]]:
    """A new engine for the config (in a process of its own or a thread of this one:
    :attr:`EngineConfig.place`) and what the HTTP side needs to know of it."""
    from layerexit.serving.process import ProcessEngine

    if config.place == "process":
        process = ProcessEngine(partial(engine_for_run, config), max_queue=config.max_queue)
        return process, process.info
    return engine_for_run(config)


def build(config: EngineConfig, on_give_up: Callable[[str], None] | None = None) -> tuple[Any, Supervisor]:
    """The app and its watched engine for a run (:class:`Supervisor`: restarted when it dies or stalls;
    ``on_give_up(why)`` when it cannot be)."""
    from layerexit.run_folder import RunFolder
    from layerexit.serving.app import Model, build_app

    run = RunFolder(config.run).require()
    run.require_finished()  # said here, before any model is loaded or process started
    engine, info = start_engine(config)
    engines = [engine]  # the first one, built here for its info; the supervisor builds any later one

    def start() -> EngineHandle:
        return engines.pop() if engines else start_engine(config)[0]

    watched = Supervisor(
        start,
        max_restarts=config.max_restarts,
        stall_s=config.stall_s,
        on_give_up=on_give_up,
    )
    model = Model(
        tokenizer=run.tokenizer(),
        label_names=info["label_names"],
        max_length=run.max_length(),
        token_types=info["token_types"],
        text_pairs=run.text_pairs(),
    )
    shown = {key: info[key] for key in ("strategy", "strategy_source", "runtime", "num_layers")}
    shown.update(
        engine=config.place,
        policy=config.policy,
        max_batch=config.max_batch,
        max_wait_ms=config.max_wait_ms,
        max_queue=config.max_queue,
        config=config.as_dict(),
    )
    app = build_app(watched, model, max_texts=config.max_texts, max_body_bytes=config.max_body_bytes, info=shown)
    return app, watched


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    config = from_namespace(EngineConfig, args)
    gave_up: list[str] = []
    server: uvicorn.Server | None = None

    def give_up(why: str) -> None:  # the engine cannot be restarted: stop, and exit 1 for a supervisor to see
        gave_up.append(why)
        if server is not None:
            server.should_exit = True

    app, _ = build(config, on_give_up=give_up)
    info = app.state.info
    print(
        f"serving {config.run} on http://{config.host}:{config.port} ({config.scheduler}, {info['runtime']}, "
        f"strategy {info['strategy']}, engine in a {info['engine']})",
        file=sys.stderr,
    )
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=30)
    )
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn raises the signal again after its graceful
        signal.signal(sig, lambda *_: None)  # shutdown; caught here, so the exit status says how it ended
    server.run()
    print(f"layerexit serve: stopped; HTTP answers by status: {app.state.metrics.answers_by_status()}", file=sys.stderr)
    if gave_up:
        print(f"layerexit serve: stopping: {gave_up[0]}", file=sys.stderr)
        return 1
    return 0


def add_parsers(command: Any) -> None:
    """Register ``serve`` and ``loadtest`` with the CLI's ``command(name, func, help)`` factory."""
    from layerexit.serving.loadtest import LoadtestOptions, cmd_loadtest

    serve = command("serve", cmd_serve, "Serve a run over HTTP, pooling requests layer by layer (or batching)")
    add_arguments(serve, EngineConfig)

    load = command("loadtest", cmd_loadtest, "Open-loop (Poisson) load test of a layerexit server over a rate sweep")
    add_arguments(load, LoadtestOptions)
