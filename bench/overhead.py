"""What inferq costs on top of the engine: llama.cpp alone versus the same generations through the API.

Phase 1 runs ``smollm2-135m`` in this process through ``engines.llamacpp.LlamaCppEngine``. Phase 2 starts a
private Redis, one ``inferq worker`` and the ``inferq api``, and streams the same chat prompts from
``POST /v1/chat/completions`` and from ``POST /v1/responses`` (interleaved, prompt by prompt), read as plain
SSE over one keep-alive connection (``--sdk``: chat through the ``openai`` SDK, whose per-chunk parsing then
shares the 2 cores with llama.cpp). Generations are greedy, with
``ignore_eos`` and a fixed ``max_tokens``. TTFT runs from the call (or the request being sent) to the first
non-empty text; decode tok/s is (completion_tokens - 1) / (last text - first text). The peak RSS of the API
and of the worker is sampled through phase 2. Targets: decode ratio >= 0.95, TTFT p50 delta <= +10 ms, API
RSS < 200 MiB.

Run from the repository root:

    .venv/bin/python bench/overhead.py [--rounds N] [--max-tokens N] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import openai
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engines.base import GenerationRequest  # noqa: E402
from engines.llamacpp import LlamaCppEngine  # noqa: E402
from ops.redis_server import RedisServer, free_port  # noqa: E402
from queueing.catalog import get_catalog  # noqa: E402

MODEL = "smollm2-135m"
WORKER_NAME = "bench"
STARTUP_TIMEOUT = 60.0
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "List three tips for learning a new language.",
    "Describe a sunrise over the mountains.",
    "What are the benefits of regular exercise?",
]


@dataclass
class Sample:
    ttft_ms: float
    decode_tps: float


def measure(steps: Iterator[tuple[str, int]]) -> Sample:
    """Times one lazily started generation, given as (text, completion tokens so far) per step."""
    first = last = None
    tokens = 0
    start = time.perf_counter()
    for text, produced in steps:
        if text:
            last = time.perf_counter()
            first = last if first is None else first
        tokens = max(tokens, produced)
    if first is None or last is None or last <= first or tokens < 2:
        raise RuntimeError(f"generation produced too little text to time ({tokens} tokens)")
    return Sample(ttft_ms=1000 * (first - start), decode_tps=(tokens - 1) / (last - first))


def run_engine(threads: int, max_tokens: int, rounds: int) -> list[Sample]:
    spec = get_catalog().get(MODEL)
    assert spec is not None, f"{MODEL} is not in the catalog"
    engine = LlamaCppEngine(spec.sources["llamacpp"].resolve(), n_ctx=spec.context_length, n_threads=threads)
    try:
        samples = []
        for i, prompt in enumerate([PROMPTS[0], *PROMPTS * rounds]):  # the first one is the warm-up
            request = GenerationRequest(
                f"bench-{i}",
                [{"role": "user", "content": prompt}],
                max_tokens,
                temperature=0.0,
                seed=0,
                ignore_eos=True,
            )
            samples.append(measure((o.text, o.completion_tokens) for o in engine.generate(request)))
        return samples[1:]
    finally:
        engine.close()
        del engine  # frees the model's memory and threads before phase 2


def raw_sse_steps(client: httpx.Client, prompt: str, max_tokens: int) -> Iterator[tuple[str, int]]:
    """The stream read as plain SSE lines: measures the service, not the client library's parsing."""
    payload = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "temperature": 0.0,
        "seed": 0,
        "max_tokens": max_tokens,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    with client.stream("POST", "/v1/chat/completions", json=payload) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            text = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            yield text or "", (chunk.get("usage") or {}).get("completion_tokens", 0)


def raw_responses_steps(client: httpx.Client, prompt: str, max_tokens: int) -> Iterator[tuple[str, int]]:
    """The same generation through ``POST /v1/responses`` (semantic events), read as plain SSE lines."""
    payload = {
        "model": MODEL,
        "input": prompt,
        "stream": True,
        "store": False,
        "temperature": 0.0,
        "seed": 0,
        "max_output_tokens": max_tokens,
        "ignore_eos": True,
    }
    with client.stream("POST", "/v1/responses", json=payload) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["type"] == "response.output_text.delta":
                yield event["delta"], 0
            elif event["type"] in ("response.completed", "response.incomplete"):
                yield "", event["response"]["usage"]["output_tokens"]


def sse_steps(client: openai.OpenAI, prompt: str, max_tokens: int) -> Iterator[tuple[str, int]]:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        temperature=0.0,
        seed=0,
        max_tokens=max_tokens,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        text = chunk.choices[0].delta.content if chunk.choices else None
        yield text or "", chunk.usage.completion_tokens if chunk.usage else 0


def watch_rss(pids: dict[str, int], peak: dict[str, int], done: threading.Event) -> None:
    """Keeps in ``peak`` the largest RSS seen of each process, its children included."""
    procs = {name: psutil.Process(pid) for name, pid in pids.items()}
    while not done.wait(0.05):
        for name, proc in procs.items():
            with contextlib.suppress(psutil.Error):
                rss = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
                peak[name] = max(peak.get(name, 0), rss)


