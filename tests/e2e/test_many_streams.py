"""1,000 concurrent streams on one API process: none fails, and the process's memory returns afterwards.

Scripted workers carry the load (what is measured is the API's cost per stream, not an engine's); enough of
them, with enough slots, that every stream runs at once. Each stream is 80 tokens at 4 tokens/s, so all
1,000 are open together (opening them takes ~10 s on a loaded 2-core machine; the client checks that they
were all open at once). The API's resident memory is read
after a warm-up (the baseline: imports, pools and caches in place), at its peak, and then until it is back
within 20% of the baseline, for at most a minute.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from ops.redis_server import RedisServer
from tests.fleet import Fleet, rss_bytes, write_catalog

pytestmark = pytest.mark.e2e

STREAMS = 1000
TOKENS = 80
WORKERS = 4
SLOTS = 256  # per worker: 1,024 in all, so no stream waits for a slot
RSS_MARGIN = 0.20
RECOVER_WITHIN = 60.0
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    server = RedisServer()
    tmp = tmp_path_factory.mktemp("many-streams")
    catalog = tmp / "models.yaml"
    write_catalog(catalog)
    # What this test measures is one API process holding 1,000 streams, not the workers' liveness nor the
    # outage bound (tests/e2e/test_redis_outage.py). Here the API, Redis, four workers and the 1,000-stream
    # client share 2 cores: a worker running 256 streams missed a 2 s heartbeat TTL (its heartbeat thread
    # starved of the GIL; 259 of 1,000 streams ended worker_lost), and in a full `make test` run a 4 s one
    # too (132), with 28 Redis reads over the API's 0.5 s timeout. So: a 10 s TTL, and a 2 s API timeout.
    f = Fleet(
        server.url,
        tmp,
        INFERQ_MODELS_FILE=str(catalog),
        INFERQ_REQUEST_TIMEOUT="120",
        INFERQ_HEARTBEAT_INTERVAL="1",
        INFERQ_HEARTBEAT_TTL="10",
        INFERQ_API_REDIS_TIMEOUT="2",
    )
    try:
        f.start_api()
        env = {"INFERQ_SCRIPTED_TOKENS_PER_SECOND": "4"}
        names = [f"s{i}" for i in range(1, WORKERS + 1)]
        for name in names:
            args = ["--engine", "scripted", "--concurrency", str(SLOTS)]
            f.start_worker(name, "scripted", wait=False, args=args, env=env)
        for name in names:
            f.wait_listed(name)
        yield f
    finally:
        f.close()
        server.stop()


@dataclass
class Tally:
    # Requests sent and not yet ended (the API holds them all), and of those the streams whose response
    # started (a worker took the job and the first event came).
    in_flight: int = 0
    most_in_flight: int = 0
    open_now: int = 0
    most_open: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def failed(self, why: str) -> None:
        self.errors[why[:160]] += 1


async def one_stream(client: httpx.AsyncClient, tally: Tally) -> None:
    body = {
        "model": "scripted",
        "messages": [{"role": "user", "content": "Count."}],
        "max_tokens": TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, done, usage = "", False, None
    tally.in_flight += 1
    tally.most_in_flight = max(tally.most_in_flight, tally.in_flight)
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                tally.failed(f"{r.status_code} {(await r.aread())[:120]!r}")
                return
            tally.open_now += 1
            tally.most_open = max(tally.most_open, tally.open_now)
            try:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        done = True
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        tally.failed(f"error event {chunk['error'].get('code')}")
                        return
                    for choice in chunk.get("choices", []):
                        text += choice.get("delta", {}).get("content") or ""
                    usage = chunk.get("usage") or usage
            finally:
                tally.open_now -= 1
    except httpx.HTTPError as exc:
        tally.failed(repr(exc))
        return
    finally:
        tally.in_flight -= 1
    if not done:
        tally.failed("no [DONE]")
    elif len(text.split()) != TOKENS or not usage or usage["completion_tokens"] != TOKENS:
        # The scripted engine's tokens are one word each: a word more is text sent twice.
        tally.failed(f"{len(text.split())} words, usage {usage}")
    else:
        tally.ok += 1


async def run_streams(base_url: str, n: int) -> tuple[Tally, float]:
    limits = httpx.Limits(max_connections=n + 16, max_keepalive_connections=n + 16)
    timeout = httpx.Timeout(120.0, connect=30.0)
    tally = Tally()
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:
        tasks = [asyncio.create_task(one_stream(client, tally)) for _ in range(n)]
        await asyncio.gather(*tasks)
    return tally, time.monotonic() - t0


@dataclass
class Load:
    tally: Tally
    took: float
    baseline: int
    peak: int
    ended: float


@pytest.fixture(scope="module")
def load(fleet: Fleet) -> Load:
    """One burst of ``STREAMS`` streams, after a warm-up; the API's RSS before (baseline) and at its peak."""
    assert fleet.api is not None
    pid = fleet.api.pid
    # Warm-up: the first streams pay for imports, pools and caches; the baseline is the process after that.
    warm, _ = asyncio.run(run_streams(fleet.base_url, 50))
    assert warm.ok == 50, warm.errors
    time.sleep(1.0)
    baseline = rss_bytes(pid)
    peak = baseline
    sampling = True

    async def sample_rss() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, rss_bytes(pid))
            await asyncio.sleep(0.2)

    async def burst() -> tuple[Tally, float]:
        nonlocal sampling
        sampler = asyncio.create_task(sample_rss())
        try:
            return await run_streams(fleet.base_url, STREAMS)
        finally:
            sampling = False
            await sampler

    tally, took = asyncio.run(burst())
    return Load(tally, took, baseline, peak, time.monotonic())


