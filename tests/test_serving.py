"""Serving: engines equal offline replay under concurrent arrivals, no input lost or answered twice, the
waiting bound, every bad input a 4xx naming it, overload as 503, drain on shutdown, a short load test."""

from __future__ import annotations

import itertools
import json
import random
import re
import socket
import threading
import time
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from layerexit import strategies
from layerexit.errors import LayerExitError
from layerexit.runtime.loop import all_exits
from layerexit.runtime.torch_runtime import TorchRuntime
from layerexit.serving.admission import Closed, Overloaded
from layerexit.serving.app import ApiError, Model, build_app, parse_body
from layerexit.serving.engine import POLICIES, SCHEDULERS, Engine, EngineHandle

from .conftest import tiny_model
from .test_end_to_end import WORDS, trained_run  # noqa: F401  (a module-scoped fixture)
from .test_model import _peaked, _varied


def _inputs(n: int, seed: int, vocab: int = 90) -> list[tuple[torch.Tensor, None]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(5, vocab, (int(torch.randint(2, 14, (1,), generator=g)),), generator=g), None) for _ in range(n)
    ]


def submit_concurrently(engine: EngineHandle, inputs: list[Any], rng: random.Random, largest: int) -> list[Any]:
    """Requests of 1 to ``largest`` inputs from several threads at random times; ``(inputs, request)``
    per request once every one is answered (within a minute)."""
    jobs = []

    def client(chunk: list[Any]) -> None:
        time.sleep(rng.random() * 0.05)
        jobs.append((chunk, engine.submit(chunk)))

    clients, start = [], 0
    while start < len(inputs):
        size = rng.randint(1, largest)
        clients.append(threading.Thread(target=client, args=(inputs[start : start + size],)))
        start += size
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    _, not_done = wait([job.future for _, job in jobs], timeout=60)
    assert not not_done
    return jobs


def close_refusing_new_inputs(engine: EngineHandle) -> None:
    """Close ``engine`` (draining), checking that it refuses new inputs while it drains."""
    closer = threading.Thread(target=engine.close)
    closer.start()
    time.sleep(0.05)
    with pytest.raises(Closed):
        engine.submit(_inputs(1, seed=10))
    closer.join(30)


def _offline(runtime: TorchRuntime, strategy: strategies.Strategy, ids: torch.Tensor) -> tuple[int, int]:
    """Offline replay on this input alone (no padding): its exit layer and prediction."""
    probs = all_exits(runtime, ids[None], torch.ones(1, ids.numel(), dtype=torch.long))  # (L, 1, C)
    layer, prediction = strategy.replay(probs)
    return int(layer[0]), int(prediction[0])


def _fitted_agreement(probs: torch.Tensor) -> strategies.Strategy:
    """The learned rule fitted on these exits, at the first threshold under which rows leave at different layers."""
    from layerexit.strategies.learned import Agreement, fit

    rule = fit(probs, probs[-1].argmax(-1), torch.arange(probs.shape[1]), "dev")
    for threshold in torch.linspace(0.05, 0.95, 19).tolist():
        strategy = Agreement(threshold=threshold, rule=rule.fingerprint).bound(rule)
        if strategy.replay(probs)[0].unique().numel() >= 2:
            return strategy
    raise AssertionError("no threshold gives varied exits; the test model is too uniform")


@pytest.mark.parametrize("scheduler", [*SCHEDULERS, "pooled-oldest"])
@pytest.mark.parametrize("family", ["entropy", "patience", "voting", "pcee", "agreement"])
def test_every_row_equals_offline_replay_under_random_concurrent_arrivals(scheduler: str, family: str) -> None:
    scheduler, _, policy = scheduler.partition("-")
    model = _peaked(tiny_model("bert", num_labels=3))
    runtime = TorchRuntime(model)
    inputs = _inputs(60, seed=1)
    with torch.inference_mode():
        probs = torch.cat(
            [all_exits(runtime, ids[None], torch.ones(1, ids.numel(), dtype=torch.long)) for ids, _ in inputs], 1
        )
    strategy = _varied(family, probs) if family != "agreement" else _fitted_agreement(probs)
    engine = Engine(
        runtime,
        strategy,
        scheduler=scheduler,  # type: ignore[arg-type]
        policy=policy or "fullest",  # type: ignore[arg-type]
        max_batch=7,
        max_wait_ms=2,
        max_queue=1000,
    )
    jobs = submit_concurrently(engine, inputs, random.Random(3), largest=4)
    engine.close()
    answered = 0
    with torch.inference_mode():
        for chunk, job in jobs:
            answers = job.future.result()
            assert len(answers) == len(chunk)  # one answer per input, none lost, none doubled
            for (ids, _), answer in zip(chunk, answers, strict=True):
                layer, prediction = _offline(runtime, strategy, ids)
                if scheduler == "full":
                    layer, prediction = (
                        model.num_layers,
                        int(
                            all_exits(runtime, ids[None], torch.ones(1, ids.numel(), dtype=torch.long))[-1, 0].argmax()
                        ),
                    )
                assert (answer.exit_layer, answer.label) == (layer, prediction)
                answered += 1
    assert answered == len(inputs) == engine.stats.answered and engine.queue_depth == 0
    if scheduler == "pooled":
        assert max(max(r, default=0) for r in engine.stats.batch_rows) > 1  # rows of several requests were pooled


