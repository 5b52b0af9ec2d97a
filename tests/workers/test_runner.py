"""The job runner against a real Redis with an in-test engine: what it publishes and records."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator

import redis
import redis.asyncio as aredis

from engines.base import (
    ContextLengthExceeded,
    Embeddings,
    GenerationRequest,
    Output,
    TokenLogprob,
    UnsupportedRequest,
)
from ops.redis_server import RedisServer
from queueing import eventlog, events, keys
from queueing.catalog import Catalog
from queueing.jobs import ChatMessage, Job, JobState, Sampling
from queueing.jobstore import AsyncJobStore, JobStore
from workers.models import ModelManager
from workers.runner import JobRunner


class ListEngine:
    name = "list"

    def __init__(self, pieces: list[str], error: Exception | None = None) -> None:
        self.pieces, self.error = pieces, error
        # The request id of every generation started, so a test can tell whether a job reached the engine.
        self.calls: list[str] = []

    def generate(self, request: GenerationRequest) -> Iterator[Output]:
        self.calls.append(request.request_id)
        if self.error:
            raise self.error
        yield Output(prompt_tokens=3)
        for i, p in enumerate(self.pieces, 1):
            yield Output(text=p, prompt_tokens=3, completion_tokens=i)
        yield Output(prompt_tokens=3, completion_tokens=len(self.pieces), finish_reason="length")

    def abort(self, request_id: str) -> None: ...
    def health(self) -> bool:
        return True

    def close(self) -> None: ...


def runner_with(client: redis.Redis, engine: ListEngine) -> JobRunner:
    models = ModelManager(Catalog(models={}))
    models.adopt("m", engine)
    return JobRunner("w", client, models)


def run_and_listen(url: str, runner: JobRunner, job: Job) -> list[events.Event]:
    async def go() -> list[events.Event]:
        a = aredis.Redis.from_url(url)
        await AsyncJobStore(a, ttl=60).create(job)
        pubsub = a.pubsub()
        await pubsub.subscribe(keys.stream_channel(job.id))
        await pubsub.get_message(timeout=1)  # the subscribe confirmation
        worker = threading.Thread(target=runner.run, args=(job,))
        worker.start()
        got: list[events.Event] = []
        while not got or got[-1].type not in ("finished", "error"):
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            assert msg is not None, got
            got.append(events.decode(eventlog.split(msg["data"])[1]))
        worker.join()
        await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis-py 8
        await a.aclose()
        return got

    return asyncio.run(go())


def job(stream: bool) -> Job:
    return Job(
        model="m",
        messages=[ChatMessage(role="user", content="x")],
        sampling=Sampling(max_tokens=2, temperature=0, top_p=1),
        stream=stream,
    )


def test_stream_job_publishes_started_deltas_finished(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    j = job(stream=True)
    got = run_and_listen(redis_server.url, runner_with(redis_client, ListEngine(["a", "b"])), j)
    assert [e.type for e in got] == ["started", "delta", "delta", "finished"]
    assert "".join(e.text for e in got if isinstance(e, events.Delta)) == "ab"
    assert isinstance(got[-1], events.Finished) and got[-1].text is None and got[-1].completion_tokens == 2
    record = redis_client.hgetall(keys.job_key(j.id))
    assert record[b"state"] == b"done" and record[b"text"] == b"ab" and record[b"worker"] == b"w"


def test_non_stream_job_sends_the_text_once(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    got = run_and_listen(
        redis_server.url, runner_with(redis_client, ListEngine(["a", "b"])), job(stream=False)
    )
    assert [e.type for e in got] == ["started", "finished"]
    assert isinstance(got[-1], events.Finished) and got[-1].text == "ab"


def test_engine_errors_become_failed_events(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    j = job(stream=True)
    engine = ListEngine([], error=ContextLengthExceeded(900, 512))
    got = run_and_listen(redis_server.url, runner_with(redis_client, engine), j)
    assert isinstance(got[-1], events.Failed)
    assert got[-1].code == "context_length_exceeded"
    assert JobStore(redis_client).state(j.id) == JobState.FAILED


def published_while(client: redis.Redis, job_id: str, action: Callable[[], object]) -> list[bytes]:
    """What ``action`` published on the job's channel (subscribed, and confirmed, before it runs)."""
    pubsub = client.pubsub()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis-py 8
    pubsub.subscribe(keys.stream_channel(job_id))
    assert pubsub.get_message(timeout=5) is not None  # the subscribe confirmation
    action()
    got: list[bytes] = []
    while (msg := pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)) is not None:
        got.append(msg["data"])
    pubsub.close()
    return got


