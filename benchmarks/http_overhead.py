"""What one request costs outside the model: the HTTP server stack and the load-test client.

Serves a FastAPI endpoint that parses a classify body and answers a fixed result (no model), under
uvicorn with the pure-Python stack (asyncio loop, h11 parser) and with uvloop and httptools, and loads
it open-loop (Poisson) with an httpx and an aiohttp client. Per pair: client-side p50/p99 latency, and
the CPU seconds each request cost the client and the server. Every millisecond here is in every
latency ``benchmarks/serving.py`` measures, for each scheduler alike.

    .venv/bin/python benchmarks/http_overhead.py --rate 20 --seconds 8 --out studies/serving/http-overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BODY = {"texts": ["a tweet of about the usual length, with a few words in it and a link"]}
ANSWER = {
    "results": [{"label": "positive", "probability": 0.97, "exit_layer": 2, "latency_ms": 9.1, "truncated": False}]
}


def serve(port: int, loop: str, http: str) -> None:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        json.loads(await request.body())
        return JSONResponse(ANSWER)

    @app.get("/cpu")
    async def cpu() -> dict[str, float]:
        return {"cpu": time.process_time()}

    uvicorn.run(app, host="127.0.0.1", port=port, loop=loop, http=http, log_level="warning")


async def load(url: str, client: str, rate: float, seconds: float) -> tuple[list[float], float, int]:
    rng = random.Random(0)
    latencies: list[float] = []
    if client == "httpx":
        import httpx

        session = httpx.AsyncClient(limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200))

        async def post() -> None:
            start = time.perf_counter()
            response = await session.post(url + "/v1/classify", json=BODY)
            response.json()
            latencies.append((time.perf_counter() - start) * 1000)

    else:
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000))

        async def post() -> None:
            start = time.perf_counter()
            async with session.post(url + "/v1/classify", json=BODY) as response:
                await response.json()
            latencies.append((time.perf_counter() - start) * 1000)

    for _ in range(20):  # warm up the connection pool
        await post()
    latencies.clear()
    cpu0, wall0, next_at, tasks = time.process_time(), time.perf_counter(), time.perf_counter(), []
    while True:
        next_at += rng.expovariate(rate)
        if next_at - wall0 > seconds:
            break
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        tasks.append(asyncio.create_task(post()))
    await asyncio.gather(*tasks)
    cpu = time.process_time() - cpu0
    if client == "httpx":
        await session.aclose()  # type: ignore[union-attr]
    else:
        await session.close()  # type: ignore[union-attr]
    return latencies, cpu, len(tasks)


def server_cpu(url: str) -> float:
    import httpx

    return float(httpx.get(url + "/cpu").json()["cpu"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--serve", nargs=3, metavar=("PORT", "LOOP", "HTTP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1], args.serve[2])
        return
    rows = []
    print(
        f"{'server':<18} {'client':<8} {'p50 ms':>7} {'p99 ms':>7} {'client CPU ms/req':>18} {'server CPU ms/req':>18}"
    )
    for loop, http in (("asyncio", "h11"), ("uvloop", "httptools")):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), loop, http], env=dict(os.environ))
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                try:
                    server_cpu(url)
                    break
                except Exception:
                    time.sleep(0.1)
            for client in ("httpx", "aiohttp"):
                before = server_cpu(url)
                latencies, cpu, sent = asyncio.run(load(url, client, args.rate, args.seconds))
                served = server_cpu(url) - before
                row = {
                    "server": f"{loop}+{http}",
                    "client": client,
                    "requests": sent,
                    "p50_ms": round(statistics.median(latencies), 2),
                    "p99_ms": round(sorted(latencies)[int(0.99 * (len(latencies) - 1))], 2),
                    "client_cpu_ms_per_request": round(1000 * cpu / sent, 2),
                    "server_cpu_ms_per_request": round(1000 * served / (sent + 20), 2),
                }
                rows.append(row)
                print(
                    f"{row['server']:<18} {client:<8} {row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f} "
                    f"{row['client_cpu_ms_per_request']:>18.2f} {row['server_cpu_ms_per_request']:>18.2f}",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(10)
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from layerexit.atomic import write_json

        write_json(args.out, {"rate": args.rate, "seconds": args.seconds, "rows": rows})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
