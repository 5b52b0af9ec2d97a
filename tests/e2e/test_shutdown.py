"""A busy worker stopped with SIGTERM (Celery's warm shutdown) finishes the job it runs, on itself, with its
whole output, takes no new work meanwhile, and then leaves the registry (README: "Stopping a worker with
Ctrl-C or SIGTERM finishes its running job and removes it from the registry").

Scripted engine at a fixed speed, so that the signal lands mid-job; the API, Redis and the Celery worker
processes are real.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from engines.scripted import WORDS
from ops.redis_server import RedisServer
from queueing import keys
from queueing._codec import text
from tests.fleet import Fleet, write_catalog

pytestmark = pytest.mark.e2e

SPEED = 20  # tokens per second
TOKENS = 60  # 3 s of generation
WORKERS = ("s1", "s2")


def _fleet(tmp_path: Path, **env: str) -> Iterator[Fleet]:
    """Its own fleet of two scripted workers (one of them is stopped), with ``env`` for every process."""
    catalog = tmp_path / "models.yaml"
    write_catalog(catalog)
    server = RedisServer()
    f = Fleet(server.url, tmp_path, INFERQ_MODELS_FILE=str(catalog), **env)
    try:
        f.start_api()
        speed = {"INFERQ_SCRIPTED_TOKENS_PER_SECOND": str(SPEED)}
        for name in WORKERS:
            f.start_worker(name, "scripted", wait=False, args=["--engine", "scripted"], env=speed)
        for name in WORKERS:
            f.wait_listed(name)
        yield f
    finally:
        f.close()
        server.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield from _fleet(tmp_path)


def busy(r: redis.Redis, timeout: float = 15) -> tuple[str, str, str]:
    """The worker running the fleet's one job, the other worker, and the job's id."""
    deadline = time.monotonic() + timeout
    running = [n for n in WORKERS if r.scard(keys.worker_jobs_key(n))]
    while not running:
        assert time.monotonic() < deadline, "no worker started the job"
        time.sleep(0.02)
        running = [n for n in WORKERS if r.scard(keys.worker_jobs_key(n))]
    (victim,) = running
    (spare,) = set(WORKERS) - {victim}
    (job,) = (text(m) for m in r.smembers(keys.worker_jobs_key(victim)))
    return victim, spare, job


def stream(base_url: str, max_tokens: int, out: dict[str, object]) -> None:
    """A streamed chat request; ``out`` gets its job id, text, finish reason, an error event if one came,
    and whether the [DONE] sentinel came."""
    body = {
        "model": "scripted",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    parts: list[str] = []
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as resp:
        out["status"] = resp.status_code
        for raw in resp.iter_lines():
            if raw == "data: [DONE]":
                out["done"] = True
            elif raw.startswith("data: {"):
                chunk = json.loads(raw[6:])
                if "error" in chunk:  # the stream ended with an error event
                    out["error"] = chunk["error"]
                    continue
                out["job"] = chunk["id"]
                for choice in chunk["choices"]:
                    parts.append(choice["delta"].get("content") or "")
                    out["finish_reason"] = choice.get("finish_reason") or out.get("finish_reason")
    out["text"] = "".join(parts)


def test_sigterm_of_a_busy_worker_finishes_its_job_then_leaves(fleet: Fleet) -> None:
    r = redis.Redis.from_url(fleet.redis_url)
    try:
        got: dict[str, object] = {}
        client = threading.Thread(target=stream, args=(fleet.base_url, TOKENS, got))
        client.start()
        # The worker running the job, a second into its three.
        victim, spare, job = busy(r)
        time.sleep(1.0)
        proc = fleet.workers[victim]
        proc.send_signal(signal.SIGTERM)

        # While it finishes, it takes no new work: a request sent now is served by the other worker.
        time.sleep(0.3)
        body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        other = httpx.post(f"{fleet.base_url}/v1/chat/completions", json=body, timeout=30)
        assert other.status_code == 200, other.text
        assert other.headers["x-inferq-worker"] == spare

        client.join(timeout=30)
        assert not client.is_alive(), "the stream did not end"
        # The client got the whole output, to the sentinel.
        assert "error" not in got, got
        assert (got["status"], got["finish_reason"], got.get("done")) == (200, "length", True), got
        assert got["job"] == job and len(str(got["text"]).split()) == TOKENS, got
        # On the worker that was told to stop, as its first and only attempt.
        rec = {text(k): text(v) for k, v in r.hgetall(keys.job_key(job)).items()}
        assert (rec["state"], rec["attempt"], rec["worker"]) == ("done", "1", victim), rec
        assert rec["completion_tokens"] == str(TOKENS), rec

        # Then it exits, cleanly, and is gone from the registry at once (no wait for its heartbeat to lapse).
        assert proc.wait(timeout=20) == 0, fleet.log(victim)[-3000:]
        fleet.workers.pop(victim)
        assert not r.exists(keys.worker_key(victim))
        assert victim not in {text(m) for m in r.smembers(keys.WORKERS_SET)}
        listed = httpx.get(f"{fleet.base_url}/v1/system/workers", params={"stale": "true"}).json()["data"]
        assert [w["name"] for w in listed] == [spare]
        assert "Warm shutdown" in fleet.log(victim)
    finally:
        r.close()


DRAIN_GRACE = 1.0


@pytest.fixture
def draining(tmp_path: Path) -> Iterator[Fleet]:
    # Workers that, asked to stop, let a running job go on for DRAIN_GRACE seconds only.
    yield from _fleet(tmp_path, INFERQ_WORKER_DRAIN_GRACE=str(DRAIN_GRACE))


def test_sigterm_past_the_drain_grace_moves_a_stream_to_another_worker(draining: Fleet) -> None:
    tokens = 5 * SPEED  # 5 s of generation, more than the grace
    r = redis.Redis.from_url(draining.redis_url)
    try:
        got: dict[str, object] = {}
        client = threading.Thread(target=stream, args=(draining.base_url, tokens, got))
        client.start()
        victim, spare, job = busy(r)
        time.sleep(0.5)
        proc = draining.workers[victim]
        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        # The job moves once the grace is over: the spare worker runs its next attempt.
        while r.hget(keys.job_key(job), "worker") != spare.encode():
            assert time.monotonic() - stopped < DRAIN_GRACE + 3, r.hgetall(keys.job_key(job))
            time.sleep(0.05)
        assert proc.wait(timeout=20) == 0, draining.log(victim)[-3000:]
        draining.workers.pop(victim)

        client.join(timeout=30)
        assert not client.is_alive(), "the stream did not end"
        # One stream, whole: the spare worker went on where the stopped one was.
        assert "error" not in got, got
        assert (got["status"], got["finish_reason"], got.get("done")) == (200, "length", True), got
        assert got["text"] == "".join(" " + WORDS[i % len(WORDS)] for i in range(1, tokens + 1)), got
        rec = {text(k): text(v) for k, v in r.hgetall(keys.job_key(job)).items()}
        assert (rec["state"], rec["attempt"], rec["worker"]) == ("done", "2", spare), rec
        assert rec["completion_tokens"] == str(tokens), rec
    finally:
        r.close()
