"""``layerexit loadtest``: open-loop load on a layerexit server, one input per request.

Arrivals are a Poisson process at each offered rate (exponential gaps, seeded), sent whether or not
earlier requests have been answered: the load does not slow down when the server does, as real users'
do not (a fixed pool of clients waiting on each other would hide queueing). Each rate runs for
``--seconds``; requests still open then get ``--timeout`` more seconds. Loopback addresses only.

Per rate: offered and achieved rate (answered with 200 per second of the run), p50/p90/p99 latency of
answered requests, errors, 503s, and the client's own CPU use (it shares the machine with the server).
The capacity at the SLO is the highest rate whose p99 stays under ``--slo-ms`` with under 1% of
requests refused or failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlparse

from layerexit.errors import LayerExitError
from layerexit.options import option

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class RateResult:
    offered_rps: float
    """The nominal Poisson rate; ``sent / seconds`` is what one draw of it gave."""
    sent_rps: float
    achieved_rps: float
    sent: int
    ok: int
    rejected_503: int
    errors: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    engine_p50_ms: float | None
    """Median of the server's own ``latency_ms`` (arrival in the engine to answer): the rest of ``p50_ms``
    is HTTP, JSON, tokenization and the client."""
    client_cpu: float
    """Client CPU seconds per wall second (1.0 = one core busy)."""


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def check_url(url: str) -> str:
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK and not host.startswith("127."):
        raise LayerExitError(f"{url}: load tests only target this machine (127.0.0.1, localhost or ::1)")
    return url.rstrip("/")


async def one_rate(
    url: str, texts: Sequence[tuple[str, str | None]], rate: float, seconds: float, timeout: float, rng: random.Random
) -> RateResult:
    import aiohttp  # its client costs about a third of httpx's CPU per request (benchmarks/http_overhead.py)

    latencies: list[float] = []
    engine: list[float] = []
    counts = {"ok": 0, "503": 0, "error": 0}
    connector = aiohttp.TCPConnector(limit=1000)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as client:

        async def send(text: str, pair: str | None) -> None:
            body: dict[str, Any] = {"texts": [text]}
            if pair is not None:
                body["text_pairs"] = [pair]
            start = time.perf_counter()
            try:
                async with client.post(f"{url}/v1/classify", json=body) as response:
                    status, raw = response.status, await response.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                counts["error"] += 1
                return
            if status == 200:
                latencies.append((time.perf_counter() - start) * 1000)
                engine.append(float(json.loads(raw)["results"][0]["latency_ms"]))
                counts["ok"] += 1
            elif status == 503:
                counts["503"] += 1
            else:
                counts["error"] += 1

        cpu0, wall0 = time.process_time(), time.perf_counter()
        tasks = []
        next_at = wall0
        i = 0
        while True:
            next_at += rng.expovariate(rate)
            if next_at - wall0 > seconds:
                break
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            text, pair = texts[i % len(texts)]
            tasks.append(asyncio.create_task(send(text, pair)))
            i += 1
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
    return RateResult(
        offered_rps=round(rate, 3),
        sent_rps=round(len(tasks) / seconds, 3),
        achieved_rps=round(counts["ok"] / wall, 3),
        sent=len(tasks),
        ok=counts["ok"],
        rejected_503=counts["503"],
        errors=counts["error"],
        p50_ms=_round(percentile(latencies, 0.5)),
        p90_ms=_round(percentile(latencies, 0.9)),
        p99_ms=_round(percentile(latencies, 0.99)),
        engine_p50_ms=_round(percentile(engine, 0.5)),
        client_cpu=round(cpu / wall, 3),
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def capacity(results: Sequence[RateResult], slo_ms: float) -> float | None:
    """The highest offered rate with p99 under the SLO and under 1% refused or failed."""
    good = [
        r.offered_rps
        for r in results
        if r.p99_ms is not None and r.p99_ms <= slo_ms and (r.rejected_503 + r.errors) <= 0.01 * max(1, r.sent)
    ]
    return max(good) if good else None


def sweep(
    url: str,
    texts: Sequence[tuple[str, str | None]],
    rates: Sequence[float],
    *,
    seconds: float,
    timeout: float = 10.0,
    seed: int = 0,
    progress: bool = True,
) -> list[RateResult]:
    url = check_url(url)
    if not texts:
        raise LayerExitError("no inputs to send")
    if any(r <= 0 for r in rates) or seconds <= 0:
        raise LayerExitError("rates and --seconds must be > 0")
    results = []
    for rate in rates:
        rng = random.Random(f"{seed}:{rate}")
        result = asyncio.run(one_rate(url, texts, rate, seconds, timeout, rng))
        if progress:
            print(format_row(result), flush=True)
        results.append(result)
    return results


HEADER = (
    f"{'offered/s':>9} {'achieved/s':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'engine p50':>10} "
    f"{'503':>5} {'err':>4} {'cpu':>5}"
)


def format_row(r: RateResult) -> str:
    def ms(v: float | None) -> str:
        return f"{v:>8.1f}" if v is not None else f"{'-':>8}"

    return (
        f"{r.offered_rps:>9.1f} {r.achieved_rps:>10.1f} {ms(r.p50_ms)} {ms(r.p90_ms)} {ms(r.p99_ms)} "
        f"{ms(r.engine_p50_ms):>10} "
        f"{r.rejected_503:>5} {r.errors:>4} {r.client_cpu:>5.2f}"
    )


def run_inputs(run: str, split: str) -> list[tuple[str, str | None]]:
    """The texts (and pairs) of a run's task split, in a seeded shuffled order."""
    from layerexit.run_folder import RunFolder

    task = RunFolder(run).require(config=True).config().load_task()
    examples = task.splits.get(split)
    if not examples:
        raise LayerExitError(f"task {task.name!r} has no {split!r} split")
    inputs = [(e.text, e.text_pair) for e in examples]
    random.Random(0).shuffle(inputs)
    return inputs


@dataclass
class LoadtestOptions:
    """``layerexit loadtest``'s options."""

    url: str = option("", "server base URL, e.g. http://127.0.0.1:8000 (loopback only)", positional=True)
    run: str = option("", "run folder whose task split gives the inputs", required=True)
    split: str = option("test", "split to take the inputs from")
    rates: list[float] = option([5.0, 10.0, 20.0, 40.0], "requests per second")
    seconds: float = option(10.0, "duration of each rate")
    slo_ms: float = option(200.0, "p99 latency objective")
    timeout: float = option(10.0, "client timeout per request, seconds")
    seed: int = option(0, "seed of the arrival times and the input order")
    output: str = option("", "JSON file to write")


def cmd_loadtest(namespace: argparse.Namespace) -> int:
    from layerexit.atomic import write_json
    from layerexit.config import from_namespace

    args = from_namespace(LoadtestOptions, namespace)
    texts = run_inputs(args.run, args.split)
    print(HEADER)
    results = sweep(args.url, texts, args.rates, seconds=args.seconds, timeout=args.timeout, seed=args.seed)
    cap = capacity(results, args.slo_ms)
    print(f"capacity at p99 <= {args.slo_ms:g} ms: {cap if cap is not None else 'none of the rates'} requests/s")
    if args.output:
        from pathlib import Path

        out = {"url": args.url, "slo_ms": args.slo_ms, "capacity_rps": cap, "rates": [asdict(r) for r in results]}
        write_json(Path(args.output), out)
        print(f"wrote {args.output}")
    return 0
