"""One client's huge text must not hold up everyone else: the latency of a one-word request alone, and of
the one-word requests that were in flight at the same time as a request carrying a huge text (sent every
0.1 s from another process), on a running `layerexit serve`.

    .venv/bin/python benchmarks/huge_text.py runs/demo --out studies/serving/huge_text.json

Two cases: the largest text the default body limit (1 MiB) lets through, and a 10 MB text with
`--max-body-bytes 11000000`. For each it prints the one-word request's median and p90 latency alone and
with the huge text in flight, their ratio (the target: at most 2x), and how long the huge request took.
`--pythonpath` runs the server from another checkout's `src` (to measure a commit before a change).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from layerexit.atomic import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import free_port, wait_ready

WORDS = [
    "the",
    "service",
    "was",
    "great",
    "but",
    "the",
    "delay",
    "was",
    "long",
    "and",
    "nobody",
    "answered",
    "my",
    "calls",
]


def start(run: str, limit: int, pythonpath: str | None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {}))
    command = [sys.executable, "-m", "layerexit.cli", "serve", run, "--port", str(port), "--runtime", "torch"]
    command += ["--scheduler", "pooled", "--threads", "1", "--max-body-bytes", str(limit)]
    server = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(server, url)
    return server, url


def one_word_requests(client: httpx.Client, url: str, n: int) -> list[tuple[float, float]]:
    """``n`` one-word requests one after another; (start, end) of each on the monotonic clock."""
    out = []
    for _ in range(n):
        start = time.monotonic()
        response = client.post(url + "/v1/classify", json={"texts": ["great"]})
        out.append((start, time.monotonic()))
        assert response.status_code == 200, response.text
    return out


def send_huge(url: str, body: bytes, seconds: float, gap: float) -> list[tuple[float, float]]:
    """A huge request every ``gap`` seconds or so (one at a time) for ``seconds``; (start, end) of each on
    the monotonic clock, which is the same in every process."""
    out = []
    with httpx.Client(timeout=300) as big:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.monotonic()
            reply = big.post(url + "/v1/classify", content=body, headers={"content-type": "application/json"})
            assert reply.status_code == 200 and reply.json()["results"][0]["truncated"], reply.text[:200]
            out.append((start, time.monotonic()))
            time.sleep(gap)
    return out


def overlapping(requests: list[tuple[float, float]], huge: list[tuple[float, float]]) -> list[float]:
    """Latencies (ms) of the requests that were in flight at the same time as a huge one."""
    return [(e - s) * 1000 for s, e in requests if any(hs < e and s < he for hs, he in huge)]


def case(run: str, chars: int, limit: int, requests: int, pythonpath: str | None) -> dict[str, object]:
    huge = " ".join(WORDS[i % len(WORDS)] for i in range(chars // 4))[:chars]
    body = ('{"texts": ["' + huge + '"]}').encode()
    server, url = start(run, limit, pythonpath)
    try:
        with httpx.Client(timeout=300) as client:
            one_word_requests(client, url, 20)  # warm up
            alone = [(e - s) * 1000 for s, e in one_word_requests(client, url, requests)]
            # the huge requests come from a process of their own: in this one they would take the GIL from
            # the one-word client and slow it down on the client's side, not the server's
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                sender = pool.apply_async(send_huge, (url, body, 20.0, 0.1))
                time.sleep(3.0)  # the sender process starts
                during = one_word_requests(client, url, requests * 4)
                huge = sender.get(600)
            beside = overlapping(during, huge)
            huge_ms = [(e - s) * 1000 for s, e in huge]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    q = statistics.quantiles
    result = {
        "text_bytes": len(body),
        "max_body_bytes": limit,
        "one_word_alone_ms": {"median": statistics.median(alone), "p90": q(alone, n=10)[-1]},
        "one_word_beside_huge_ms": {"median": statistics.median(beside), "p90": q(beside, n=10)[-1]},
        "huge_request_ms_median": statistics.median(huge_ms) if huge_ms else None,
        "huge_requests": len(huge_ms),
        "one_word_requests_beside_huge": len(beside),
    }
    ratio = result["one_word_beside_huge_ms"]["median"] / result["one_word_alone_ms"]["median"]  # type: ignore[index]
    result["ratio_of_medians"] = round(ratio, 2)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--requests", type=int, default=200, help="one-word requests per measurement")
    p.add_argument("--pythonpath", default=None, help="serve from this src folder (another checkout)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    results = []
    for chars, limit in (((1 << 20) - 64, 1 << 20), (10_000_000, 11_000_000)):
        r = case(args.run, chars, limit, args.requests, args.pythonpath)
        results.append(r)
        alone, beside = r["one_word_alone_ms"], r["one_word_beside_huge_ms"]
        print(
            f"{r['text_bytes']:>10,} B text in flight: one word {alone['median']:.1f} ms alone "  # type: ignore[index]
            f"(p90 {alone['p90']:.1f}), {beside['median']:.1f} ms beside it "  # type: ignore[index]
            f"(p90 {beside['p90']:.1f}): {r['ratio_of_medians']}x; "  # type: ignore[index]
            f"the huge request {r['huge_request_ms_median'] or float('nan'):.0f} ms ({r['huge_requests']} sent)",
            flush=True,
        )
    if args.out:
        write_json(Path(args.out), {"run": args.run, "pythonpath": args.pythonpath, "cases": results})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