def test_stale_delivery_is_skipped(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    """A duplicate of a finished or running job, and an attempt older than the record's, reach neither the
    engine nor the job's channel, and leave the record and the worker's counts as they were."""
    j = job(stream=True)
    run_and_listen(redis_server.url, runner_with(redis_client, ListEngine(["a"])), j)
    before = redis_client.hgetall(keys.job_key(j.id))
    engine = ListEngine(["zzz"])
    runner = runner_with(redis_client, engine)
    # The broker redelivers the finished job's message.
    assert published_while(redis_client, j.id, lambda: runner.run(j)) == []
    # The job was re-queued as attempt 2 (its worker died) and runs on another worker; the old message of
    # attempt 1 comes late, and so does a duplicate of attempt 2.
    redis_client.hset(keys.job_key(j.id), mapping={"state": "running", "attempt": 2, "worker": "other"})
    stale, duplicate = j.model_copy(update={"attempt": 1}), j.model_copy(update={"attempt": 2})
    assert published_while(redis_client, j.id, lambda: runner.run(stale)) == []
    assert published_while(redis_client, j.id, lambda: runner.run(duplicate)) == []
    # And the same old message while attempt 2 still waits in the queue.
    redis_client.hset(keys.job_key(j.id), mapping={"state": "queued"})
    redis_client.hdel(keys.job_key(j.id), "worker")
    assert published_while(redis_client, j.id, lambda: runner.run(stale)) == []
    assert engine.calls == [], "a stale or duplicate delivery reached the engine"
    assert redis_client.hget(keys.job_key(j.id), "text") == before[b"text"] == b"a"
    stats = runner.stats.snapshot()
    assert (stats.in_flight, stats.completed, stats.failed) == (0, 0, 0)


class StopEngine(ListEngine):
    """Ends on a stop string, as an engine with a StopMatcher does."""

    def generate(self, request: GenerationRequest) -> Iterator[Output]:
        yield Output(prompt_tokens=3)
        yield Output(text="1, 2, ", prompt_tokens=3, completion_tokens=1)
        yield Output(prompt_tokens=3, completion_tokens=2, finish_reason="stop", stop_sequence="3")


def test_the_matched_stop_string_is_published_and_recorded(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    j = job(stream=False)
    got = run_and_listen(redis_server.url, runner_with(redis_client, StopEngine([])), j)
    assert isinstance(got[-1], events.Finished) and got[-1].stop_sequence == "3"
    assert redis_client.hget(keys.job_key(j.id), "stop_sequence") == b"3"
    # A job that ended otherwise names none, in the event or the record.
    j = job(stream=False)
    got = run_and_listen(redis_server.url, runner_with(redis_client, ListEngine(["a"])), j)
    assert isinstance(got[-1], events.Finished) and got[-1].stop_sequence is None
    assert redis_client.hget(keys.job_key(j.id), "stop_sequence") is None


class EmbedEngine(ListEngine):
    def embed(self, inputs: list[str] | list[list[int]]) -> Embeddings:
        return Embeddings(vectors=[[float(len(str(i))), 0.5] for i in inputs], prompt_tokens=7)


class LogprobEngine(ListEngine):
    def generate(self, request: GenerationRequest) -> Iterator[Output]:
        assert request.logprobs == 1
        yield Output(prompt_tokens=3)
        for i, p in enumerate(self.pieces, 1):
            lp = [TokenLogprob(p, -0.5 * i, [(p, -0.5 * i)])]
            yield Output(text=p, prompt_tokens=3, completion_tokens=i, logprobs=lp)
        yield Output(prompt_tokens=3, completion_tokens=len(self.pieces), finish_reason="stop")


def test_logprobs_travel_with_deltas_or_with_the_end(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    for stream in (True, False):
        j = job(stream)
        j.sampling.logprobs = 1
        got = run_and_listen(redis_server.url, runner_with(redis_client, LogprobEngine(["a", "b"])), j)
        if stream:
            deltas = [e for e in got if isinstance(e, events.Delta)]
            assert [d.logprobs[0].logprob for d in deltas if d.logprobs] == [-0.5, -1.0]
        else:
            end = got[-1]
            assert isinstance(end, events.Finished) and end.logprobs is not None
            assert [(t.token, t.logprob, t.top[0].token) for t in end.logprobs] == [
                ("a", -0.5, "a"),
                ("b", -1.0, "b"),
            ]


def test_embedding_job_publishes_vectors_and_records_them(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    runner = runner_with(redis_client, EmbedEngine([]))
    j = Job(model="m", kind="embedding", inputs=["ab", "c"])
    got = run_and_listen(redis_server.url, runner, j)
    assert [e.type for e in got] == ["started", "finished"]
    end = got[-1]
    assert isinstance(end, events.Finished) and end.embeddings == [[2.0, 0.5], [1.0, 0.5]]
    assert end.prompt_tokens == 7
    assert json.loads(redis_client.hget(keys.job_key(j.id), "embeddings") or b"") == end.embeddings
    stats = runner.stats.snapshot()
    assert (stats.in_flight, stats.completed, stats.failed) == (0, 1, 0)


def test_embedding_on_an_engine_that_cannot_is_a_400(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    got = run_and_listen(
        redis_server.url,
        runner_with(redis_client, ListEngine([])),
        Job(model="m", kind="embedding", inputs=["x"]),
    )
    end = got[-1]
    assert isinstance(end, events.Failed)
    assert (end.code, end.param) == ("unsupported_value", "model")


def test_unsupported_request_fields_are_a_400_naming_them(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    engine = ListEngine([], error=UnsupportedRequest("no grammar here", "response_format"))
    got = run_and_listen(redis_server.url, runner_with(redis_client, engine), job(stream=True))
    end = got[-1]
    assert isinstance(end, events.Failed) and (end.code, end.param) == (
        "unsupported_value",
        "response_format",
    )
