"""Faults, tried on a real ``layerexit serve`` process as an operator would meet them: the engine process
killed mid-step, clients that disconnect mid-request, SIGTERM under overload and during an engine
restart, an engine that cannot be restarted. Every request a client sent gets exactly one answer (200 or
a 5xx) or was never accepted (connection refused), none hangs, and the server's counts equal the
client's."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .test_end_to_end import WORDS, trained_run  # noqa: F401  (a module-scoped fixture)
from .test_serving import _free_port

httpx = pytest.importorskip("httpx")

TEXTS = [" ".join(WORDS[i : i + 6]) + (" good" if i % 2 else " bad") for i in range(8)]


class Server:
    """``layerexit serve`` in a process of its own, on a free port."""

    def __init__(self, run: Path, tmp: Path, *extra: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{self.port}.log"
        command = [sys.executable, "-c", "import sys; from layerexit.cli import main; sys.exit(main())"]
        command += ["serve", str(run), "--port", str(self.port), "--threads", "1", *extra]
        # a session of its own: teardown ends the server and its engine process together, whatever the test did
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=self.log.open("w"), start_new_session=True
        )

    def ready(self) -> Server:
        self.wait_until(lambda: self.get("/readyz").status_code == 200, 120, "the server did not become ready")
        return self

    def kill_all(self) -> None:
        """End the server's process group (the server, its engine process) if anything of it is left."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def get(self, path: str) -> Any:
        try:
            return httpx.get(self.url + path, timeout=10)
        except httpx.TransportError:
            return httpx.Response(599)

    def wait_until(self, condition: Any, seconds: float, message: str) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert self.process.poll() is None or condition(), f"{message}: the server exited\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"{message}\n{self.log.read_text()}"
            time.sleep(0.1)

    def metrics(self) -> dict[str, float]:
        values = {}
        for line in self.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def answers_by_status(self) -> Counter[int]:
        pattern = re.compile(r'^layerexit_requests_total\{status="(\d+)"\}$')
        return Counter({int(m.group(1)): int(v) for k, v in self.metrics().items() if (m := pattern.match(k))})

    def said_answers(self) -> Counter[int]:
        """The answers by status the server printed when it stopped."""
        said = re.search(r"HTTP answers by status: (\{.*\})", self.log.read_text())
        assert said is not None, self.log.read_text()
        return Counter({int(k): v for k, v in json.loads(said.group(1).replace("'", '"')).items()})

    def stop(self, sig: int = signal.SIGTERM, seconds: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"the server did not exit within {seconds} s\n{self.log.read_text()}") from None


class Clients:
    """Threads that each send classify requests back to back until stopped, counting what came back:
    an HTTP status, ``refused`` (never accepted: the server no longer listens), ``closed`` (sent on a
    kept-alive connection the stopping server closed before reading it: not taken either, which the
    server's own counts confirm) or ``hung`` (no answer within 30 s)."""

    def __init__(self, url: str, threads: int = 4, texts: int = 4) -> None:
        self.url, self.texts = url, texts
        self.seen: Counter[int | str] = Counter()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stopping.is_set():
                try:
                    outcome: int | str = client.post(
                        self.url + "/v1/classify", json={"texts": TEXTS[: self.texts]}
                    ).status_code
                except httpx.ConnectError:
                    outcome = "refused"
                    time.sleep(0.05)
                except httpx.TimeoutException:
                    outcome = "hung"
                except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                    outcome = "closed"  # a kept-alive connection the stopping server closed (or reset) unread
                with self.lock:
                    self.seen[outcome] += 1

    def stop(self) -> Counter[int | str]:
        self.stopping.set()
        for t in self.threads:
            t.join(60)
            assert not t.is_alive(), "a client never got an answer"
        return self.seen


@pytest.fixture
def serve(trained_run: Path, tmp_path: Path) -> Iterator[Callable[..., Server]]:  # noqa: F811
    """Start `layerexit serve` on the trained run with extra flags, ready; whatever a test leaves running
    (a failed assertion before its stop, a server that never became ready) is killed at teardown."""
    started: list[Server] = []

    def start(*extra: str) -> Server:
        server = Server(trained_run, tmp_path, *extra)
        started.append(server)
        return server.ready()

    yield start
    for server in started:
        server.kill_all()


