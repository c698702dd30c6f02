"""The engine as a Ray Serve deployment: a local one-replica application on 127.0.0.1 classifies texts."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'layerexit[ray]')")
pytest.importorskip("fastapi")

import httpx
import ray
from ray import serve

from layerexit.errors import LayerExitError
from layerexit.serving.ray_app import build, options

from .test_end_to_end import trained_run  # noqa: F401  (a module-scoped fixture)

pytestmark = pytest.mark.slow
SRC = Path(__file__).resolve().parent.parent / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ray_serve() -> Iterator[int]:
    port = free_port()
    # A loaded machine (CI beside other jobs) can keep Serve's HTTP proxy from answering its readiness
    # check within the default 5 s: give it 30, in the controller's and proxy's processes.
    patience = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(SRC), **patience}},
    )
    try:  # a failed start must not leave Ray running for the next test
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_options_read_like_the_serve_command(trained_run: Path) -> None:  # noqa: F811
    config, ray_options = options({"run": str(trained_run), "scheduler": "batch", "max_batch": "8", "replicas": "2"})
    assert config.run == str(trained_run) and config.scheduler == "batch" and config.max_batch == 8
    assert ray_options["num_replicas"] == 2 and ray_options["max_ongoing_requests"] == 256
    with pytest.raises(LayerExitError, match="run folder"):
        options({"scheduler": "pooled"})
    with pytest.raises(LayerExitError, match="scheduler must be one of"):
        options({"run": str(trained_run), "scheduler": "fifo"})


def test_one_replica_classifies_over_http(ray_serve: int, trained_run: Path) -> None:  # noqa: F811
    serve.run(build({"run": str(trained_run), "threads": "1", "max_queue": "64"}), route_prefix="/", name="layerexit")
    url = f"http://127.0.0.1:{ray_serve}"
    reply = httpx.post(url + "/v1/classify", json={"texts": ["alpha good beta", "bad gamma"]}, timeout=60)
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert len(results) == 2 and all(r["label"] in ("neg", "pos") and 1 <= r["exit_layer"] <= 4 for r in results)
    health = httpx.get(url + "/healthz", timeout=30).json()
    assert health["scheduler"] == "pooled" and health["answered"] == 2
    bad = httpx.post(url + "/v1/classify", json={"texts": []}, timeout=30)
    assert bad.status_code == 400 and "non-empty list" in bad.json()["error"]


def test_two_replicas_both_answer(ray_serve: int, trained_run: Path) -> None:  # noqa: F811
    """The documented scale-out: `replicas=2 threads=1` puts two engines behind one route, and requests reach both."""
    serve.run(
        build({"run": str(trained_run), "replicas": "2", "threads": "1", "max_queue": "64"}),
        route_prefix="/",
        name="layerexit",
    )
    url = f"http://127.0.0.1:{ray_serve}"
    pids = set()
    for _ in range(40):
        reply = httpx.post(url + "/v1/classify", json={"texts": ["alpha good beta"]}, timeout=60)
        assert reply.status_code == 200, reply.text
        pids.add(httpx.get(url + "/healthz", timeout=30).json()["pid"])
        if len(pids) == 2:
            break
    assert len(pids) == 2


def test_the_readme_ray_command_as_written(trained_run: Path) -> None:  # noqa: F811
    """README's `serve run ...` line, run by Ray's own command with only the run folder swapped in: two
    replicas on 127.0.0.1:8000, both answering."""
    import os
    import re
    import shutil
    import signal
    import subprocess
    import sys
    import time

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    line = re.search(r"^serve run layerexit\.serving\.ray_app:build .*$", readme, re.M)
    assert line is not None, "the README has no Ray Serve command"
    words = line.group(0).split()
    words = [f"run={trained_run}" if w.startswith("run=") else w for w in words]
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.fail("port 8000, which the README's command serves on, is taken on this machine")
    serve_command = shutil.which("serve", path=str(Path(sys.executable).parent)) or shutil.which("serve")
    assert serve_command is not None, "Ray Serve's `serve` command is not installed"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    process = subprocess.Popen(
        [serve_command, *words[1:]], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        pids: set[int] = set()
        deadline = time.monotonic() + 240
        while len(pids) < 2:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the README's Ray command did not serve two replicas in 240 s"
            try:
                reply = httpx.post("http://127.0.0.1:8000/v1/classify", json={"texts": ["alpha good"]}, timeout=30)
                if reply.status_code == 200:
                    pids.add(httpx.get("http://127.0.0.1:8000/healthz", timeout=30).json()["pid"])
                    continue
            except httpx.TransportError:
                pass
            time.sleep(1)
    finally:
        process.send_signal(signal.SIGINT)  # `serve run` shuts the application and its local Ray down
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
