"""Interactive time to first token while a batch runs, against an idle fleet.

Starts a private Redis, the API and ``--workers`` real SmolLM2 workers (llama.cpp, one slot each). Phase 1
sends ``--requests`` streamed chat requests one after another to the idle fleet. Phase 2 submits a
``--lines``-line batch (each line up to ``--line-tokens`` tokens) through the Batch API and, once lines are
running, sends the same interactive requests, one every ``--gap`` seconds, until they are done; then it
waits for the batch. TTFT runs from sending the request to the first non-empty text chunk. The target
(issue 6): p50 and p95 during the batch within 2x of idle.

Run from the repository root:

    .venv/bin/python bench/batch_ttft.py [--workers 2] [--lines 200] [--requests 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ops.redis_server import RedisServer  # noqa: E402
from tests.fleet import Fleet  # noqa: E402

MODEL = "smollm2-135m"
PROMPTS = ["Say hello.", "Name a colour.", "What is 2 + 2?", "Give me one word.", "Name a fruit."]


def ttft(client: httpx.Client, i: int, max_tokens: int) -> float:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    sent = time.perf_counter()
    first: float | None = None
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for raw in resp.iter_lines():
            if first is None and raw.startswith("data: {"):
                choices = json.loads(raw[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter() - sent
    if first is None:
        raise RuntimeError("no text came back")
    return first


def pct(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def submit_batch(client: httpx.Client, lines: int, max_tokens: int) -> str:
    rows = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Write a sentence about the number {i}."}],
                "max_tokens": max_tokens,
            },
        }
        for i in range(lines)
    ]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    up = client.post("/v1/files", files={"file": ("bench.jsonl", data)}, data={"purpose": "batch"})
    up.raise_for_status()
    spec = {"input_file_id": up.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    created = client.post("/v1/batches", json=spec)
    created.raise_for_status()
    return str(created.json()["id"])


def batch_state(client: httpx.Client, batch_id: str) -> dict[str, object]:
    return dict(client.get(f"/v1/batches/{batch_id}").json())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lines", type=int, default=200)
    p.add_argument("--line-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per interactive request")
    p.add_argument("--gap", type=float, default=0.5, help="seconds between interactive requests in phase 2")
    p.add_argument(
        "--no-preempt", action="store_true", help="batch lines never yield their slot (INFERQ_BATCH_PREEMPT)"
    )
    args = p.parse_args()

    server = RedisServer()
    tmp = Path(tempfile.mkdtemp(prefix="inferq-batch-ttft-"))
    fleet = Fleet(
        server.url,
        tmp,
        INFERQ_LOG_LEVEL="WARNING",
        INFERQ_REQUEST_TIMEOUT="600",
        INFERQ_BATCH_PREEMPT="0" if args.no_preempt else "1",
    )
    try:
        fleet.start_api()
        for n in range(args.workers):
            fleet.start_worker(f"bench-{n}")
        with httpx.Client(base_url=fleet.base_url, timeout=600) as client:
            for i in range(3):  # warm-up: first requests pay for page-ins and caches
                ttft(client, i, args.max_tokens)
            idle = [ttft(client, i, args.max_tokens) for i in range(args.requests)]

            started = time.monotonic()
            batch_id = submit_batch(client, args.lines, args.line_tokens)
            while True:
                state = batch_state(client, batch_id)
                counts = state["request_counts"]
                assert isinstance(counts, dict)
                if counts["completed"] + counts["failed"] >= args.workers:
                    break
                time.sleep(0.1)
            busy: list[float] = []
            for i in range(args.requests):
                busy.append(ttft(client, i, args.max_tokens))
                time.sleep(args.gap)
            state = batch_state(client, batch_id)
            counts = state["request_counts"]
            assert isinstance(counts, dict)
            overlapped = state["status"] == "in_progress"
            while state["status"] not in ("completed", "failed", "cancelled", "expired"):
                time.sleep(0.5)
                state = batch_state(client, batch_id)
            seconds = time.monotonic() - started
    finally:
        fleet.close()
        server.stop()

    final = state["request_counts"]
    assert isinstance(final, dict)
    out = sys.stdout.write
    preempt = "off" if args.no_preempt else "on"
    out(
        f"\n{args.workers} workers x 1 slot, {args.lines}-line batch, <= {args.line_tokens} tokens per line, "
    )
    out(f"preemption {preempt}\n")
    done = f"{final['completed']} completed, {final['failed']} failed"
    out(f"batch: {state['status']}, {done}, {seconds:.1f} s\n")
    if not overlapped:
        out("warning: the batch finished before the interactive requests did; raise --lines\n")
    out("\n| interactive TTFT | n | p50 ms | p95 ms | mean ms |\n|---|---|---|---|---|\n")
    for name, values in (("idle fleet", idle), ("during the batch", busy)):
        row = (len(values), pct(values, 50) * 1e3, pct(values, 95) * 1e3, statistics.mean(values) * 1e3)
        out(f"| {name} | {row[0]} | {row[1]:.0f} | {row[2]:.0f} | {row[3]:.0f} |\n")
    ratio50, ratio95 = pct(busy, 50) / pct(idle, 50), pct(busy, 95) / pct(idle, 95)
    out(f"\nratio during/idle: p50 {ratio50:.2f}x, p95 {ratio95:.2f}x (target: within 2x)\n")


if __name__ == "__main__":
    main()