def _answered(seen: Counter[int | str]) -> Counter[int]:
    return Counter({k: v for k, v in seen.items() if isinstance(k, int)})


def test_the_engine_process_killed_mid_step(serve: Callable[..., Server]) -> None:
    server = serve()
    first = server.get("/healthz").json()["engine_pid"]
    clients = Clients(server.url)
    time.sleep(1.0)
    os.kill(first, signal.SIGKILL)
    server.wait_until(
        lambda: "died; restarting" in server.get("/healthz").json()["status"], 10, "/healthz never said it restarts"
    )
    assert server.get("/healthz").status_code == 503 and "died; restarting" in server.get("/readyz").json()["status"]
    server.wait_until(lambda: server.get("/healthz").status_code == 200, 120, "the engine was not restarted")
    time.sleep(0.5)
    seen = clients.stop()
    assert server.get("/healthz").json()["engine_pid"] != first
    assert seen[200] > 0 and seen[503] > 0 and set(seen) <= {200, 503}, seen
    assert server.answers_by_status() == _answered(seen)  # the server's counts are the client's
    events = server.metrics()
    assert events['layerexit_engine_events_total{event="died"}'] == 1
    assert events['layerexit_engine_events_total{event="restarted"}'] == 1
    assert server.stop() == 0


def test_clients_that_disconnect_mid_request(serve: Callable[..., Server]) -> None:
    server = serve("--max-queue", "512")
    body = json.dumps({"texts": TEXTS * 4}).encode()
    head = "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    for i in range(30):  # each sends a request and goes away before its answer; every third, halfway through it
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(head.encode() + (body[: len(body) // 2] if i % 3 == 0 else body))
    server.wait_until(lambda: server.get("/healthz").json()["queue_depth"] == 0, 30, "rows were left in the engine")
    with httpx.Client(timeout=30) as client:  # the server goes on answering
        ok = [client.post(server.url + "/v1/classify", json={"texts": TEXTS}).status_code for _ in range(10)]
    assert ok == [200] * 10
    server.wait_until(lambda: sum(server.answers_by_status().values()) == 40, 30, "a request was never counted")
    counts = server.answers_by_status()
    # answered, dropped once seen gone (499), or refused when 960 waiting rows passed --max-queue (503)
    assert set(counts) <= {200, 499, 503} and counts[200] >= 10 and counts[499] >= 10, counts
    assert "Traceback" not in server.log.read_text()
    assert server.stop() == 0


def test_sigterm_under_overload(serve: Callable[..., Server]) -> None:
    server = serve("--max-queue", "8")
    clients = Clients(server.url, threads=8, texts=8)
    time.sleep(1.5)
    code = server.stop()
    seen = clients.stop()
    assert code == 0
    assert seen[200] > 0 and seen[503] > 0 and seen["hung"] == 0 and set(seen) <= {200, 503, "refused", "closed"}, seen
    assert server.said_answers() == _answered(seen)


def test_sigterm_during_an_engine_restart(serve: Callable[..., Server]) -> None:
    server = serve()
    clients = Clients(server.url)
    time.sleep(0.5)
    os.kill(server.get("/healthz").json()["engine_pid"], signal.SIGKILL)
    server.wait_until(lambda: server.get("/healthz").status_code == 503, 10, "/healthz never said the engine died")
    code = server.stop()
    seen = clients.stop()
    assert code == 0 and seen["hung"] == 0 and set(seen) <= {200, 503, "refused", "closed"}, seen
    assert server.said_answers() == _answered(seen)  # what the clients saw as not taken, the server did not take


def test_an_engine_that_cannot_be_restarted_ends_the_server_with_status_1(serve: Callable[..., Server]) -> None:
    server = serve("--max-restarts", "0")
    os.kill(server.get("/healthz").json()["engine_pid"], signal.SIGKILL)
    assert server.process.wait(60) == 1
    assert "stopping: the engine died and could not be restarted" in server.log.read_text()
