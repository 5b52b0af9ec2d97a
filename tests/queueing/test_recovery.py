"""The unsent ledger: a job made queued is listed until its message is out, and a sweep by any live worker
or API process sends what a dead sender left behind. Real Redis, a real Celery producer for the API side."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time

import pytest
import redis
import redis.asyncio as aredis

from api.requeue_sweep import RequeueSweep
from ops.redis_server import RedisServer
from queueing import keys
from queueing.celery_app import create_celery
from queueing.jobs import Job, JobState
from queueing.jobstore import AsyncJobStore, JobStore
from queueing.recovery import RESEND_AFTER_SECONDS, requeue_jobs_of, resend_unsent
from queueing.registry import WorkerInfo
from queueing.settings import Settings
from tests.fleet import ROOT
from tests.queueing.test_jobstore import create, make_job
from tests.queueing.test_priority import CATALOG
from workers.heartbeat import Heartbeat


def ledger(r: redis.Redis) -> dict[str, float]:
    entries: list[tuple[bytes, float]] = r.zrange(keys.JOBS_UNSENT, 0, -1, withscores=True)  # type: ignore[assignment]
    return {m.decode(): s for m, s in entries}


def age_entries(r: redis.Redis, seconds: float) -> None:
    """Make every ledger entry look written ``seconds`` ago (Redis time), as if its sender died then."""
    now_s, now_us = r.time()
    now = now_s * 1000 + now_us // 1000
    for member in ledger(r):
        r.zadd(keys.JOBS_UNSENT, {member: now - seconds * 1000})


def stranded(server: RedisServer, r: redis.Redis, worker: str = "dead") -> tuple[JobStore, Job]:
    """A job whose worker died, made queued as attempt 2 by a re-queuer that died before sending it."""
    store, job = JobStore(r), make_job()
    create(server.url, job)
    assert store.claim(job, worker)
    again = store.requeue(job.id, worker)
    assert again is not None and again.attempt == 2
    return store, again


def test_requeue_lists_the_attempt_until_it_is_sent(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    store, job = stranded(redis_server, redis_client)
    # Written by the same Lua step that made the job queued: no moment has the one without the other.
    assert list(ledger(redis_client)) == [keys.unsent_member(job.id, 2)]
    store.sent(job)
    assert ledger(redis_client) == {}


def test_reaper_takes_the_entry_off_once_it_sent(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    store, job = JobStore(redis_client), make_job()
    create(redis_server.url, job)
    assert store.claim(job, "dead")
    seen: list[list[str]] = []
    # The entry exists while the send happens, and is gone after it.
    assert requeue_jobs_of(store, "dead", lambda j: seen.append(list(ledger(redis_client)))) == [job.id]
    assert seen == [[keys.unsent_member(job.id, 2)]]
    assert ledger(redis_client) == {}


def test_a_failed_send_leaves_the_entry_for_the_sweep(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    store, job = JobStore(redis_client), make_job()
    create(redis_server.url, job)
    assert store.claim(job, "dead")

    def broker_down(_: Job) -> None:
        raise ConnectionError("broker away")

    with pytest.raises(ConnectionError):
        requeue_jobs_of(store, "dead", broker_down)
    assert list(ledger(redis_client)) == [keys.unsent_member(job.id, 2)]


def test_sweep_sends_a_stranded_job_once_it_is_old_enough(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    store, job = stranded(redis_server, redis_client)
    sent: list[Job] = []
    # Young: its sender may still be sending.
    assert resend_unsent(store, sent.append) == []
    age_entries(redis_client, RESEND_AFTER_SECONDS + 1)
    assert resend_unsent(store, sent.append) == [job.id]
    assert [(j.id, j.attempt) for j in sent] == [(job.id, 2)]
    assert sent[0].model_dump() == job.model_dump()
    assert ledger(redis_client) == {}
    assert resend_unsent(store, sent.append, age=0) == []  # nothing left


def test_a_sweeper_that_dies_mid_send_leaves_the_entry_to_the_next_one(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    store, job = stranded(redis_server, redis_client)
    age_entries(redis_client, 10)
    assert [j.id for j in store.unsent_due(RESEND_AFTER_SECONDS)] == [job.id]  # then this sweeper died
    # Handed out: other sweepers leave it alone for another bound, rather than all sending it at once...
    assert store.unsent_due(RESEND_AFTER_SECONDS) == []
    assert list(ledger(redis_client)) == [keys.unsent_member(job.id, 2)]
    # ...and once that passed, the next one sends it.
    age_entries(redis_client, 10)
    assert [j.id for j in store.unsent_due(RESEND_AFTER_SECONDS)] == [job.id]


@pytest.mark.parametrize("moved_on", ["claimed", "finished", "cancelled", "later attempt", "expired"])
def test_sweep_drops_entries_of_jobs_that_moved_on(
    redis_server: RedisServer, redis_client: redis.Redis, moved_on: str
) -> None:
    store, job = stranded(redis_server, redis_client)
    if moved_on in ("claimed", "finished", "later attempt"):
        # Sent after all (the sender died between its send and taking the entry off).
        assert store.claim(job, "w2")
    if moved_on == "finished":
        assert store.finish(job, "w2", JobState.DONE, text="ok")
    if moved_on == "cancelled":
        assert asyncio.run(_cancel(redis_server.url, job.id))
    if moved_on == "later attempt":
        later = store.requeue(job.id, "w2")  # w2 died too; its re-queue is listed under attempt 3
        assert later is not None and later.attempt == 3
        store.sent(later)
    if moved_on == "expired":
        redis_client.delete(keys.job_key(job.id))
    age_entries(redis_client, 10)
    assert store.unsent_due(RESEND_AFTER_SECONDS) == []
    assert ledger(redis_client) == {}


async def _cancel(url: str, job_id: str) -> bool:
    client = aredis.Redis.from_url(url)
    try:
        return await AsyncJobStore(client).cancel(job_id)
    finally:
        await client.aclose()


def test_a_resent_attempt_runs_once(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    """The sweep may send an attempt its dead sender had sent after all: the claim takes one delivery."""
    store, job = stranded(redis_server, redis_client)
    age_entries(redis_client, 10)
    (resent,) = store.unsent_due(RESEND_AFTER_SECONDS)
    assert store.claim(resent, "w2")
    assert not store.claim(job, "w3")  # the other delivery of attempt 2
    assert not store.claim(job.model_copy(update={"attempt": 1}), "w3")  # the broker redelivering attempt 1
    assert store.running_on("w2") == [job.id] and store.running_on("w3") == []


def test_requeue_of_a_job_routed_to_a_dead_worker_is_listed_too(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    store, job = JobStore(redis_client), make_job()
    create(redis_server.url, job)
    redis_client.hset(keys.job_key(job.id), "routed_to", "dead")
    again = store.requeue_routed(job.id, "dead")
    assert again is not None
    assert list(ledger(redis_client)) == [keys.unsent_member(job.id, 2)]


def test_a_worker_that_stops_hands_back_the_jobs_routed_to_it(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    # After a clean shutdown nobody reads the worker's own queue and no reaper knows its name.
    store, job = JobStore(redis_client), make_job()
    create(redis_server.url, job)
    redis_client.hset(keys.job_key(job.id), "routed_to", "leaving")
    redis_client.sadd(keys.worker_assigned_key("leaving"), job.id)
    sent: list[Job] = []
    info = WorkerInfo(name="leaving", host="h", pid=1, engine="e", models=["m"], concurrency=1)
    beat = Heartbeat(redis_client, "leaving", lambda: info, interval=1, ttl=5, enqueue=sent.append)
    beat.start()
    beat.stop()
    assert [(j.id, j.attempt) for j in sent] == [(job.id, 2)]
    assert store.assigned_to("leaving") == []
    assert redis_client.hget(keys.job_key(job.id), "routed_to") is None


def test_a_yielded_line_is_listed_until_sent(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    # A worker killed between giving the slot up and sending the next attempt leaves it to the sweep.
    store, job = JobStore(redis_client), make_job()
    create(redis_server.url, job)
    assert store.claim(job, "w1")
    again = store.yield_slot(job, "w1")
    assert again is not None
    assert list(ledger(redis_client)) == [f"{job.id}#{again.attempt}"]
    store.sent(again)
    assert ledger(redis_client) == {}


def test_a_handed_back_job_is_listed_until_sent(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    # workers/tasks.py marks a job it cannot serve before taking its message off and sending it again.
    store, job = JobStore(redis_client), make_job()
    create(redis_server.url, job)
    store.mark_unsent(job)
    assert list(ledger(redis_client)) == [f"{job.id}#{job.attempt}"]
    age_entries(redis_client, 10)
    assert [j.id for j in store.unsent_due(3.0)] == [job.id]  # still queued as that attempt: re-sent
    store.sent(job)
    assert ledger(redis_client) == {}


def test_every_heartbeat_sweeps(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    _, job = stranded(redis_server, redis_client)
    age_entries(redis_client, 10)
    sent: list[Job] = []
    info = WorkerInfo(name="live", host="h", pid=1, engine="e", models=["m"], concurrency=1)
    Heartbeat(redis_client, "live", lambda: info, interval=1, ttl=5, enqueue=sent.append).beat()
    assert [(j.id, j.attempt) for j in sent] == [(job.id, 2)]
    assert ledger(redis_client) == {}


def test_api_sweep_puts_the_job_on_its_models_queue(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    _, job = stranded(redis_server, redis_client)
    age_entries(redis_client, 10)

    async def sweep() -> list[str]:
        client = aredis.Redis.from_url(redis_server.url)
        celery = create_celery(Settings(redis_url=redis_server.url), CATALOG)
        try:
            return await RequeueSweep(client, celery, interval=1).sweep()
        finally:
            celery.close()
            await client.aclose()

    assert asyncio.run(sweep()) == [job.id]
    assert ledger(redis_client) == {}
    lists = keys.queue_list_keys(keys.model_queue(job.model))
    (raw,) = [m for key in lists for m in redis_client.lrange(key, 0, -1)]
    body = json.loads(base64.b64decode(json.loads(raw)["body"]))
    assert body[0][0]["id"] == job.id and body[0][0]["attempt"] == 2


def test_a_job_created_with_track_send_is_listed_in_the_same_transaction(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    job = make_job()

    async def go() -> None:
        client = aredis.Redis.from_url(redis_server.url)
        store = AsyncJobStore(client, ttl=60)
        try:
            await store.create(job, track_send=True)
            assert list(ledger(redis_client)) == [keys.unsent_member(job.id, 1)]
            await store.sent(job)
            assert ledger(redis_client) == {}
            await store.create(job, track_send=True)  # and its sender died
            age_entries(redis_client, 10)
            assert [(j.id, j.attempt) for j in await store.unsent_due(RESEND_AFTER_SECONDS)] == [(job.id, 1)]
        finally:
            await client.aclose()

    asyncio.run(go())


@pytest.mark.parametrize("armed", [True, False])
def test_fault_point_kills_the_process_only_when_named(armed: bool) -> None:
    env = {**os.environ, "INFERQ_FAULT": "requeue_before_send" if armed else ""}
    code = "from queueing.faults import fault; fault('requeue_before_send'); print('survived')"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, timeout=60)
    assert done.returncode == (-9 if armed else 0)
    assert (b"survived" in done.stdout) is not armed


def test_rescue_takes_only_old_unclaimed_deliveries_of_waiting_jobs(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    store = JobStore(redis_client)
    old, young, routed, running, stale = (make_job() for _ in range(5))
    for job in (old, young, routed, running, stale):
        create(redis_server.url, job)
    redis_client.hset(keys.job_key(routed.id), "routed_to", "w2")  # its worker's own sets cover it
    assert store.claim(running, "w1")
    redis_client.hset(keys.job_key(stale.id), "attempt", 2)  # already re-queued: the old message is stale
    now = time.time()
    # Entries as kombu's Redis transport writes them: [message, exchange, routing key], by delivery tag.
    for tag, (job, at) in enumerate(
        [(old, now - 10), (young, now), (routed, now - 10), (running, now - 10), (stale, now - 10)]
    ):
        message = {
            "body": "",
            "headers": {
                "lang": "py",
                "task": keys.GENERATE_TASK,
                "id": f"{job.id}.1",
                "root_id": f"{job.id}.1",
            },
        }
        redis_client.hset(keys.KOMBU_UNACKED, str(tag), json.dumps([message, "x", "x"]))
        redis_client.zadd(keys.KOMBU_UNACKED_INDEX, {str(tag): at})
    assert [(j.id, j.attempt) for j in store.rescue_unclaimed(now - 3)] == [(old.id, 2)]
    assert list(ledger(redis_client)) == [keys.unsent_member(old.id, 2)]
    assert store.rescue_unclaimed(now - 3) == []  # handed out once: the old message is stale now


def test_a_worker_back_from_a_long_outage_waits_a_ttl_before_reaping(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    # After Redis froze for longer than the TTL every worker looks dead until it announces again.
    store, job = JobStore(redis_client), make_job()
    create(redis_server.url, job)
    assert store.claim(job, "other")
    redis_client.sadd(keys.WORKERS_SET, "other")  # known, and without a live heartbeat
    sent: list[Job] = []
    info = WorkerInfo(name="back", host="h", pid=1, engine="e", models=["m"], concurrency=1)
    beat = Heartbeat(redis_client, "back", lambda: info, interval=1, ttl=5, enqueue=sent.append)
    beat._announced = time.monotonic() - 30  # its last beat that reached Redis, before the outage
    beat.beat()
    assert sent == [] and store.running_on("other") == [job.id]
    beat._reap_after = 0.0  # a TTL later, "other" has still not announced: dead
    beat.beat()
    assert [(j.id, j.attempt) for j in sent] == [(job.id, 2)]
