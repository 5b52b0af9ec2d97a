"""A stale or duplicate delivery never reaches the engine: a real Celery worker process (scripted engine,
which logs every generation it starts to INFERQ_SCRIPTED_CALL_LOG) on a private real Redis, fed messages the
way the broker redelivers them. Each live attempt reaches the engine once; a stale one publishes nothing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aredis
from celery import Celery

from engines.scripted import CALL_LOG_ENV
from ops.redis_server import RedisServer
from queueing import eventlog, events, keys
from queueing.catalog import Catalog
from queueing.celery_app import create_celery, enqueue
from queueing.jobs import ChatMessage, Job, JobState, Sampling
from queueing.jobstore import AsyncJobStore, JobStore
from queueing.registry import WorkerInfo
from queueing.settings import Settings
from tests.fleet import Fleet, write_catalog

WORKER = "stale-w1"
# 40 tokens at 40 tokens/s: a job runs for about a second, long enough to deliver a duplicate while it runs.
TOKENS = 40


class Box:
    """One worker process and what a test needs around it: a producer, job records, the engine's call log."""

    def __init__(self, fleet: Fleet, celery: Celery, client: redis.Redis, calls: Path) -> None:
        self.fleet, self.celery, self.r, self.calls_file = fleet, celery, client, calls

    def calls(self, job_id: str) -> int:
        if not self.calls_file.exists():
            return 0
        return self.calls_file.read_text().splitlines().count(job_id)

    def create(self, job: Job) -> None:
        """The job's record, as the API writes it (for attempt > 1: as a re-queue left it)."""

        async def go() -> None:
            a = aredis.Redis.from_url(self.fleet.redis_url)
            try:
                await AsyncJobStore(a, ttl=120).create(job)
            finally:
                await a.aclose()

        asyncio.run(go())

    def deliver(self, job: Job) -> None:
        enqueue(self.celery, job)

    def skipped(self, job: Job) -> int:
        """How often the worker logged dropping this delivery (workers/runner.py)."""
        return self.fleet.log(WORKER).count(f"skipping stale delivery of {job.id} attempt {job.attempt}")

    def state(self, job_id: str) -> JobState | None:
        return JobStore(self.r).state(job_id)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    server = RedisServer()
    tmp = tmp_path_factory.mktemp("stale")
    catalog = tmp / "models.yaml"
    write_catalog(catalog)
    calls = tmp / "engine-calls.log"
    fleet = Fleet(server.url, tmp, INFERQ_MODELS_FILE=str(catalog))
    client = redis.Redis.from_url(server.url)
    celery = create_celery(Settings(redis_url=server.url), Catalog.load(catalog))
    try:
        env = {"INFERQ_SCRIPTED_TOKENS_PER_SECOND": "40", CALL_LOG_ENV: str(calls)}
        # Two slots: a duplicate of a running job is taken up while the job itself still runs.
        args = ["--engine", "scripted", "--concurrency", "2"]
        fleet.start_worker(WORKER, "scripted", wait=False, args=args, env=env)
        until(lambda: _ready(client), "the worker to serve `scripted`", 60)
        yield Box(fleet, celery, client, calls)
    finally:
        celery.close()
        client.close()
        fleet.close()
        server.stop()


def _ready(client: redis.Redis) -> bool:
    raw = client.get(keys.worker_key(WORKER))
    return raw is not None and "scripted" in WorkerInfo.model_validate_json(raw).models


def until(check: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Channel:
    """Everything published on one job's channel, collected by a thread from before the first delivery."""

    def __init__(self, client: redis.Redis, job_id: str) -> None:
        self._pubsub = client.pubsub()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis-py 8
        self._pubsub.subscribe(keys.stream_channel(job_id))
        # The subscription is confirmed before anything is delivered: nothing published later is missed.
        confirmed = self._pubsub.get_message(timeout=5)
        assert confirmed is not None and confirmed["type"] == "subscribe"
        self.got: list[events.Event] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            msg = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
            if msg is not None:
                self.got.append(events.decode(eventlog.split(msg["data"])[1]))

    def types(self) -> list[str]:
        return [e.type for e in self.got]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pubsub.close()


def job(**update: object) -> Job:
    j = Job(
        model="scripted",
        messages=[ChatMessage(role="user", content="tell me")],
        sampling=Sampling(max_tokens=TOKENS, temperature=0),
        stream=True,
    )
    return j.model_copy(update=update)


def settle(box: Box, j: Job, skips: int, calls: int) -> None:
    """Wait until the worker dropped ``j`` ``skips`` times in all, or the engine saw the job more than
    ``calls`` times (a stale delivery that got through logs no skip), then a moment for its events."""
    until(lambda: box.skipped(j) >= skips or box.calls(j.id) > calls, f"the worker to take {j.id} up")
    time.sleep(0.3)


def live_run(channel: Channel, attempt: int) -> None:
    """One run of ``attempt``, whole, and nothing else on the channel."""
    assert channel.types() == ["started", *["delta"] * TOKENS, "finished"], channel.types()
    assert {e.attempt for e in channel.got} == {attempt}


def test_duplicate_of_a_running_then_finished_job_never_reaches_the_engine(box: Box) -> None:
    j = job()
    channel = Channel(box.r, j.id)
    try:
        box.create(j)
        box.deliver(j)
        until(lambda: box.state(j.id) == JobState.RUNNING, "the job to start")
        # The broker hands the same message out again while the job runs (the other slot takes it) ...
        box.deliver(j)
        settle(box, j, skips=1, calls=1)
        assert box.calls(j.id) == 1, "a duplicate of a running job reached the engine"
        assert box.state(j.id) == JobState.RUNNING, "the duplicate should have been dropped while the job ran"
        until(lambda: box.state(j.id) == JobState.DONE, "the job to finish")
        # ... and once more after it finished.
        box.deliver(j)
        settle(box, j, skips=2, calls=1)
        assert box.calls(j.id) == 1, "a duplicate of a finished job reached the engine"
        live_run(channel, attempt=1)
    finally:
        channel.close()


def test_stale_attempt_never_reaches_the_engine_nor_its_channel(box: Box) -> None:
    # The job was re-queued after its worker died: the record is at attempt 2, the old message is attempt 1.
    live = job(attempt=2)
    stale = live.model_copy(update={"attempt": 1})
    channel = Channel(box.r, live.id)
    try:
        box.create(live)
        box.deliver(stale)
        settle(box, stale, skips=1, calls=0)
        assert box.calls(live.id) == 0, "a stale attempt reached the engine"
        assert channel.got == [], f"a stale attempt published on the job's channel: {channel.types()}"
        assert box.state(live.id) == JobState.QUEUED
        box.deliver(live)
        until(lambda: box.state(live.id) == JobState.RUNNING, "the live attempt to start")
        # The stale message again, while the live attempt runs and after it finished.
        box.deliver(stale)
        settle(box, stale, skips=2, calls=1)
        until(lambda: box.state(live.id) == JobState.DONE, "the live attempt to finish")
        box.deliver(stale)
        settle(box, stale, skips=3, calls=1)
        assert box.calls(live.id) == 1, "the engine ran the job more than once"
        live_run(channel, attempt=2)
    finally:
        channel.close()
