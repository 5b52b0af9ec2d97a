"""Affinity benchmark: multi-turn conversations, their turns interleaved, through every cache-relevant
routing strategy in one run, plus the routing decision's own cost.

    .venv/bin/python bench/affinity.py [--conversations 8] [--turns 5] [--cache-mib 96]
        [--fleet real|scripted|both]

Each conversation opens with its own long document (~1k tokens) and asks a question per turn, sending the
whole history back each time (~1.2-1.5k tokens by the last turn); all conversations run at once, each turn
sent when the previous reply arrived. ``real``: two SmolLM2 llama.cpp workers with one thread each (the
prefill of a cold history takes seconds there). ``scripted``: two scripted workers whose engine simulates a
prefix cache and a prefill cost per uncached token, so the router's own behaviour shows without the model.
For each strategy (``queue``, ``least_connections``, ``affinity``): time to first token p50/p95 per turn
number, throughput, each worker's share of the requests and the cache hit rate (requests that took part of
their prompt from the cache, and the share of prompt tokens that came from it). Then the pick itself:
``AffinityPicker.pick`` against Redis at 500 picks/s, p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
import redis.asyncio as aredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ops.redis_server import RedisServer
from queueing.affinity import AffinityPicker, Balance, Prefix, Recorder
from queueing.jobs import ChatMessage, Job
from queueing.jobstore import AsyncJobStore
from queueing.registry import WorkerInfo, announce
from tests.fleet import Fleet, write_catalog

STRATEGIES = ["queue", "least_connections", "affinity"]
WORDS = [
    "river",
    "stone",
    "lantern",
    "harbor",
    "meadow",
    "copper",
    "violet",
    "thunder",
    "garden",
    "silver",
    "orchard",
    "candle",
]


def document(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass
class Turn:
    conversation: int
    turn: int
    ttft: float
    worker: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass
class Run:
    strategy: str
    turns: list[Turn] = field(default_factory=list)
    failed: int = 0
    seconds: float = 0.0


async def ask(
    client: httpx.AsyncClient, model: str, messages: list[dict[str, str]], strategy: str, max_tokens: int
) -> tuple[float, str, str, dict[str, int]]:
    """One streamed turn: (time to first token, worker, reply, usage)."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.monotonic()
    ttft, reply, usage = None, [], {}
    async with client.stream(
        "POST", "/v1/chat/completions", json=body, headers={"x-inferq-routing": strategy}
    ) as r:
        r.raise_for_status()
        worker = r.headers.get("x-inferq-worker", "?")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    ttft = ttft if ttft is not None else time.monotonic() - sent
                    reply.append(text)
            if chunk.get("usage"):
                u = chunk["usage"]
                usage = {
                    "prompt": u["prompt_tokens"],
                    "cached": (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                    "completion": u["completion_tokens"],
                }
    return (ttft if ttft is not None else time.monotonic() - sent), worker, "".join(reply), usage


async def converse(
    client: httpx.AsyncClient, run: Run, model: str, c: int, turns: int, doc: str, max_tokens: int
) -> None:
    messages = [{"role": "system", "content": f"Answer from this document only.\n{doc}"}]
    for t in range(1, turns + 1):
        messages.append({"role": "user", "content": f"Question {t}: which word comes after the {t}th one?"})
        try:
            ttft, worker, reply, usage = await ask(client, model, messages, run.strategy, max_tokens)
        except httpx.HTTPError:
            run.failed += 1
            return
        run.turns.append(
            Turn(
                c, t, ttft, worker, usage.get("prompt", 0), usage.get("cached", 0), usage.get("completion", 0)
            )
        )
        messages.append({"role": "assistant", "content": reply})


async def drive(base_url: str, model: str, strategy: str, args: argparse.Namespace, seed: int) -> Run:
    run = Run(strategy)
    rng = random.Random(seed)
    docs = [document(rng, args.doc_words) for _ in range(args.conversations)]
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        started = time.monotonic()
        await asyncio.gather(
            *(
                converse(client, run, model, c, args.turns, docs[c], args.max_tokens)
                for c in range(args.conversations)
            )
        )
        run.seconds = time.monotonic() - started
    return run


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(title: str, runs: list[Run]) -> None:
    print(f"\n## {title}\n")  # noqa: T201
    print(  # noqa: T201
        "| strategy | TTFT p50 turn 1 | TTFT p50 turns >= 3 | TTFT p95 turns >= 3 | requests/s | tokens/s "
        "| busiest worker | hit rate (requests) | cached share of prompt tokens | failed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")  # noqa: T201
    for run in runs:
        first = [t.ttft for t in run.turns if t.turn == 1]
        later = [t.ttft for t in run.turns if t.turn >= 3]
        shares = Counter(t.worker for t in run.turns)
        busiest = max(shares.values()) / max(len(run.turns), 1)
        hits = sum(1 for t in run.turns if t.cached_tokens > 0) / max(len(run.turns), 1)
        prompt = sum(t.prompt_tokens for t in run.turns)
        cached = sum(t.cached_tokens for t in run.turns) / max(prompt, 1)
        tokens = sum(t.completion_tokens for t in run.turns)
        print(  # noqa: T201
            f"| {run.strategy} | {statistics.median(first) if first else float('nan'):.2f} s "
            f"| {statistics.median(later) if later else float('nan'):.2f} s | {pct(later, 0.95):.2f} s "
            f"| {len(run.turns) / run.seconds:.3f} | {tokens / run.seconds:.1f} | {busiest:.0%} "
            f"| {hits:.0%} | {cached:.0%} | {run.failed} |"
        )
    print("\nTTFT p50 by turn (s):\n")  # noqa: T201
    turns = sorted({t.turn for r in runs for t in r.turns})
    print("| strategy | " + " | ".join(f"turn {n}" for n in turns) + " |")  # noqa: T201
    print("|---|" + "---|" * len(turns))  # noqa: T201
    for run in runs:
        by_turn: dict[int, list[float]] = defaultdict(list)
        for t in run.turns:
            by_turn[t.turn].append(t.ttft)
        cells = " | ".join(f"{statistics.median(by_turn[n]):.2f}" if by_turn[n] else "-" for n in turns)
        print(f"| {run.strategy} | {cells} |")  # noqa: T201
    for run in runs:
        shares = Counter(t.worker for t in run.turns)
        print(f"{run.strategy}: requests per worker {dict(sorted(shares.items()))}")  # noqa: T201


def fleet_run(kind: str, args: argparse.Namespace) -> list[Run]:
    server = RedisServer()
    tmp = Path(tempfile.mkdtemp(prefix=f"inferq-affinity-{kind}-"))
    env: dict[str, str] = {}
    if kind == "scripted":
        catalog = tmp / "models.yaml"
        write_catalog(catalog)
        env["INFERQ_MODELS_FILE"] = str(catalog)
        model, worker_env = (
            "scripted",
            {
                "INFERQ_SCRIPTED_TOKENS_PER_SECOND": "200",
                # A CPU-like prefill: 1,000 uncached tokens cost a second.
                "INFERQ_SCRIPTED_PREFILL_SECONDS_PER_TOKEN": "0.001",
            },
        )
        worker_args = ["--engine", "scripted", "--concurrency", "1"]
    else:
        model, worker_args = "smollm2-135m", []
        worker_env = {"INFERQ_LLAMACPP_THREADS": "1", "INFERQ_LLAMACPP_CACHE_MIB": str(args.cache_mib)}
    fleet = Fleet(server.url, tmp, **env)
    try:
        fleet.start_api()
        for name in ("w1", "w2"):
            fleet.start_worker(name, model, wait=False, args=worker_args, env=worker_env)
        for name in ("w1", "w2"):
            fleet.wait_listed(name, timeout=120)
        runs = []
        for i, strategy in enumerate(STRATEGIES):
            # Fresh documents per strategy: no strategy finds what an earlier one left in the caches.
            runs.append(asyncio.run(drive(fleet.base_url, model, strategy, args, seed=1000 * i + 7)))
        return runs
    finally:
        fleet.close()
        server.stop()


def pick_cost(rate: float, seconds: float, workers: int) -> tuple[float, float, int]:
    """The pick alone (prefix hashing included) at ``rate`` picks/s against Redis: p50 and p99 in ms."""
    server = RedisServer()
    try:
        sync = redis.Redis.from_url(server.url)
        fleet = [
            WorkerInfo(name=f"w{i}", host="h", pid=1, engine="scripted", models=["m"], concurrency=4)
            for i in range(workers)
        ]
        rng = random.Random(3)
        histories = [document(rng, 900) for _ in range(64)]
        for i, text in enumerate(histories):
            announce(sync, fleet[i % workers], ttl=600)
            job = Job(model="m", messages=[ChatMessage(role="user", content=text)])
            Recorder(sync, fleet[i % workers].name, ttl=600).record(job, reply="ok")

        async def go() -> list[float]:
            client = aredis.Redis.from_url(server.url)
            picker = AffinityPicker(client, fresh_ms=600_000, ttl=600, balance=Balance())
            store = AsyncJobStore(client, 60)
            took: list[float] = []
            interval, start = 1.0 / rate, time.monotonic()
            n = int(rate * seconds)
            for k in range(n):
                text = histories[k % len(histories)] + f" turn {k}"
                job = Job(model="m", messages=[ChatMessage(role="user", content=text)])
                await store.create(job)
                t0 = time.perf_counter()
                await picker.pick("m", job.id, fleet, Prefix.of(job))
                took.append((time.perf_counter() - t0) * 1000)
                for w in fleet:  # keep in-flight counts from growing without end
                    await client.delete(f"inferq:worker:{w.name}:assigned")
                await asyncio.sleep(max(0.0, start + (k + 1) * interval - time.monotonic()))
            await client.aclose()
            return took

        took = asyncio.run(go())
        return pct(took, 0.5), pct(took, 0.99), len(took)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--doc-words", type=int, default=900, help="words of each conversation's document")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument(
        "--cache-mib",
        type=int,
        default=96,
        help="each real worker's llama.cpp prefix cache: ~4 of these histories (~24 MB each), so the fleet "
        "serves more conversations than one worker's cache holds, as a fleet of many users does",
    )
    parser.add_argument("--fleet", choices=["real", "scripted", "both"], default="both")
    parser.add_argument("--pick-rate", type=float, default=500.0)
    parser.add_argument("--pick-seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(  # noqa: T201
        f"# bench/affinity.py: {args.conversations} conversations x {args.turns} turns, interleaved; "
        f"2 workers, 1 slot each; real workers' prefix cache {args.cache_mib} MiB"
    )
    kinds = ["scripted", "real"] if args.fleet == "both" else [args.fleet]
    for kind in kinds:
        title = "real SmolLM2, llama.cpp, 1 thread per worker" if kind == "real" else "scripted fleet"
        report(title, fleet_run(kind, args))
    p50, p99, n = pick_cost(args.pick_rate, args.pick_seconds, workers=4)
    print(  # noqa: T201
        f"\n## routing decision (AffinityPicker.pick with prefix hashing, 4 workers, 64 held histories)\n\n"
        f"{n} picks at {args.pick_rate:.0f}/s: p50 {p50:.3f} ms, p99 {p99:.3f} ms"
    )


if __name__ == "__main__":
    main()