def wait_healthy(base: str, procs: dict[str, subprocess.Popen[bytes]], log: IO[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not (dead := [n for n, p in procs.items() if p.poll() is not None]) and time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            r = httpx.get(f"{base}/v1/system/health", timeout=2.0)
            if r.status_code == 200 and WORKER_NAME in r.json().get("workers", []):
                return
        time.sleep(0.25)
    log.seek(0)
    problem = f"{dead[0]} exited" if dead else f"{WORKER_NAME!r} not healthy after {STARTUP_TIMEOUT:.0f}s"
    raise RuntimeError(f"{problem}; output of worker and api:\n{log.read()[-3000:].decode(errors='replace')}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    proc.kill()  # a no-op once it has exited
    proc.wait()


def run_inferq(
    threads: int, max_tokens: int, rounds: int, sdk: bool
) -> tuple[dict[str, list[Sample]], dict[str, int]]:
    with contextlib.ExitStack() as stack:  # unwinds in reverse: client, RSS watcher, api, worker, log, Redis
        server = RedisServer()
        stack.callback(server.stop)
        port = free_port()
        env = {
            **os.environ,
            "INFERQ_REDIS_URL": server.url,
            "INFERQ_LLAMACPP_THREADS": str(threads),
            "INFERQ_LOG_LEVEL": "WARNING",
        }
        commands = {"worker": ["--models", MODEL, "--name", WORKER_NAME], "api": ["--port", str(port)]}
        log = stack.enter_context(tempfile.TemporaryFile())  # both processes' output, shown if one dies
        procs: dict[str, subprocess.Popen[bytes]] = {}
        for name, args in commands.items():
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "ops.cli", name, *args],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            stack.callback(stop, procs[name])
        peak: dict[str, int] = {}
        done = threading.Event()
        watcher = threading.Thread(target=watch_rss, args=({n: p.pid for n, p in procs.items()}, peak, done))
        watcher.start()
        stack.callback(watcher.join)
        stack.callback(done.set)
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, procs, log)
        paths: dict[str, Callable[[str], Iterator[tuple[str, int]]]] = {}
        raw = stack.enter_context(httpx.Client(base_url=base, timeout=120))
        if sdk:
            client = stack.enter_context(openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0))
            paths["chat completions"] = functools.partial(sse_steps, client, max_tokens=max_tokens)
        else:
            paths["chat completions"] = functools.partial(raw_sse_steps, raw, max_tokens=max_tokens)
        paths["responses"] = functools.partial(raw_responses_steps, raw, max_tokens=max_tokens)
        samples: dict[str, list[Sample]] = {name: [] for name in paths}
        for steps in paths.values():
            measure(steps(PROMPTS[0]))  # warm-up
        # Interleaved, so that both protocols meet the same machine state.
        for p in PROMPTS * rounds:
            for name, steps in paths.items():
                samples[name].append(measure(steps(p)))
        return samples, dict(peak)


def table(engine: list[Sample], inferq: dict[str, list[Sample]], rss: dict[str, int]) -> str:
    columns = ("decode tok/s p50", "decode tok/s mean", "TTFT p50 ms", "TTFT p99 ms")
    header = f"{'':<34}" + "".join(f"{c:>19}" for c in columns)
    lines = [header, "-" * len(header)]
    rows = [("engine alone (in-process)", engine), *((f"inferq SSE: {n}", s) for n, s in inferq.items())]
    for label, samples in rows:
        tps, ttft = [s.decode_tps for s in samples], [s.ttft_ms for s in samples]
        p99 = sorted(ttft)[math.ceil(0.99 * len(ttft)) - 1]  # nearest rank
        values = (statistics.median(tps), statistics.mean(tps), statistics.median(ttft), p99)
        lines.append(f"{label:<34}" + "".join(f"{v:>19.1f}" for v in values))
    checks = []
    for name, samples in inferq.items():
        ratio = statistics.mean(s.decode_tps for s in samples) / statistics.mean(s.decode_tps for s in engine)
        delta = statistics.median(s.ttft_ms for s in samples) - statistics.median(s.ttft_ms for s in engine)
        checks += [
            (f"decode ratio {name}/engine (mean)", f"{ratio:.3f}", ratio >= 0.95, ">= 0.95"),
            (f"TTFT p50 delta, {name}", f"{delta:+.1f} ms", delta <= 10.0, "<= +10 ms"),
        ]
    api_mib, worker_mib = rss["api"] / 2**20, rss["worker"] / 2**20
    checks.append(("API RSS (peak)", f"{api_mib:.1f} MiB", api_mib < 200.0, "< 200 MiB"))
    out = [f"{n:<46}{v:>14}   {'PASS' if ok else 'FAIL'} (target {t})" for n, v, ok, t in checks]
    return "\n".join([*lines, "", *out, f"{'worker RSS (peak)':<46}{worker_mib:>10.1f} MiB"])


def main() -> None:
    parser = argparse.ArgumentParser(description="inferq overhead over llama.cpp alone")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the prompts (default 3)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per generation (default 128)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads")
    parser.add_argument(
        "--sdk", action="store_true", help="read streams with the openai SDK (its parsing shares the CPU)"
    )
    args = parser.parse_args()
    if args.rounds < 1 or args.max_tokens < 2 or args.threads < 1:
        parser.error("--rounds and --threads must be >= 1, --max-tokens >= 2")
    # SIGTERM unwinds like Ctrl-C, so the cleanup of whatever this script started runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    engine = run_engine(args.threads, args.max_tokens, args.rounds)
    inferq, rss = run_inferq(args.threads, args.max_tokens, args.rounds, args.sdk)
    sys.stdout.write(
        f"{MODEL}: {len(PROMPTS)} prompts x {args.rounds} rounds, max_tokens={args.max_tokens}, "
        f"threads={args.threads}, client={'openai SDK' if args.sdk else 'httpx SSE'}\n\n"
        f"{table(engine, inferq, rss)}\n"
    )


if __name__ == "__main__":
    main()
