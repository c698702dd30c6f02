"""A soak run: `layerexit serve` held at a steady open-loop load for minutes, its memory and queue depth
sampled every second. Leaks, queues that creep up, and errors that only come after thousands of requests
show here and not in a 8-second load test.

    .venv/bin/python benchmarks/soak.py runs/demo --rate 40 --seconds 600 --out studies/serving/soak

`--rate` is the offered Poisson rate (80% of `pooled`'s measured capacity: 50 req/s for `runs/demo` on
PyTorch, docs/serve.md). The server runs `--scheduler pooled` with the engine in a process of its own
(PyTorch); memory is the resident set of the server process and of its engine process (from /proc).
Writes NAME.json (the samples and the load's summary) and NAME.png, and prints memory at the start
and the end, the queue depth and the errors.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from layerexit.atomic import write_json
from layerexit.serving.loadtest import one_rate, run_inputs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import free_port, wait_ready


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of a process, in MB, or None once it is gone."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def sample(url: str, pid: int, seconds: float, samples: list[dict[str, float | int | None]]) -> None:
    """Every second: the server's and its engine's memory, the queue depth and the inputs answered."""
    import aiohttp

    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
        while (elapsed := time.perf_counter() - start) < seconds:
            health: dict[str, int] = {}
            try:
                async with client.get(f"{url}/healthz") as response:
                    health = await response.json()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            samples.append(
                {
                    "t": round(elapsed, 2),
                    "server_mb": rss_mb(pid),
                    "engine_mb": rss_mb(health.get("engine_pid")),
                    "queue_depth": health.get("queue_depth"),
                    "answered": health.get("answered"),
                }
            )
            await asyncio.sleep(max(0.0, len(samples) - (time.perf_counter() - start)))


async def soak(url: str, pid: int, args: argparse.Namespace) -> tuple[object, list[dict[str, float | int | None]]]:
    samples: list[dict[str, float | int | None]] = []
    texts = run_inputs(args.run, "test")
    load, _ = await asyncio.gather(
        one_rate(url, texts, args.rate, args.seconds, 10.0, random.Random(0)),
        sample(url, pid, args.seconds, samples),
    )
    return load, samples


def plot(samples: list[dict[str, float | int | None]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, (mem, queue) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    mem.plot(t, [s["server_mb"] for s in samples], label="server process")
    mem.plot(t, [s["engine_mb"] for s in samples], label="engine process")
    mem.set_ylabel("resident memory, MB")
    mem.legend()
    mem.set_title(title)
    queue.plot(t, [s["queue_depth"] for s in samples], color="tab:red")
    queue.set_ylabel("inputs queued")
    queue.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--rate", type=float, default=40.0, help="offered requests per second (Poisson)")
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--strategy", default="maxprob(threshold=0.93)")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads (the client gets the rest)")
    p.add_argument("--out", required=True, help="path prefix of NAME.json and NAME.png")
    args = p.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "layerexit.cli", "serve", args.run, "--port", str(port), "--runtime", "torch"]
    command += ["--scheduler", "pooled", "--strategy", args.strategy, "--threads", str(args.threads)]
    server = subprocess.Popen(command)
    wait_ready(server, url)
    try:
        load, samples = asyncio.run(soak(url, server.pid, args))
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(120)
    first, last = samples[0], samples[-1]
    summary = {
        "run": args.run,
        "rate": args.rate,
        "seconds": args.seconds,
        "strategy": args.strategy,
        "server_exit_code": code,
        "load": asdict(load),  # type: ignore[call-overload]
        "memory_mb": {
            "server_start": first["server_mb"],
            "server_end": last["server_mb"],
            "engine_start": first["engine_mb"],
            "engine_end": last["engine_mb"],
        },
        "queue_depth_max": max((s["queue_depth"] or 0) for s in samples),
        "samples": samples,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), summary)
    plot(samples, out.with_suffix(".png"), f"{args.run}: {args.rate:g} req/s for {args.seconds:g} s, pooled")
    m = summary["memory_mb"]
    print(f"sent {load.sent}, answered {load.ok}, 503 {load.rejected_503}, errors {load.errors}")  # type: ignore[attr-defined]
    print(f"p50 {load.p50_ms} ms, p99 {load.p99_ms} ms")  # type: ignore[attr-defined]
    print(f"server memory {m['server_start']:.0f} -> {m['server_end']:.0f} MB", end=", ")
    print(f"engine {m['engine_start']:.0f} -> {m['engine_end']:.0f} MB")
    print(f"queue depth at most {summary['queue_depth_max']}; server exit code {code}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
