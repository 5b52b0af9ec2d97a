"""The job runner when Redis fails under it, on the real llama.cpp engine (whose lock is what a generator
left suspended would keep) and a real Redis: errors under a publish, a Redis that freezes mid-job, a record
that vanishes. Whatever happens, the next job on the same engine runs."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest
import redis

from engines.base import Engine
from ops.redis_server import RedisServer
from queueing import eventlog, keys
from queueing.catalog import Catalog
from queueing.jobs import ChatMessage, Job, JobState, Sampling
from queueing.jobstore import AsyncJobStore, JobStore
from queueing.settings import Settings
from tests import _engines
from workers.models import ModelManager
from workers.runner import JobRunner
from workers.runtime import worker_redis

llamacpp = _engines.import_engine("llamacpp", "engines.llamacpp")


@pytest.fixture(scope="module")
def engine(smollm2_engine: Engine) -> Engine:
    return smollm2_engine


class FailingPublish(redis.Redis):
    """A real client whose event sends from the ``fail_from``-th one on raise ``error``, ``times`` times."""

    def __init__(self, url: str, error: Exception, fail_from: int, times: int = 10**6) -> None:
        pool = redis.ConnectionPool.from_url(url)
        super().__init__(connection_pool=pool)
        self.error, self.fail_from, self.times, self.calls = error, fail_from, times, 0

    def _fault(self) -> None:
        self.calls += 1
        if self.calls >= self.fail_from and self.times > 0:
            self.times -= 1
            raise self.error

    def publish(self, channel: Any, message: Any, **kwargs: Any) -> Any:
        self._fault()
        return super().publish(channel, message, **kwargs)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        # A stream's events go out through the event log's script (queueing/eventlog.py), pipelined by the
        # worker's sender (workers/sender.py), not PUBLISH.
        pipe = super().pipeline(transaction, shard_hint)
        run = pipe.execute

        def execute(raise_on_error: bool = True) -> Any:
            for args, _ in pipe.command_stack:
                if args[0] == "EVALSHA" and args[1] == eventlog.EMIT_SHA:
                    self._fault()
            return run(raise_on_error)

        pipe.execute = execute  # type: ignore[method-assign]
        return pipe


def story(max_tokens: int = 40) -> Job:
    return Job(
        model="m",
        messages=[ChatMessage(role="user", content="Tell me a story.")],
        sampling=Sampling(max_tokens=max_tokens, temperature=0, top_p=1, ignore_eos=True),
        stream=True,
    )


def create(url: str, job: Job) -> None:
    import asyncio

    import redis.asyncio as aredis

    async def go() -> None:
        a = aredis.Redis.from_url(url)
        await AsyncJobStore(a, ttl=60).create(job)
        await a.aclose()

    asyncio.run(go())


def runner_on(client: redis.Redis, engine: Engine, **kw: Any) -> JobRunner:
    models = ModelManager(Catalog(models={}))
    models.adopt("m", engine)
    return JobRunner("w", client, models, cancel_poll_seconds=0.05, **kw)


def run_kept(runner: JobRunner, job: Job, kept: list[BaseException], timeout: float = 60.0) -> bool:
    """Run ``job`` in a thread as Celery does, keeping any exception it raises alive (as Celery's failure
    handling and loggers do). True if it ended within ``timeout``."""

    def go() -> None:
        try:
            runner.run(job)
        except BaseException as exc:  # kept, as Celery keeps a task's failure
            kept.append(exc)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive()


def test_an_error_under_a_publish_frees_the_engine_for_the_next_job(
    redis_server: RedisServer, redis_client: redis.Redis, engine: Engine
) -> None:
    # Not a Redis outage (those are waited out): an error that escapes the engine loop, and the Failed
    # event's publish too, so the job's exception leaves the runner with the generator in its traceback.
    client = FailingPublish(redis_server.url, redis.ResponseError("boom"), fail_from=3)
    runner = runner_on(client, engine)
    first, kept = story(), list[BaseException]()
    create(redis_server.url, first)
    assert run_kept(runner, first, kept)
    assert kept and isinstance(kept[0], redis.ResponseError)  # the failure left the runner, kept here
    assert JobStore(redis_client).state(first.id) == JobState.FAILED

    second = story(max_tokens=4)
    create(redis_server.url, second)
    clean = runner_on(redis_client, engine)
    assert run_kept(clean, second, [], timeout=30), "the engine is still locked by the first job"
    assert JobStore(redis_client).state(second.id) == JobState.DONE
    client.close()


def test_deltas_that_cannot_be_published_are_dropped_and_the_job_finishes(
    redis_server: RedisServer, redis_client: redis.Redis, engine: Engine
) -> None:
    # Publishes 3..7 find Redis unreachable: a Redis that restarts drops them; the generation goes on.
    client = FailingPublish(redis_server.url, redis.ConnectionError("gone"), fail_from=3, times=5)
    runner = runner_on(client, engine)
    job, kept = story(), list[BaseException]()
    create(redis_server.url, job)
    assert run_kept(runner, job, kept)
    assert not kept
    record = redis_client.hgetall(keys.job_key(job.id))
    assert record[b"state"] == b"done" and int(record[b"completion_tokens"]) == 40
    assert runner.stats.snapshot().completed == 1
    second = story(max_tokens=4)
    create(redis_server.url, second)
    assert run_kept(runner, second, [], timeout=30)
    assert JobStore(redis_client).state(second.id) == JobState.DONE


def test_a_job_that_ends_while_redis_is_frozen_is_recorded_once_it_thaws(
    engine: Engine, tmp_path: Any
) -> None:
    server = RedisServer()  # its own: frozen here
    try:
        settings = Settings(redis_url=server.url, worker_redis_timeout=0.3)
        client = worker_redis(settings, slots=1)
        runner = runner_on(client, engine, record_retry_seconds=60)
        job, kept = story(max_tokens=60), list[BaseException]()
        create(server.url, job)
        done = threading.Event()

        def go() -> None:
            run_kept(runner, job, kept)
            done.set()

        threading.Thread(target=go, daemon=True).start()
        store = JobStore(redis.Redis.from_url(server.url))
        deadline = time.monotonic() + 30
        while store.state(job.id) != JobState.RUNNING:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pid = server._proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            # The generation runs to its end meanwhile (60 tokens at one thread: a few seconds), and its
            # finish waits for Redis rather than failing or giving up.
            time.sleep(4)
            assert not done.is_set()
        finally:
            os.kill(pid, signal.SIGCONT)
        assert done.wait(30)
        assert not kept
        record = store._r.hgetall(keys.job_key(job.id))
        assert record[b"state"] == b"done" and int(record[b"completion_tokens"]) == 60
        store._r.close()
        client.close()
    finally:
        server.stop()


def test_a_job_whose_record_vanished_stops_and_frees_the_engine(
    redis_server: RedisServer, redis_client: redis.Redis, engine: Engine
) -> None:
    # Redis restarted without its data: nobody can be given this job's result.
    runner = runner_on(redis_client, engine)
    job, kept = story(max_tokens=200), list[BaseException]()
    create(redis_server.url, job)
    pubsub = redis_client.pubsub()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis-py 8
    pubsub.subscribe(keys.stream_channel(job.id))
    t = threading.Thread(target=run_kept, args=(runner, job, kept), daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while JobStore(redis_client).state(job.id) != JobState.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)
    redis_client.delete(keys.job_key(job.id))
    t.join(30)
    assert not t.is_alive() and not kept
    got: list[bytes] = []
    until = time.monotonic() + 1.0
    while time.monotonic() < until:
        msg = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if msg is not None:
            got.append(msg["data"])
    pubsub.close()
    assert b'"type":"error"' in got[-1] and b"record was lost" in got[-1]
    # Stopped early (200 tokens take seconds here), and counted as failed, not completed.
    assert len(got) < 100
    assert runner.stats.snapshot().failed == 1
    assert not redis_client.exists(keys.job_key(job.id))  # nothing written back
    second = story(max_tokens=4)
    create(redis_server.url, second)
    assert run_kept(runner, second, [], timeout=30)
