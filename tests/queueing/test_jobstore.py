"""Job record transitions against a real Redis."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aredis

from ops.redis_server import RedisServer
from queueing import keys
from queueing.jobs import ChatMessage, Job, JobState, Sampling
from queueing.jobstore import AsyncJobStore, JobRecord, JobStore
from queueing.recovery import reap_dead_workers
from queueing.registry import WorkerInfo, announce


def make_job() -> Job:
    return Job(
        model="m",
        messages=[ChatMessage(role="user", content="hi")],
        sampling=Sampling(max_tokens=4, temperature=0, top_p=1),
    )


def create(url: str, job: Job, ttl: float = 60) -> None:
    async def go() -> None:
        client = aredis.Redis.from_url(url)
        await AsyncJobStore(client, ttl=ttl).create(job)
        await client.aclose()

    asyncio.run(go())


def test_claim_once_then_finish(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    store, job = JobStore(redis_client), make_job()
    create(redis_server.url, job)
    assert store.claim(job, "w1")
    assert not store.claim(job, "w2")  # a second delivery of the same attempt does nothing
    assert store.running_on("w1") == [job.id]
    assert store.finish(job, "w1", JobState.DONE, text="ok")
    assert store.state(job.id) == JobState.DONE
    assert store.running_on("w1") == []
    assert 0 < redis_client.ttl(keys.job_key(job.id)) <= 60


def test_requeue_makes_the_old_attempt_stale(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    store, job = JobStore(redis_client), make_job()
    create(redis_server.url, job)
    assert store.claim(job, "dead")
    second = store.requeue(job.id, "dead")
    assert second is not None and second.attempt == 2 and second.id == job.id
    assert store.requeue(job.id, "dead") is None  # only once
    assert not store.claim(job, "w2")  # the broker redelivering attempt 1 is dropped
    assert store.claim(second, "w2")
    assert not store.finish(job, "dead", JobState.DONE, text="late")  # the dead worker cannot overwrite
    assert store.finish(second, "w2", JobState.DONE, text="ok")
    assert redis_client.hget(keys.job_key(job.id), "text") == b"ok"


def test_cancel_only_unfinished_jobs(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    job = make_job()
    create(redis_server.url, job)

    async def cancel() -> bool:
        client = aredis.Redis.from_url(redis_server.url)
        try:
            return await AsyncJobStore(client, ttl=60).cancel(job.id)
        finally:
            await client.aclose()

    assert asyncio.run(cancel())
    assert JobStore(redis_client).state(job.id) == JobState.CANCELLED
    assert not JobStore(redis_client).claim(job, "w1")  # a cancelled job is never started
    assert not asyncio.run(cancel())


def test_reaper_requeues_jobs_of_workers_without_heartbeat(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    store = JobStore(redis_client)
    live, dead = make_job(), make_job()
    for j in (live, dead):
        create(redis_server.url, j)
    info = WorkerInfo(name="alive", host="h", pid=1, engine="e", models=["m"], concurrency=1)
    announce(redis_client, info, ttl=30)
    assert store.claim(live, "alive")
    announce(redis_client, info.model_copy(update={"name": "gone"}), ttl=30)
    assert store.claim(dead, "gone")
    redis_client.delete(keys.worker_key("gone"))  # its heartbeat expired

    sent: list[Job] = []
    assert reap_dead_workers(redis_client, store, sent.append) == [dead.id]
    assert [(j.id, j.attempt) for j in sent] == [(dead.id, 2)]
    assert store.state(dead.id) == JobState.QUEUED
    assert store.state(live.id) == JobState.RUNNING
    assert redis_client.smembers(keys.WORKERS_SET) == {b"alive"}
    assert reap_dead_workers(redis_client, store, sent.append) == []


def test_a_worker_restarted_under_its_old_name_requeues_what_it_held(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    from queueing.recovery import requeue_jobs_of

    store, job = JobStore(redis_client), make_job()
    create(redis_server.url, job)
    assert store.claim(job, "local")  # then the process was killed; a new "local" starts
    sent: list[Job] = []
    assert requeue_jobs_of(store, "local", sent.append) == [job.id]
    assert [j.attempt for j in sent] == [2]
    assert store.running_on("local") == []


def test_an_ended_record_is_kept_only_for_the_retention(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """Done, failed and cancelled (by its worker, or by the API before or while it runs): each record's TTL
    is cut to the retention in the step that ends it; a shorter TTL is never stretched."""
    store = JobStore(redis_client, retention=5)
    done, failed, stopped = make_job(), make_job(), make_job()
    for j in (done, failed, stopped):
        create(redis_server.url, j)  # TTL 60 s
        assert store.claim(j, "w1")
    assert store.finish(done, "w1", JobState.DONE, text="ok")
    assert store.finish(failed, "w1", JobState.FAILED, error="boom")
    assert store.finish(stopped, "w1", JobState.CANCELLED, text="", finish_reason="cancelled")
    for j in (done, failed, stopped):
        assert 0 < redis_client.pttl(keys.job_key(j.id)) <= 5000, j
    queued, running = make_job(), make_job()
    for j in (queued, running):
        create(redis_server.url, j)
    assert store.claim(running, "w1")

    async def cancel(job_id: str) -> bool:
        client = aredis.Redis.from_url(redis_server.url)
        try:
            return await AsyncJobStore(client, ttl=60, retention=5).cancel(job_id)
        finally:
            await client.aclose()

    for j in (queued, running):
        assert asyncio.run(cancel(j.id))
        assert 0 < redis_client.pttl(keys.job_key(j.id)) <= 5000, j
    short = make_job()
    create(redis_server.url, short)
    redis_client.pexpire(keys.job_key(short.id), 2000)
    assert store.claim(short, "w1") and store.finish(short, "w1", JobState.DONE, text="ok")
    assert 0 < redis_client.pttl(keys.job_key(short.id)) <= 2000


def test_retention_defaults_to_the_setting(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    from queueing.settings import get_settings

    job = make_job()
    create(redis_server.url, job, ttl=3600)  # as the API creates one: the request timeout and an hour
    store = JobStore(redis_client)
    assert store.claim(job, "w1") and store.finish(job, "w1", JobState.DONE, text="ok")
    retention_ms = get_settings().job_retention * 1000
    # Long enough for a non-streamed request to read its result from the record after the end.
    assert get_settings().job_retention >= 60
    assert retention_ms - 5000 < redis_client.pttl(keys.job_key(job.id)) <= retention_ms


def test_a_result_whose_record_vanished_is_written_anew(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    # Redis restarted empty under a running job: the request still waits and reads its result from here.
    store, job = JobStore(redis_client, retention=30), make_job()
    create(redis_server.url, job)
    assert store.claim(job, "w1")
    redis_client.flushdb()
    assert store.finish(job, "w1", JobState.DONE, text="ok", completion_tokens=2)

    async def read() -> JobRecord | None:
        client = aredis.Redis.from_url(redis_server.url)
        try:
            return await AsyncJobStore(client).get(job.id)
        finally:
            await client.aclose()

    record = asyncio.run(read())
    assert record is not None and record.state == JobState.DONE
    assert (record.text, record.completion_tokens, record.worker) == ("ok", 2, "w1")
    assert 0 < redis_client.ttl(keys.job_key(job.id)) <= 30
    # An attempt that moved on is still refused: the record exists, with another attempt.
    assert not store.finish(job.model_copy(update={"attempt": 0}), "w1", JobState.DONE, text="late")
