"""Batch preemption end to end: batch lines fill every slot of a real worker, an interactive request arrives
through the API, Redis and Celery. With ``INFERQ_BATCH_PREEMPT`` on, one line gives its slot up and the
request starts at once; with it off, the same request waits for a line to end. Either way every line is
answered once, in full.

Scripted engine (fixed speed, no CPU of its own): what is timed here is the scheduling, which a real model's
noise on two shared cores would blur; everything else (API, Redis, Celery worker, batch driver) is real.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from ops.redis_server import RedisServer
from queueing import keys
from queueing._codec import text
from tests.fleet import Fleet

pytestmark = pytest.mark.e2e

CATALOG = """
models:
  scripted-on:
    context_length: 4096
    sources:
      scripted: {path: %(path)s}
  scripted-off:
    context_length: 4096
    sources:
      scripted: {path: %(path)s}
"""
SLOTS = 2
SPEED = 20  # tokens per second
LINE_TOKENS = 120  # 6 s per batch line
LINE_SECONDS = LINE_TOKENS / SPEED
# Preempted, the request starts within one preempt poll (50 ms), one scripted token (50 ms) and a Celery
# fetch; the bound leaves room for a loaded 2-core machine and is a third of what a line still has left.
STARTS_WITHIN = 2.0
# One worker per setting, each with its own model so that a request reaches the one under test.
WORKERS = {"on": ("scripted-on", "true"), "off": ("scripted-off", "false")}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("preempt")
    catalog = tmp / "models.yaml"
    catalog.write_text(CATALOG % {"path": catalog})
    server = RedisServer()
    f = Fleet(server.url, tmp, INFERQ_MODELS_FILE=str(catalog))
    try:
        f.start_api()
        for name, (model, preempt) in WORKERS.items():
            env = {"INFERQ_SCRIPTED_TOKENS_PER_SECOND": str(SPEED), "INFERQ_BATCH_PREEMPT": preempt}
            args = ["--engine", "scripted", "--concurrency", str(SLOTS)]
            f.start_worker(name, model, wait=False, args=args, env=env)
        for name in WORKERS:
            f.wait_listed(name)
        yield f
    finally:
        f.close()
        server.stop()


def record(r: redis.Redis, job: str) -> dict[str, str]:
    return {text(k): text(v) for k, v in r.hgetall(keys.job_key(job)).items()}


def submit_batch(http: httpx.Client, model: str, lines: int) -> str:
    rows = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": f"line {i}"}],
                "max_tokens": LINE_TOKENS,
            },
        }
        for i in range(lines)
    ]
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    up = http.post("/v1/files", files={"file": ("lines.jsonl", data)}, data={"purpose": "batch"})
    assert up.status_code == 200, up.text
    body = {"input_file_id": up.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    created = http.post("/v1/batches", json=body)
    assert created.status_code == 200, created.text
    return str(created.json()["id"])


def wait_batch(http: httpx.Client, batch_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        batch: dict[str, Any] = http.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in ("completed", "failed", "cancelled", "expired"):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch['status']}: {batch['request_counts']}"
        time.sleep(0.2)


def completed(http: httpx.Client, worker: str) -> int:
    workers = {w["name"]: w for w in http.get("/v1/system/workers").json()["data"]}
    return int(workers[worker]["completed"])


@dataclass
class Interactive:
    job: str
    ttft: float  # seconds from sending the request to its first text
    text: str
    finish_reason: str


def stream_chat(http: httpx.Client, model: str, max_tokens: int) -> Interactive:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    sent = time.monotonic()
    ttft, job, parts, finish = None, "", [], ""
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, resp.read()
        for raw in resp.iter_lines():
            if not raw.startswith("data: {"):
                continue
            chunk = json.loads(raw[6:])
            job = chunk["id"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    ttft = ttft if ttft is not None else time.monotonic() - sent
                    parts.append(choice["delta"]["content"])
                finish = choice.get("finish_reason") or finish
    assert ttft is not None, "no text came back"
    return Interactive(job, ttft, "".join(parts), finish)


@pytest.mark.parametrize("setting", ["on", "off"])
def test_interactive_request_takes_a_batch_lines_slot(fleet: Fleet, setting: str) -> None:
    worker = setting
    model, _ = WORKERS[worker]
    with (
        httpx.Client(base_url=fleet.base_url, timeout=60) as http,
        redis.Redis.from_url(fleet.redis_url) as r,
    ):
        before, yielded_before = completed(http, worker), fleet.log(worker).count("yielded its slot")
        batch_id = submit_batch(http, model, SLOTS)
        # Both lines running: every slot of the worker holds a batch line.
        deadline = time.monotonic() + 15
        while r.scard(keys.worker_jobs_key(worker)) < SLOTS:
            assert time.monotonic() < deadline, "the batch lines did not start"
            time.sleep(0.02)
        lines = sorted(text(m) for m in r.smembers(keys.worker_jobs_key(worker)))
        first_started = min(float(record(r, job)["started_at"]) for job in lines)

        sent_at = time.time()
        asked = stream_chat(http, model, max_tokens=5)
        # The seconds the lines still had to run when the request was sent.
        left = LINE_SECONDS - (sent_at - first_started)
        assert left > STARTS_WITHIN + 1.0, f"the request came too late to tell ({left:.2f}s left)"
        assert (asked.finish_reason, len(asked.text.split())) == ("length", 5), asked
        served = record(r, asked.job)
        assert (served["worker"], served["attempt"], served["state"]) == (worker, "1", "done"), served

        batch = wait_batch(http, batch_id, timeout=4 * LINE_SECONDS + 30)
        assert batch["status"] == "completed", batch
        assert batch["request_counts"] == {"total": SLOTS, "completed": SLOTS, "failed": 0}, batch
        out = [
            json.loads(x) for x in http.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines()
        ]
        # Every line answered exactly once, in full, by its last attempt.
        assert sorted(row["custom_id"] for row in out) == [f"line-{i}" for i in range(SLOTS)], out
        for row in out:
            body = row["response"]["body"]
            assert body["usage"]["completion_tokens"] == LINE_TOKENS, body
            assert len(body["choices"][0]["message"]["content"].split()) == LINE_TOKENS
        attempts = sorted(int(record(r, row["response"]["body"]["id"])["attempt"]) for row in out)
        yields = fleet.log(worker).count("yielded its slot") - yielded_before
        time.sleep(1.0)  # the worker's counters reach the registry with its next heartbeat
        # Each line and the request completed once: a yielded attempt is not a completion, and nothing ran
        # twice to its end.
        assert completed(http, worker) - before == SLOTS + 1

    if setting == "on":
        # The request started well before either line could have ended: one line gave its slot up, ran
        # again as its second attempt, and finished whole.
        assert asked.ttft <= STARTS_WITHIN, f"waited {asked.ttft:.2f}s with {left:.2f}s of lines left"
        assert attempts == [1, 2] and yields == 1, (attempts, yields)
    else:
        # Without preemption the same request waits for a line to end: the bound above means something.
        assert asked.ttft >= left - 0.5, f"started after {asked.ttft:.2f}s with {left:.2f}s of lines left"
        assert attempts == [1, 1] and yields == 0, (attempts, yields)
