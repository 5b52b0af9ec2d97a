"""Jobs giving their slot to requests of a higher class (batch lines to interactive ones, any class to a
higher one), against a real Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import redis

from engines.base import GenerationRequest, Output
from ops.redis_server import RedisServer
from queueing import keys
from queueing.bands import message_priority
from queueing.catalog import Catalog
from queueing.jobs import ChatMessage, Job, JobState, Priority
from queueing.jobstore import JobStore
from tests.queueing.test_jobstore import create
from workers.models import ModelManager
from workers.preempt import Preemption
from workers.runner import JobRunner


def batch_job(attempt: int = 1) -> Job:
    return Job(
        model="m", messages=[ChatMessage(role="user", content="hi")], priority="batch", attempt=attempt
    )


def interactive_waiting(
    client: redis.Redis, queue: str, n: int = 1, priority: Priority = "interactive"
) -> None:
    # What kombu pushes for a message of that class: the list of its step (high: the queue's own list;
    # interactive: "<queue>" + KOMBU_PRIORITY_SEP + "2"; batch lines: ... + "9").
    step = message_priority(Job(model="m", priority=priority))
    for _ in range(n):
        client.lpush(keys.queue_list_keys(queue)[step], b"{}")


def test_one_waiting_request_makes_one_worker_yield(redis_client: redis.Redis) -> None:
    a, b = Preemption(redis_client, "a", slots=1), Preemption(redis_client, "b", slots=1)
    assert not a.wanted(batch_job(), ["m"], busy=1)  # nothing waits
    interactive_waiting(redis_client, keys.model_queue("m"))
    assert a.wanted(batch_job(), ["m"], busy=1)
    assert not b.wanted(batch_job(), ["m"], busy=1), "a already yields for the one waiting request"
    interactive_waiting(redis_client, keys.model_queue("m"))
    assert b.wanted(batch_job(), ["m"], busy=1), "two waiting, two yield"


def test_only_full_workers_yield_and_only_to_a_higher_class(redis_client: redis.Redis) -> None:
    p = Preemption(redis_client, "a", slots=2)
    interactive_waiting(redis_client, keys.model_queue("m"))
    assert not p.wanted(batch_job(), ["m"], busy=1), "a free slot takes the request without yielding"
    as_class = {c: batch_job().model_copy(update={"priority": c}) for c in ("high", "interactive", "low")}
    assert not p.wanted(as_class["interactive"], ["m"], busy=2), "the same class waits its turn"
    interactive_waiting(redis_client, keys.model_queue("m"), priority="high")
    assert p.wanted(as_class["interactive"], ["m"], busy=2)
    # Two requests above a low job wait, one of them yielded for already: one more job yields.
    assert p.wanted(as_class["low"], ["m"], busy=2)
    assert not p.wanted(as_class["high"], ["m"], busy=2), "nothing is above high"
    assert not p.wanted(batch_job(attempt=4), ["m"], busy=2), "a line yields at most three times"
    assert not p.wanted(batch_job(), ["other"], busy=2), "a request for a model not loaded here"
    assert not p.wanted(batch_job(), ["m"], busy=2), "both waiting requests have a job yielding for them"
    interactive_waiting(redis_client, keys.model_queue("m"))
    assert p.wanted(batch_job(), ["m"], busy=2)


def test_a_yield_stands_for_a_waiting_request_until_its_slot_took_a_message(
    redis_client: redis.Redis,
) -> None:
    a = Preemption(redis_client, "a", slots=1, hold_ms=60_000)
    b = Preemption(redis_client, "b", slots=1, hold_ms=60_000)
    first, second = batch_job(), batch_job()
    interactive_waiting(redis_client, keys.model_queue("m"))
    assert a.wanted(first, ["m"], busy=1)
    assert not b.wanted(second, ["m"], busy=1), "a yields for it already"
    # a's slot is free but has not taken the request yet (it still waits in its list): b must not yield for
    # it too (tests/e2e/test_preemption.py saw both batch lines yield for one request).
    a.settled(first)
    assert not b.wanted(second, ["m"], busy=1)
    # a's slot took it; the next request to come finds b yielding for it at once, not after the hold.
    step = message_priority(Job(model="m", priority="interactive"))
    assert redis_client.rpop(keys.queue_list_keys(keys.model_queue("m"))[step]) is not None
    a.refilled()
    interactive_waiting(redis_client, keys.model_queue("m"))
    assert b.wanted(second, ["m"], busy=1)
    a.settled(first)  # twice: nothing more
    a.refilled()
    assert redis_client.get(keys.preempt_key("m")) == b"1"


def test_own_queue_requests_always_win(redis_client: redis.Redis) -> None:
    a, b = Preemption(redis_client, "a", slots=1), Preemption(redis_client, "b", slots=1)
    interactive_waiting(redis_client, keys.worker_queue("a"))
    assert not b.wanted(batch_job(), ["m"], busy=1), "routed to a, so only a can serve it"
    assert a.wanted(batch_job(), ["m"], busy=1) and a.wanted(batch_job(), ["m"], busy=1)


class SlowEngine:
    """Yields a token every 10 ms until aborted; records what it was asked to abort."""

    name = "slow"

    def __init__(self) -> None:
        self.aborted: set[str] = set()

    def generate(self, request: GenerationRequest) -> Iterator[Output]:
        yield Output(prompt_tokens=3)
        for i in range(1, 500):
            if request.request_id in self.aborted:
                yield Output(prompt_tokens=3, completion_tokens=i, finish_reason="cancelled")
                return
            time.sleep(0.01)
            yield Output(text="x", prompt_tokens=3, completion_tokens=i)
        yield Output(prompt_tokens=3, completion_tokens=500, finish_reason="length")

    def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    def health(self) -> bool:
        return True

    def close(self) -> None: ...


def one_slot_runner(
    server: RedisServer, client: redis.Redis, engine: SlowEngine, job: Job | None = None
) -> tuple[JobRunner, Job]:
    """A runner with one slot serving ``engine`` as model m, and a job recorded for it (a batch line unless
    given)."""
    models = ModelManager(Catalog(models={}))
    models.adopt("m", engine)
    runner = JobRunner("w", client, models, preemption=Preemption(client, "w", slots=1))
    job = job or batch_job()
    create(server.url, job)
    return runner, job


def test_running_batch_line_yields_and_is_queued_as_its_next_attempt(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    engine = SlowEngine()
    runner, job = one_slot_runner(redis_server, redis_client, engine)
    result: list[Job | None] = []
    thread = threading.Thread(target=lambda: result.append(runner.run(job)))
    thread.start()
    time.sleep(0.3)  # well into its 5 s of generation
    interactive_waiting(redis_client, keys.model_queue("m"))
    thread.join(timeout=2)
    assert not thread.is_alive(), "the batch line did not give its slot up"
    assert job.id in engine.aborted
    (again,) = result
    assert again is not None and again.attempt == 2 and again.priority == "batch"
    store = JobStore(redis_client)
    assert store.state(job.id) == JobState.QUEUED and store.running_on("w") == []
    assert runner.stats.snapshot().in_flight == 0 and runner.stats.snapshot().failed == 0
    assert not store.claim(job, "w"), "the old attempt's message is stale now"
    assert store.claim(again, "w")


class DeafEngine(SlowEngine):
    """Ignores aborts: its generation ends on its own after a few tokens."""

    def generate(self, request: GenerationRequest) -> Iterator[Output]:
        yield Output(prompt_tokens=3)
        for i in range(1, 11):
            time.sleep(0.02)
            yield Output(text="x", prompt_tokens=3, completion_tokens=i)
        yield Output(prompt_tokens=3, completion_tokens=10, finish_reason="length")


def test_a_line_that_ends_before_the_abort_lands_is_finished_not_rerun(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    engine = DeafEngine()
    runner, job = one_slot_runner(redis_server, redis_client, engine)
    interactive_waiting(redis_client, keys.model_queue("m"))
    assert runner.run(job) is None
    assert job.id in engine.aborted, "it was asked to yield"
    assert JobStore(redis_client).state(job.id) == JobState.DONE
    assert runner.stats.snapshot().completed == 1


def test_a_stream_of_a_key_over_its_share_yields_to_its_class_even_after_its_first_token(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """A key within its share waits for no stream of a key over it (queueing/bands.py); a stream of a key
    within its share keeps its slot once it started, as before."""
    for over, expect_yield in ((True, True), (False, False)):
        redis_client.flushall()
        engine = SlowEngine()
        job = batch_job().model_copy(
            update={"priority": "interactive", "stream": True, "share": "over" if over else "within"}
        )
        runner, job = one_slot_runner(redis_server, redis_client, engine, job)
        result: list[Job | None] = []
        thread = threading.Thread(target=lambda: result.append(runner.run(job)))  # noqa: B023
        thread.start()
        time.sleep(0.3)  # tokens are flowing
        interactive_waiting(redis_client, keys.model_queue("m"))  # a normal request within its share
        thread.join(timeout=1)
        if not expect_yield:
            assert thread.is_alive() and job.id not in engine.aborted, "a started stream within its share"
            engine.abort(job.id)
            thread.join(timeout=2)
            assert result == [None]
            continue
        assert not thread.is_alive() and job.id in engine.aborted, "the over-share stream kept its slot"
        (again,) = result
        assert again is not None and again.attempt == 2 and again.share == "over"
