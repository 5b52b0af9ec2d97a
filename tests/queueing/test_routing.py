"""The routing script and the bookkeeping around it, against a real Redis: freshness, each strategy's pick,
in-flight counts that claims, re-routing, healing and the reaper keep true."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis
import redis.asyncio as aredis

from ops.redis_server import RedisServer
from queueing import keys
from queueing.catalog import Routing
from queueing.jobs import ChatMessage, Job, Sampling
from queueing.jobstore import AsyncJobStore, JobStore
from queueing.recovery import requeue_jobs_of
from queueing.registry import WorkerInfo, announce, expected_seconds, fresh_workers
from queueing.routing import Router, rank_fastest

T = TypeVar("T")


def worker(
    name: str, weight: float = 1, concurrency: int = 2, ttft: float | None = None, tpot: float | None = None
) -> WorkerInfo:
    return WorkerInfo(
        name=name, host="h", pid=1, engine="scripted", models=["m"], concurrency=concurrency, weight=weight,
        ewma_ttft=ttft, ewma_tpot=tpot,
    )  # fmt: skip


def job() -> Job:
    return Job(
        model="m",
        messages=[ChatMessage(role="user", content="hi")],
        sampling=Sampling(max_tokens=4, temperature=0, top_p=1),
    )


def run(url: str, body: Callable[[aredis.Redis], Awaitable[T]]) -> T:
    async def go() -> T:
        client = aredis.Redis.from_url(url)
        try:
            return await body(client)
        finally:
            await client.aclose()

    return asyncio.run(go())


def pick_many(url: str, strategy: Routing, workers: list[WorkerInfo], n: int) -> list[str | None]:
    async def body(client: aredis.Redis) -> list[str | None]:
        router, store = (
            Router(client, fresh_seconds=5, explore=0.0, rng=random.Random(1)),
            AsyncJobStore(client, 60),
        )
        chosen = []
        for _ in range(n):
            j = job()
            await store.create(j)
            chosen.append(await router.pick(strategy, "m", j.id, workers, 4))
        return chosen

    return run(url, body)


def test_only_fresh_workers_are_candidates(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    a, b = worker("a"), worker("b")
    announce(redis_client, a, ttl=10)
    announce(redis_client, b, ttl=10)
    redis_client.zadd(keys.WORKERS_SEEN, {"b": 1})  # b's last beat is ancient: alive but stale
    assert [w.name for w in run(redis_server.url, lambda c: fresh_workers(c, 5))] == ["a"]
    assert set(pick_many(redis_server.url, "round_robin", [a, b], 4)) == {"a"}
    redis_client.zadd(keys.WORKERS_SEEN, {"a": 1})
    assert pick_many(redis_server.url, "round_robin", [a, b], 1) == [None]  # none fresh: shared queue


def test_round_robin_and_weighted_are_exact(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    ws = [worker("a", 1), worker("b", 2), worker("c", 3)]
    for w in ws:
        announce(redis_client, w, ttl=10)
    assert Counter(pick_many(redis_server.url, "round_robin", ws, 9)) == {"a": 3, "b": 3, "c": 3}
    picks = pick_many(redis_server.url, "weighted", ws, 12)
    assert Counter(picks) == {"a": 2, "b": 4, "c": 6}
    assert picks[:3] != ["c", "c", "c"]  # smooth: interleaved, not in runs


def test_least_connections_respects_limits_then_overflows(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    ws = [worker("a", concurrency=1), worker("b", concurrency=2)]
    for w in ws:
        announce(redis_client, w, ttl=10)
    picks = pick_many(redis_server.url, "least_connections", ws, 4)
    assert Counter(picks[:3]) == {"a": 1, "b": 2}
    assert picks[3] is None  # every worker at its limit: the shared queue
    assert redis_client.scard(keys.worker_assigned_key("b")) == 2


def test_claim_unroute_heal_and_reaper_keep_counts_true(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    a = worker("a")
    announce(redis_client, a, ttl=10)
    store = JobStore(redis_client)
    jobs = [job() for _ in range(4)]

    async def route_all(client: aredis.Redis) -> None:
        router, astore = Router(client, 5, 0.0), AsyncJobStore(client, 60)
        for j in jobs:
            await astore.create(j)
            assert await router.pick("round_robin", "m", j.id, [a], 4) == "a"

    run(redis_server.url, route_all)
    assert store.claim(jobs[0], "a")  # claimed: counted in :jobs, no longer in :assigned
    assert redis_client.scard(keys.worker_assigned_key("a")) == 3
    assert store.is_waiting(jobs[1]) and not store.is_waiting(jobs[0])  # jobs[0] runs
    assert not store.is_waiting(jobs[1].model_copy(update={"attempt": 2}))
    assert store.unroute(jobs[1], "a")  # model gone here: back to routing
    redis_client.delete(keys.job_key(jobs[2].id))  # record expired
    assert store.heal_assigned("a") == 1
    assert store.assigned_to("a") == [jobs[3].id]
    requeued: list[Job] = []
    assert sorted(requeue_jobs_of(store, "a", requeued.append)) == sorted([jobs[0].id, jobs[3].id])
    assert {j.attempt for j in requeued} == {2}
    assert not redis_client.exists(keys.worker_assigned_key("a"), keys.worker_jobs_key("a"))


def test_fastest_response_ranks_by_expected_completion() -> None:
    slow, fast = worker("slow", ttft=0.1, tpot=0.04), worker("fast", ttft=0.1, tpot=0.01)
    new = worker("new")
    rng = random.Random(0)
    assert [w.name for w in rank_fastest([slow, fast], [0, 0], 20, 0.0, rng)] == ["fast", "slow"]
    # Enough queued on the fast worker makes the slow one quicker.
    assert [w.name for w in rank_fastest([slow, fast], [0, 12], 20, 0.0, rng)] == ["slow", "fast"]
    assert rank_fastest([slow, fast, new], [0, 0, 0], 20, 0.0, rng)[0].name == "new"  # measure it first
    assert expected_seconds(new, 0, 20) is None
    explored = Counter(rank_fastest([slow, fast], [0, 0], 20, 1.0, rng)[0].name for _ in range(200))
    assert explored["slow"] > 50