@pytest.mark.parametrize("policy", POLICIES)
def test_pooled_waiting_bound_holds(policy: str) -> None:
    """The documented bound of each policy on the engine's own step times, under a burst of 40 inputs:
    oldest and deepest: latency <= max_queue * (L + 1) steps; fullest: (L + 1) * (max_wait + max_queue steps).
    deepest also runs each wave through before embedding the next: every layer step follows one of the layer
    before it."""
    model = _peaked(tiny_model("bert", num_labels=3))
    steps: list[float] = []
    stages_run: list[int] = []
    engine = Engine(
        TorchRuntime(model),
        strategies.Entropy(threshold=0.5),
        scheduler="pooled",
        policy=policy,  # type: ignore[arg-type]
        max_batch=4,
        max_wait_ms=3,
        max_queue=40,
        on_step=lambda stage, rows, seconds: (steps.append(seconds), stages_run.append(stage)),
    )
    jobs = [engine.submit(_inputs(1, seed=i)) for i in range(40)]
    wait([j.future for j in jobs], timeout=60)
    engine.close()
    latencies = [a.latency_ms for j in jobs for a in j.future.result()]
    stages = model.num_layers + 1
    slowest_ms = max(steps) * 1000
    bound_ms = 40 * stages * slowest_ms if policy in ("oldest", "deepest") else stages * (3 + 40 * slowest_ms)
    assert max(latencies) <= bound_ms
    if policy == "deepest":
        assert all(stage == 0 or before == stage - 1 for before, stage in itertools.pairwise(stages_run))
        assert stages_run.count(0) >= 40 // 4  # waves of at most max_batch rows
    assert engine.stats.answered == 40
    assert max(max(r, default=0) for r in engine.stats.batch_rows[1:]) > 1  # the burst was pooled


def test_overload_drain_and_cancel() -> None:
    model = tiny_model("bert", num_labels=2)
    runtime = TorchRuntime(model)
    gate = threading.Event()
    original = runtime.layer

    def slow_layer(layer, rows):  # type: ignore[no-untyped-def]
        gate.wait(10)
        return original(layer, rows)

    runtime.layer = slow_layer  # type: ignore[method-assign]
    engine = Engine(runtime, strategies.Static(layer=4), scheduler="pooled", max_batch=2, max_queue=5)
    accepted = [engine.submit(_inputs(1, seed=i)) for i in range(5)]
    with pytest.raises(Overloaded):
        engine.submit(_inputs(1, seed=9))  # the queue holds 5 inputs: the 6th is refused, not queued
    engine.cancel(accepted[0])  # its client went away
    gate.set()
    close_refusing_new_inputs(engine)
    assert accepted[0].future.cancelled()
    for job in accepted[1:]:  # drained: every accepted request answered exactly once
        assert len(job.future.result(timeout=1)) == 1
    assert engine.queue_depth == 0 and engine.stats.answered + engine.stats.cancelled_rows == 5


