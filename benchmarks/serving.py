"""The three schedulers (full, batch, pooled) on the same inputs on the same machine, one after another:
for each, start `layerexit serve` on loopback, sweep open-loop Poisson load with `layerexit loadtest`'s
code, stop the server with SIGTERM (it drains), and write one JSON, a markdown table and a PNG of p50
and p99 latency against offered load (a curve per scheduler).

    .venv/bin/python benchmarks/serving.py runs/demo --runtime torch --rates 10 20 40 60 80 120 160 \\
        --seconds 8 --slo-ms 100 --out studies/serving/torch

Each capacity at the SLO (the highest offered rate with p99 under it and under 1% refused) is refined by
`--refine` bisections between the rates swept; every scheduler is then run at exactly half of `full`'s
capacity (`full` runs first). `--overload` offers `pooled` twice its capacity with `--max-queue` set by
Little's law to capacity x SLO (the most inputs the server can hold and still answer each within about
the SLO). It prints the capacities, `pooled`'s over `full`'s, p50 at half of `full`'s capacity and the
overload run; the server's own latency (`engine p50`) beside the client's shows what HTTP costs.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx

from layerexit.atomic import write_json, write_text
from layerexit.serving.loadtest import HEADER, RateResult, capacity, format_row, run_inputs, sweep

SCHEDULERS = ("full", "batch", "pooled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(run: str, scheduler: str, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "layerexit.cli",
        "serve",
        run,
        "--port",
        str(port),
        "--scheduler",
        scheduler,
        "--runtime",
        args.runtime,
        "--threads",
        str(args.threads),
        "--policy",
        args.policy,
        "--max-batch",
        str(args.max_batch),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--max-queue",
        str(args.max_queue),
        "--engine",
        args.engine,
    ]
    if args.strategy:
        cmd += ["--strategy", args.strategy]
    proc = subprocess.Popen(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, f"the {scheduler} server")
    return proc, url


def wait_ready(server: subprocess.Popen[bytes], url: str, what: str = "the server", seconds: float = 180) -> None:
    """Until ``url``'s /readyz answers 200; the server is killed and the benchmark stopped if it exits or
    takes longer than ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise SystemExit(f"{what} did not become ready")
        time.sleep(0.2)