def test_1000_concurrent_streams_on_one_api_process_all_complete(fleet: Fleet, load: Load) -> None:
    tally = load.tally
    figures = (
        f"{STREAMS} streams x {TOKENS} tokens in {load.took:.1f} s, {tally.ok} complete, "
        f"most in flight at once {tally.most_in_flight}, most streaming at once {tally.most_open}, "
        f"errors {sum(tally.errors.values())} {dict(tally.errors.most_common(5))}"
    )
    print(f"\n{figures}")  # noqa: T201 (the figures, shown with -s)
    assert not tally.errors, figures
    assert tally.ok == STREAMS, figures
    # All of them held by the API together, not a thousand streams one after another. Hundreds also stream
    # together; how many depends on how fast four workers on the same two cores start 1,000 jobs, which
    # is the workers' pace, not the API's: measured 764-1,000 streaming at once on an idle machine, 669 in
    # CI, 304 while a package install took a core.
    assert tally.most_in_flight == STREAMS, figures
    assert tally.most_open >= STREAMS // 4, figures
    assert fleet.api is not None and fleet.api.poll() is None, "the API process died"


# Measured at 3c8ef28 on this 2-core VM (baseline -> a minute after): alone 90.8 -> 103.3 MiB; with one core
# kept busy by another process 90.7 -> 102.4 and 90.8 -> 102.8 (bound +20%: 109 MiB). The one full-suite
# reading above the bound (88.8 -> 113.0, stop 19) came from a run in which this burst itself failed 185
# streams, at a commit since reverted (034b562).
def test_api_memory_returns_within_20_percent_of_baseline_a_minute_after(fleet: Fleet, load: Load) -> None:
    assert fleet.api is not None
    bound = load.baseline * (1 + RSS_MARGIN)
    after = rss_bytes(fleet.api.pid)
    while after > bound and time.monotonic() - load.ended < RECOVER_WITHIN:
        time.sleep(1.0)
        after = rss_bytes(fleet.api.pid)
    settled = time.monotonic() - load.ended
    figures = (
        f"API RSS baseline {load.baseline / MiB:.1f} MiB, peak {load.peak / MiB:.1f} MiB, "
        f"after {after / MiB:.1f} MiB ({settled:.0f} s after the load; bound {bound / MiB:.1f} MiB)"
    )
    print(f"\n{figures}")  # noqa: T201 (the figures, shown with -s)
    assert after <= bound, figures