@pytest.fixture(scope="module")
def client(trained_run: Path) -> TestClient:  # noqa: F811
    from layerexit.predictor import Predictor

    predictor = Predictor.from_run(trained_run, "entropy(threshold=0.5)")
    engine = Engine(predictor.runtime, predictor.strategy, scheduler="pooled", max_queue=64)
    model = Model(predictor.tokenizer, predictor.label_names, 12, predictor.model.backbone.uses_token_type_ids)
    return TestClient(build_app(engine, model, max_texts=4))


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "expected a JSON object"),
        (b"{}", 400, "'texts' is missing"),
        (b'{"texts": []}', 400, "non-empty list"),
        (b'{"texts": "good"}', 400, "non-empty list"),
        (b'{"texts": ["good", 3]}', 400, "texts[1] must be a string"),
        (b'{"texts": ["good", "  "]}', 400, "texts[1] is empty"),
        (b'{"texts": ["a", "b", "c", "d", "e"]}', 413, "at most 4"),
        (b'{"texts": ["good"], "text_pairs": ["x", "y"]}', 400, "'text_pairs' must be a list of 1"),
        (b'{"texts": ["good"], "labels": [1]}', 400, "unknown fields ['labels']"),
        (b"\xff\xfe", 400, "not valid JSON"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_problem(client: TestClient, body: bytes, status: int, message: str) -> None:
    response = client.post("/v1/classify", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert message in response.json()["error"]


def test_a_body_over_the_limit_is_a_413_before_it_is_read_whole(trained_run: Path) -> None:  # noqa: F811
    from layerexit.predictor import Predictor

    predictor = Predictor.from_run(trained_run, "entropy(threshold=0.5)")
    engine = Engine(predictor.runtime, predictor.strategy, scheduler="pooled", max_queue=8)
    model = Model(predictor.tokenizer, predictor.label_names, 12, predictor.model.backbone.uses_token_type_ids)
    small = TestClient(build_app(engine, model, max_texts=4, max_body_bytes=100))
    body = json.dumps({"texts": ["good " * 40]}).encode()  # 213 bytes
    response = small.post("/v1/classify", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "at most 100 (--max-body-bytes)" in response.json()["error"]

    def chunks() -> Any:  # no content-length: the limit is met while the body streams in
        yield body[:80]
        yield body[80:]

    response = small.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "more than 100 bytes" in response.json()["error"]
    response = small.post("/v1/classify", json={"texts": ["good alpha"]})
    assert response.status_code == 200 and response.json()["results"][0]["label"] in ("neg", "pos")
    engine.close(drain=True)


def test_a_megabyte_text_is_cut_before_it_is_tokenised(trained_run: Path) -> None:  # noqa: F811
    """One client's huge text costs what a short one does: the tokenizer sees a few kilobytes of it, and
    the answer still says it was truncated (before, the whole text was tokenised, twice)."""
    from layerexit.predictor import Predictor

    predictor = Predictor.from_run(trained_run, "entropy(threshold=0.5)")
    seen: list[int] = []

    class Watched:
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            seen.extend(len(t) for batch in args for t in ([batch] if isinstance(batch, str) else batch))
            return predictor.tokenizer(*args, **kwargs)

    engine = Engine(predictor.runtime, predictor.strategy, scheduler="pooled", max_queue=8)
    model = Model(Watched(), predictor.label_names, 12, predictor.model.backbone.uses_token_type_ids)
    client = TestClient(build_app(engine, model))  # the default body limit, 1 MiB
    huge = " ".join(WORDS[i % len(WORDS)] for i in range(200_000))[: (1 << 20) - 100]
    response = client.post("/v1/classify", json={"texts": [huge, "good alpha"]})
    assert response.status_code == 200
    assert [r["truncated"] for r in response.json()["results"]] == [True, False]
    assert len(huge) > 900_000 and max(seen) < 2_000
    engine.close(drain=True)


@pytest.mark.parametrize("pairs", [False, True])
def test_tokenize_truncates_exactly_as_the_tokenizer_does(trained_run: Path, pairs: bool) -> None:  # noqa: F811
    from layerexit.predictor import Predictor
    from layerexit.serving.app import tokenize

    tokenizer = Predictor.from_run(trained_run, "entropy(threshold=0.5)").tokenizer
    texts = ["good alpha", " ".join(WORDS * 3), "bad", " ".join(WORDS)]
    second = ["beta", "gamma " * 2, " ".join(WORDS * 2), "delta"] if pairs else None
    model = Model(tokenizer, ["neg", "pos"], 12, token_types=True)
    inputs, truncated = tokenize(model, texts, second)
    args = (texts, second) if second is not None else (texts,)
    want = tokenizer(*args, truncation=True, max_length=12, return_token_type_ids=True)
    whole = tokenizer(*args, truncation=False)["input_ids"]
    assert truncated == [len(row) > 12 for row in whole] and any(truncated) and not all(truncated)
    for (ids, types), want_ids, want_types in zip(inputs, want["input_ids"], want["token_type_ids"], strict=True):
        assert ids == want_ids and types == want_types


def test_classify_health_and_metrics(client: TestClient) -> None:
    long_text = " ".join(["good"] + WORDS * 3)  # far more than the 12 tokens this server takes: truncated
    response = client.post("/v1/classify", json={"texts": ["good alpha", "bad beta", long_text]})
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["truncated"] for r in results] == [False, False, True]
    for r in results:
        assert r["label"] in ("neg", "pos") and 1 <= r["exit_layer"] <= 4 and 0 < r["probability"] <= 1
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["scheduler"] == "pooled"
    metrics = client.get("/metrics").text
    for name in (
        "layerexit_requests_total",
        "layerexit_request_latency_seconds_bucket",
        "layerexit_exits_total",
        "layerexit_batch_rows_bucket",
        "layerexit_queue_depth",
    ):
        assert name in metrics
    assert 'layerexit_requests_total{status="200"}' in metrics and 'status="413"' in metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("scheduler", "place"), [("full", "thread"), ("batch", "process"), ("pooled", "auto")])
def test_short_load_test_per_scheduler(trained_run: Path, scheduler: str, place: str, tmp_path: Path) -> None:  # noqa: F811
    """A real uvicorn server on loopback, two seconds of open-loop load: every request answered or refused.
    The engine in a thread of the server and in a process of its own (``auto`` on PyTorch)."""
    import uvicorn

    from layerexit.cli import main

    port = _free_port()
    args = ["serve", str(trained_run), "--port", str(port), "--scheduler", scheduler, "--threads", "1"]
    args += ["--engine", place]
    from layerexit.cli import build_parser
    from layerexit.config import from_namespace
    from layerexit.serving.config import EngineConfig
    from layerexit.serving.server import build

    app, engine = build(from_namespace(EngineConfig, build_parser().parse_args(args)))
    assert app.state.info["engine"] == ("process" if place == "auto" else place)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    out = tmp_path / "load.json"
    try:
        code = main(
            [
                "loadtest",
                f"http://127.0.0.1:{port}",
                "--run",
                str(trained_run),
                "--rates",
                "20",
                "--seconds",
                "2",
                "--slo-ms",
                "1000",
                "--output",
                str(out),
            ]
        )
    finally:
        server.should_exit = True
        thread.join(30)
    assert code == 0
    result = json.loads(out.read_text())["rates"][0]
    assert result["sent"] > 10 and result["ok"] + result["rejected_503"] + result["errors"] == result["sent"]
    assert result["errors"] == 0 and result["p99_ms"] is not None
    assert engine.stats.answered == result["ok"] and engine.queue_depth == 0  # drained on shutdown


def test_loadtest_refuses_other_hosts() -> None:
    from layerexit.errors import LayerExitError
    from layerexit.serving.loadtest import check_url

    with pytest.raises(LayerExitError, match="only target this machine"):
        check_url("http://10.0.0.1:8000")
    assert check_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"


@pytest.mark.parametrize(
    ("trained_on_pairs", "body", "message"),
    [
        (True, b'{"texts": ["a premise"]}', "trained on text pairs; give the second text of each input ('text_pairs'"),
        (False, b'{"texts": ["good"], "text_pairs": ["x"]}', "trained on single texts; it takes no second text"),
    ],
)
def test_inputs_of_the_other_kind_than_the_model_was_trained_on_are_a_400(
    trained_on_pairs: bool, body: bytes, message: str
) -> None:
    with pytest.raises(ApiError, match=re.escape(message)) as caught:
        parse_body(body, 4, trained_on_pairs)
    assert caught.value.status == 400
    assert parse_body(body, 4, None)[0]  # a run that recorded neither (older runs) takes both kinds


def test_a_run_records_whether_it_was_trained_on_pairs_and_predict_holds_to_it(trained_run: Path) -> None:  # noqa: F811
    from layerexit.predictor import Predictor
    from layerexit.run_folder import RunFolder

    assert RunFolder(trained_run).text_pairs() is False
    predictor = Predictor.from_run(trained_run, "entropy(threshold=0.5)")
    assert predictor.text_pairs is False
    assert len(predictor.predict(["good alpha"])) == 1
    with pytest.raises(LayerExitError, match="trained on single texts"):
        predictor.predict(["good alpha"], ["beta"])


def test_liveness_and_readiness_follow_the_engine(trained_run: Path) -> None:  # noqa: F811
    """/healthz is 200 while the engine can answer and 503 once it stopped; /readyz is 503 while draining too."""
    from layerexit.predictor import Predictor

    predictor = Predictor.from_run(trained_run, "entropy(threshold=0.5)")
    engine = Engine(predictor.runtime, predictor.strategy, scheduler="pooled", max_queue=64)
    model = Model(predictor.tokenizer, predictor.label_names, 12, predictor.model.backbone.uses_token_type_ids)
    client = TestClient(build_app(engine, model, max_texts=4))
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").json() == {"status": "ready"}
    engine.admission.close()  # draining: alive, not ready
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "draining" in ready.json()["status"]
    assert client.get("/healthz").status_code == 200
    engine.close(drain=False)
    health = client.get("/healthz")
    assert health.status_code == 503 and health.json()["status"] == "the engine stopped"
    assert client.get("/readyz").json() == {"status": "the engine stopped"}
    refused = client.post("/v1/classify", json={"texts": ["good alpha"]})
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
