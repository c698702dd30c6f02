"""The serving engine as a Ray Serve deployment: one engine (with its runtime and model) per replica.

Started with Ray Serve's own command (the ``ray`` extra: ``pip install 'layerexit[ray]'``)::

    serve run layerexit.serving.ray_app:build run=RUN scheduler=pooled replicas=2 threads=1

It serves on 127.0.0.1:8000 (``serve run`` takes ``--address``; ``RAY_SERVE_HTTP_HOST`` for others) with
the routes and answers of ``layerexit serve``. The keys are ``layerexit serve``'s options (``runtime``,
``strategy``, ``scheduler``, ``policy``, ``max_batch``, ``max_wait_ms``, ``max_queue``, ``max_texts``, ``threads``)
plus ``replicas`` (default 1) and ``num_cpus`` per replica (default: ``threads``, else 1). Each replica
admits up to ``max_queue`` inputs itself and answers 503 beyond, so Ray's per-replica limit lets that many
requests in and the engine does the admission.

When more replicas beat a bigger pool: a replica's pooled engine already batches across requests, so on
one machine a second replica only pays when one engine cannot keep the cores busy (its worker is one
Python thread in a process of its own, with one for HTTP and tokenisation beside it), e.g. ``threads=1`` replicas on
a many-core host, or when replicas go on other machines. On the 2-core machines here one replica with
the whole machine is the better choice: two replicas split the cores and halve each pool's batches.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from layerexit.errors import LayerExitError
from layerexit.serving.config import EngineConfig

RAY_KEYS = ("replicas", "num_cpus")


@serve.deployment
@serve.ingress()
class Classifier:
    """A replica: ``layerexit serve``'s app and engine, built from the same typed options; Ray Serve routes
    HTTP requests to it and runs its lifespan (the engine drains on shutdown)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.engine: Any = None

    def __serve_build_asgi_app__(self) -> Any:
        from layerexit.serving.server import build as build_server

        app, self.engine = build_server(self.config)
        return app

    def check_health(self) -> None:
        """Ray Serve calls this periodically and replaces the replica when it raises: once the engine could
        not be restarted (a restart in progress is left to the engine's supervisor)."""
        if self.engine is not None and self.engine.state == "failed":
            raise RuntimeError(self.engine.status)


def options(args: dict[str, Any]) -> tuple[EngineConfig, dict[str, Any]]:
    """``(the engine's options, Ray options)`` from ``key=value`` arguments, typed and checked as the
    ``serve`` command checks its flags."""
    args = dict(args)
    ray_args = {key: args.pop(key) for key in RAY_KEYS if key in args}
    if "run" not in args:
        raise LayerExitError("give the run folder: serve run layerexit.serving.ray_app:build run=RUN ...")
    config = EngineConfig.from_mapping(args)
    try:
        cpus = float(ray_args.get("num_cpus", config.threads or 1))
        replicas = int(ray_args.get("replicas", 1))
    except ValueError as err:
        raise LayerExitError(f"replicas and num_cpus must be numbers ({err})") from None
    ray_options = {
        "num_replicas": replicas,
        "ray_actor_options": {"num_cpus": cpus},
        "max_ongoing_requests": config.max_queue,
    }
    return config, ray_options


def build(args: dict[str, Any]) -> Application:
    """The application ``serve run layerexit.serving.ray_app:build key=value ...`` starts."""
    config, ray_options = options(args)
    deployment: Any = Classifier
    application: Application = deployment.options(**ray_options).bind(config)
    return application
