"""Balancing benchmark: the same open-loop load through the API for every routing strategy, on real worker
processes whose scripted engine generates at fixed, different speeds (1x, 2x, 4x by default).

    .venv/bin/python bench/balancing.py [--seconds 15] [--load 1.1] [--tokens 20] [--base-speed 20]

Ideal throughput is the fleet's capacity: sum over workers of concurrency x speed / tokens per request.
Requests arrive as a Poisson process at ``--load`` x ideal for ``--seconds``; throughput counts the
requests that finished inside the arrival window (after a short warm-up), so a strategy that strands
requests on a slow worker shows it. Latency percentiles cover every request, including the drain.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ops.redis_server import RedisServer
from tests.fleet import Fleet

STRATEGIES = ["queue", "round_robin", "least_connections", "weighted", "random", "fastest_response"]
CATALOG = "models:\n  scripted:\n    context_length: 8192\n    sources:\n      scripted: {path: %s}\n"


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    speed: float  # tokens per second
    concurrency: int

    def capacity(self, tokens: int) -> float:
        return self.concurrency * self.speed / tokens


@dataclass
class Run:
    strategy: str
    started: float = 0.0
    done: list[tuple[float, float, str]] = field(default_factory=list)  # (finished at, latency, worker)
    failed: int = 0


async def one(client: httpx.AsyncClient, run: Run, tokens: int) -> None:
    body = {"model": "scripted", "messages": [{"role": "user", "content": "go"}], "max_tokens": tokens}
    headers = {"x-inferq-routing": run.strategy}
    sent = time.monotonic()
    try:
        r = await client.post("/v1/chat/completions", json=body, headers=headers)
    except httpx.HTTPError:
        run.failed += 1
        return
    now = time.monotonic()
    if r.status_code != 200:
        run.failed += 1
        return
    run.done.append((now - run.started, now - sent, r.headers.get("x-inferq-worker", "?")))


async def drive(base_url: str, strategy: str, rate: float, seconds: float, tokens: int, seed: int) -> Run:
    rng = random.Random(seed)
    run = Run(strategy)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
        run.started = time.monotonic()
        tasks = []
        at = 0.0
        while True:
            at += rng.expovariate(rate)
            if at >= seconds:
                break
            await asyncio.sleep(max(0.0, run.started + at - time.monotonic()))
            tasks.append(asyncio.create_task(one(client, run, tokens)))
        await asyncio.gather(*tasks)
    return run


def pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def start(workers: list[WorkerSpec], tmp: Path, redis_url: str) -> Fleet:
    catalog = tmp / "models.yaml"
    catalog.write_text(CATALOG % catalog)
    fleet = Fleet(redis_url, tmp, INFERQ_MODELS_FILE=str(catalog), INFERQ_LOG_LEVEL="WARNING")
    fleet.start_api()
    for w in workers:
        # Weights proportional to capacity, which is what `weighted` is for: an operator sets them.
        args = ["--engine", "scripted", "--concurrency", str(w.concurrency), "--weight", str(w.speed)]
        env = {"INFERQ_SCRIPTED_TOKENS_PER_SECOND": str(w.speed)}
        fleet.start_worker(w.name, "scripted", wait=False, args=args, env=env)
    for w in workers:
        fleet.wait_listed(w.name)
    return fleet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=15.0, help="arrival window per strategy")
    p.add_argument("--warmup", type=float, default=2.0, help="start of the throughput window")
    p.add_argument("--load", type=float, default=1.1, help="offered load as a multiple of ideal throughput")
    p.add_argument("--tokens", type=int, default=20, help="output tokens per request")
    p.add_argument("--base-speed", type=float, default=20.0, help="tokens/s of the 1x worker")
    p.add_argument("--speeds", default="1,2,4", help="worker speeds as multiples of --base-speed")
    p.add_argument("--concurrency", type=int, default=2, help="jobs each worker runs at once")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    args = p.parse_args()

    workers = [
        WorkerSpec(f"w{m}x", float(m) * args.base_speed, args.concurrency)
        for m in (int(s) for s in args.speeds.split(","))
    ]
    ideal = sum(w.capacity(args.tokens) for w in workers)
    rate = args.load * ideal
    server = RedisServer()
    fleet = start(workers, Path(tempfile.mkdtemp(prefix="inferq-balancing-")), server.url)
    rows = []
    try:
        for i, strategy in enumerate(args.strategies.split(",")):
            run = asyncio.run(drive(fleet.base_url, strategy, rate, args.seconds, args.tokens, seed=i))
            in_window = [d for d in run.done if args.warmup <= d[0] <= args.seconds]
            throughput = len(in_window) / (args.seconds - args.warmup)
            latencies = [d[1] for d in run.done]
            share = Counter(d[2] for d in run.done)
            rows.append((strategy, throughput, pct(latencies, 50), pct(latencies, 95), share, run.failed))
            time.sleep(1.0)  # let EWMAs and queues settle between strategies
    finally:
        fleet.close()
        server.stop()

    names = [w.name for w in workers]
    out = sys.stdout.write
    out(
        f"\nfleet: {', '.join(f'{w.name} {w.speed:g} tok/s x{w.concurrency}' for w in workers)}; "
        f"{args.tokens} tokens/request; ideal {ideal:.2f} req/s; offered {rate:.2f} req/s "
        f"({args.load:g}x) for {args.seconds:g}s\n\n"
    )
    share_head = " | ".join(f"share {n}" for n in names)
    out(f"| strategy | req/s | of ideal | p50 s | p95 s | {share_head} | failed |\n")
    out("|" + "---|" * (6 + len(names)) + "\n")
    for strategy, thr, p50, p95, share, failed in rows:
        total = sum(share.values()) or 1
        shares = " | ".join(f"{share[n] / total:.0%}" for n in names)
        out(f"| {strategy} | {thr:.2f} | {thr / ideal:.2f} | {p50:.2f} | {p95:.2f} | {shares} | {failed} |\n")
    ideal_shares = " | ".join(f"{w.capacity(args.tokens) / ideal:.0%}" for w in workers)
    out(f"| *ideal* | {ideal:.2f} | 1.00 | | | {ideal_shares} | |\n")


if __name__ == "__main__":
    main()