def plot(results: dict[str, list[dict[str, float]]], slo: float, path: Path, title: str) -> None:
    from layerexit.evaluation.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, (scheduler, rows) in enumerate(results.items()):
        answered = [r for r in rows if r["p99_ms"] is not None]
        for key, style in (("p50_ms", "--"), ("p99_ms", "-")):
            values = [r[key] for r in answered]
            label = f"{scheduler} {key[:3]}"
            ax.plot([r["offered_rps"] for r in answered], values, style, color=f"C{i}", marker=".", label=label)
    ax.axhline(slo, color="k", lw=0.8, ls=":", label=f"SLO {slo:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s, Poisson, one input each)")
    ax.set_ylabel("latency of answered requests (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--runtime", default="torch")
    p.add_argument("--strategy", default="")
    p.add_argument("--rates", type=float, nargs="+", default=[10, 20, 40, 60, 80, 120, 160])
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--slo-ms", type=float, default=100)
    p.add_argument("--threads", type=int, default=1, help="server threads (the client takes the other core)")
    p.add_argument("--policy", default="deepest", help="the pooled scheduler's policy (fullest, oldest or deepest)")
    p.add_argument("--engine", default="auto", help="auto, process (of its own) or thread (of the server)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--schedulers", nargs="+", default=list(SCHEDULERS))
    p.add_argument("--overload", action="store_true", help="also offer pooled twice its capacity")
    p.add_argument(
        "--overload-max-queue",
        type=int,
        default=0,
        help="--max-queue of the overloaded server (0: pooled's capacity x the SLO, by Little's law)",
    )
    p.add_argument("--refine", type=int, default=2, help="bisections of each capacity between the rates swept")
    p.add_argument("--out", type=Path, required=True, help="output prefix: writes PREFIX.json, .md, .png")
    args = p.parse_args()
    texts = run_inputs(args.run, "test")
    results: dict[str, list[dict[str, float]]] = {}
    info: dict[str, dict[str, object]] = {}
    caps: dict[str, float | None] = {}
    schedulers = sorted(args.schedulers, key=lambda s: s != "full")  # full first: the others meet its half rate
    half: float | None = None
    for scheduler in schedulers:
        proc, url = start(args.run, scheduler, args)
        try:
            info[scheduler] = httpx.get(f"{url}/healthz").json()
            print(f"\n== {scheduler} ({info[scheduler].get('strategy')}, {args.runtime})\n{HEADER}", flush=True)
            sweep(url, texts, [args.rates[0]], seconds=2, progress=False)  # warm-up
            rows = sweep(url, texts, args.rates, seconds=args.seconds, seed=1)
            rows += refine(url, texts, rows, args)
            caps[scheduler] = capacity(rows, args.slo_ms)
            if scheduler == "full" and caps["full"]:
                half = caps["full"] / 2
            if half is not None and all(abs(r.offered_rps - half) > 1e-6 for r in rows):
                rows += sweep(url, texts, [half], seconds=args.seconds, seed=3)
            results[scheduler] = [asdict(r) for r in sorted(rows, key=lambda r: r.offered_rps)]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    summary: dict[str, object] = {"capacity_rps": caps}
    if caps.get("full") and caps.get("pooled"):
        summary["pooled_over_full"] = round(caps["pooled"] / caps["full"], 2)  # type: ignore[operator]
    if half is not None:
        summary["p50_at_half_full_capacity"] = {s: at_rate(rows, half) for s, rows in results.items()}
    if args.overload and caps.get("pooled"):
        rate = 2 * caps["pooled"]  # type: ignore[operator]
        # Little's law: at most capacity x SLO inputs in the server keeps an accepted one's wait near the SLO
        args.max_queue = args.overload_max_queue or max(1, math.ceil(caps["pooled"] * args.slo_ms / 1000))  # type: ignore[operator]
        proc, url = start(args.run, "pooled", args)
        try:
            warm = sweep(url, texts, [args.rates[0]], seconds=2, progress=False)[0]  # warm-up
            over = sweep(url, texts, [rate], seconds=args.seconds, seed=2, progress=False)[0]
            health = httpx.get(f"{url}/healthz").json()
            summary["overload_pooled"] = {
                **asdict(over),
                "max_queue": args.max_queue,
                "answered_by_server": health["answered"] - warm.ok,  # the warm-up's answers taken out
                "queue_depth_after": health["queue_depth"],
            }
            if summary["overload_pooled"]["answered_by_server"] != over.ok or warm.errors or over.errors:  # type: ignore[index]
                print(f"warning: the server answered {health['answered']} inputs, the client got {warm.ok + over.ok}")
            print(f"\npooled offered {rate:g}/s (2x its capacity, --max-queue {args.max_queue}): {format_row(over)}")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    out = {
        "run": args.run,
        "runtime": args.runtime,
        "slo_ms": args.slo_ms,
        "seconds_per_rate": args.seconds,
        "server_threads": args.threads,
        "policy": args.policy,
        "engine": args.engine,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "servers": info,
        "rates": results,
        **summary,
        "command": " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), out)
    write_text(args.out.with_suffix(".md"), table(results, caps, args.slo_ms) + "\n")
    plot(
        results,
        args.slo_ms,
        args.out.with_suffix(".png"),
        f"{Path(args.run).name} · {args.runtime} · {info.get('pooled', {}).get('strategy', '')}",
    )
    print("\n" + table(results, caps, args.slo_ms))
    print({k: v for k, v in summary.items()})


def refine(
    url: str, texts: list[tuple[str, str | None]], rows: list[RateResult], args: argparse.Namespace
) -> list[RateResult]:
    """``--refine`` bisections between the highest rate that met the SLO and the next rate swept."""
    extra: list[RateResult] = []
    for i in range(args.refine):
        done = sorted(rows + extra, key=lambda r: r.offered_rps)
        good = capacity(done, args.slo_ms)
        above = [r.offered_rps for r in done if good is not None and r.offered_rps > good]
        if good is None or not above:
            break
        extra += sweep(url, texts, [round((good + min(above)) / 2, 1)], seconds=args.seconds, seed=10 + i)
    return extra


def at_rate(rows: list[dict[str, float]], rate: float) -> dict[str, float]:
    row = min(rows, key=lambda r: abs(r["offered_rps"] - rate))
    return {k: row[k] for k in ("offered_rps", "p50_ms", "p99_ms", "engine_p50_ms")}


def table(results: dict[str, list[dict[str, float]]], caps: dict[str, float | None], slo: float) -> str:
    lines = [
        "| scheduler | offered/s | achieved/s | p50 ms | p90 ms | p99 ms | engine p50 ms | 503 | errors | client CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scheduler, rows in results.items():
        for r in rows:
            lines.append(
                f"| {scheduler} | {r['offered_rps']:g} | {r['achieved_rps']:.1f} | {r['p50_ms']} | {r['p90_ms']} | "
                f"{r['p99_ms']} | {r['engine_p50_ms']} | {r['rejected_503']} | {r['errors']} | {r['client_cpu']:.2f} |"
            )
    lines.append("")
    lines.append(
        f"capacity at p99 <= {slo:g} ms: " + ", ".join(f"{s} {c if c is not None else '-'}/s" for s, c in caps.items())
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
