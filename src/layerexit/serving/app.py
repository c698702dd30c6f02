"""The HTTP API over an engine (FastAPI on uvicorn). The app only parses, validates and hands over.

* ``POST /v1/classify`` ``{"texts": [...], "text_pairs": [...]?}`` -> ``{"results": [{"label",
  "probability", "exit_layer", "latency_ms", "truncated"}, ...]}``, one per text, in order. Texts longer
  than the model's ``max_length`` tokens are truncated (``"truncated": true``), as in training.
* ``GET /healthz`` (liveness) -> ``{"status": "ok", ...}``; 503 naming why while the engine is being
  restarted after a failure and once it has stopped;
  ``GET /readyz`` (readiness) -> 200 while new inputs are taken, 503 when restarting, stopped or draining;
  ``GET /metrics``: Prometheus text format.

Errors are JSON ``{"error": "..."}`` naming the problem: 400 malformed JSON or wrong types, 413 too many
texts, 503 with ``Retry-After`` when the engine's queue is full or the server is shutting down.
A client that disconnects before its answer frees its rows in the engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import ClientDisconnect

from layerexit.data.encoding import encode_marking_truncation, pairs_problem
from layerexit.serving.admission import Closed, Overloaded
from layerexit.serving.engine import EngineHandle
from layerexit.serving.supervisor import EVENTS, Supervisor

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5)


@dataclass
class Model:
    """What the app needs to turn texts into engine inputs and answers into JSON."""

    tokenizer: Any
    label_names: list[str]
    max_length: int
    token_types: bool
    text_pairs: bool | None = None
    """Whether the model was trained on text pairs (``None``: not recorded; requests of either kind are taken)."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    """Held while tokenising: a fast tokenizer sets its truncation on shared state before each call, so
    two threads tokenising at once could each run with the other's setting."""


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self, engine: EngineHandle) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "layerexit_requests", "HTTP classify requests by status", ["status"], registry=self.registry
        )
        self.latency = Histogram(
            "layerexit_request_latency_seconds", "classify latency", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.exits = Counter("layerexit_exits", "inputs answered, by exit layer", ["layer"], registry=self.registry)
        self.batch_rows = Histogram(
            "layerexit_batch_rows",
            "rows per engine step, by stage (0: embeddings or a whole dynamic batch)",
            ["stage"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.engine_events = Counter(
            "layerexit_engine_events",
            "engine failures (died, stalled, start_failed) and restarts (restarted)",
            ["event"],
            registry=self.registry,
        )
        for event in EVENTS:
            self.engine_events.labels(event=event)  # shown at 0 before the first one
        depth = Gauge("layerexit_queue_depth", "inputs accepted and not yet answered", registry=self.registry)
        depth.set_function(lambda: engine.queue_depth)

    def step(self, stage: int, rows: int, seconds: float) -> None:
        self.batch_rows.labels(stage=str(stage)).observe(rows)

    def answers_by_status(self) -> dict[str, int]:
        """The classify requests answered so far, by HTTP status."""
        counts = {}
        for metric in self.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["status"]] = int(sample.value)
        return dict(sorted(counts.items()))

    def engine_event(self, name: str) -> None:
        self.engine_events.labels(event=name).inc()


def parse_body(body: bytes, max_texts: int, text_pairs: bool | None = None) -> tuple[list[str], list[str] | None]:
    """The texts (and pairs) of a classify request, or :class:`ApiError` naming what is wrong."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ApiError(400, 'expected a JSON object like {"texts": ["..."]}')
    unknown = sorted(set(data) - {"texts", "text_pairs"})
    if unknown:
        raise ApiError(400, f"unknown fields {unknown}; expected 'texts' and optionally 'text_pairs'")
    texts = data.get("texts")
    if texts is None:
        raise ApiError(400, "'texts' is missing")
    if not isinstance(texts, list) or not texts:
        raise ApiError(400, "'texts' must be a non-empty list of strings")
    if len(texts) > max_texts:
        raise ApiError(413, f"{len(texts)} texts in one request; at most {max_texts}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ApiError(400, f"texts[{i}] must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ApiError(400, f"texts[{i}] is empty")
    pairs = data.get("text_pairs")
    if pairs is not None:
        if not isinstance(pairs, list) or len(pairs) != len(texts):
            raise ApiError(400, f"'text_pairs' must be a list of {len(texts)} strings, one per text")
        for i, pair in enumerate(pairs):
            if not isinstance(pair, str) or not pair.strip():
                raise ApiError(400, f"text_pairs[{i}] must be a non-empty string")
    problem = pairs_problem(text_pairs, pairs is not None, field="'text_pairs', one per text")
    if problem:
        raise ApiError(400, problem)
    return texts, pairs


def tokenize(model: Model, texts: list[str], pairs: list[str] | None) -> tuple[list[Any], list[bool]]:
    """Engine inputs ``(input_ids, token_type_ids)`` per text (lists of ints), truncated to ``max_length`` tokens
    as in training and in ``predict`` (:func:`layerexit.data.encoding.encode_marking_truncation`), and
    whether each was truncated. Long texts are cut between words before tokenising, so each text costs a
    bounded time whatever its length."""
    with model.lock:
        encoded, truncated = encode_marking_truncation(
            model.tokenizer, texts, pairs, max_length=model.max_length, token_types=model.token_types
        )
    types = encoded.token_type_ids
    inputs = [(row, types[i] if types is not None else None) for i, row in enumerate(encoded.input_ids)]
    return inputs, truncated


PARSE_ON_LOOP_BYTES = 64 << 10
"""Bodies up to this size are parsed on the event loop (well under a millisecond); larger ones in a thread.
Decoding the JSON holds the GIL whichever thread does it (about 1 ms per MB, docs/serve.md), which is
what the body limit bounds."""
MAX_BODY_BYTES = 1 << 20
"""The largest request body read by default (1 MiB: 64 texts of 16 KB each)."""


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with 413 once it passes ``limit`` bytes: by its declared length before
    anything is read, else while it streams in, so an oversized body is never held in memory whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body has {int(declared):,} bytes; at most {limit:,} (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body has more than {limit:,} bytes (--max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(
    engine: EngineHandle,
    model: Model,
    *,
    max_texts: int = 64,
    max_body_bytes: int = MAX_BODY_BYTES,
    info: dict[str, Any] | None = None,
) -> FastAPI:
    metrics = Metrics(engine)
    engine.on_step = metrics.step
    if isinstance(engine, Supervisor):
        engine.on_event = metrics.engine_event

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.close, drain=True)  # uvicorn stopped accepting: answer what is in flight

    app = FastAPI(title="layerexit", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.info = dict(info or {})
    app.state.metrics = metrics

    def error(status: int, message: str, **headers: str) -> JSONResponse:
        metrics.requests.labels(status=str(status)).inc()
        return JSONResponse({"error": message}, status_code=status, headers=headers or None)

    @app.post("/v1/classify")
    async def classify(request: Request) -> Response:
        started = time.perf_counter()
        try:
            raw = await read_body(request, max_body_bytes)
            if len(raw) > PARSE_ON_LOOP_BYTES:  # validating a large body's texts runs beside the event loop
                texts, pairs = await asyncio.to_thread(parse_body, raw, max_texts, model.text_pairs)
            else:
                texts, pairs = parse_body(raw, max_texts, model.text_pairs)
        except ApiError as err:
            return error(err.status, str(err))
        except ClientDisconnect:  # gone before its body was read whole: nothing was queued
            metrics.requests.labels(status="499").inc()
            return Response(status_code=499)
        inputs, truncated = await asyncio.to_thread(tokenize, model, texts, pairs)  # off the event loop
        try:
            job = engine.submit(inputs)
        except Overloaded as err:
            return error(503, f"overloaded: {err}; retry later", **{"Retry-After": "1"})
        except Closed as err:
            return error(503, str(err), **{"Retry-After": "1"})
        answers = asyncio.wrap_future(job.future)
        while True:  # wait for the answer, noticing a client that went away
            done, _ = await asyncio.wait({answers}, timeout=0.25)
            if done:
                break
            if await request.is_disconnected():
                engine.cancel(job)
                metrics.requests.labels(status="499").inc()
                return Response(status_code=499)
        try:
            results = answers.result()
        except asyncio.CancelledError:
            return error(503, "the request was cancelled", **{"Retry-After": "1"})
        except Closed as err:
            return error(503, str(err), **{"Retry-After": "1"})
        except Exception as err:  # a runtime failure: the server's fault, said plainly
            return error(500, f"inference failed: {err}")
        body = []
        for answer, cut in zip(results, truncated, strict=True):
            metrics.exits.labels(layer=str(answer.exit_layer)).inc()
            body.append(
                {
                    "label": model.label_names[answer.label],
                    "probability": round(float(answer.probs[answer.label]), 6),
                    "exit_layer": answer.exit_layer,
                    "latency_ms": round(answer.latency_ms, 3),
                    "truncated": cut,
                }
            )
        metrics.requests.labels(status="200").inc()
        metrics.latency.observe(time.perf_counter() - started)
        return JSONResponse({"results": body})

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """Liveness: 200 while the engine can answer; 503 while it is being restarted after a failure and
        once it has stopped (restart the server)."""
        body = {
            "status": "ok" if engine.alive else engine.status,
            "scheduler": engine.scheduler_name,
            "queue_depth": engine.queue_depth,
            "answered": engine.stats.answered,
            "pid": os.getpid(),  # which server (or Ray Serve replica) answered
            "engine_pid": engine.pid,
            **(info or {}),
        }
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: 200 while the engine takes new inputs, 503 when it has stopped or is draining."""
        if engine.ready:
            return JSONResponse({"status": "ready"})
        reason = engine.status if not engine.alive else "draining: no new inputs are taken"
        return JSONResponse({"status": reason}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
