"""The liveness check: a model whose generations stop moving makes its worker unhealthy, out of its queues
and out of routing, until they move again; a load or a busy engine is not a stall."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import redis
import redis.asyncio as aredis

from engines.base import GenerationRequest, Output
from ops.redis_server import RedisServer
from queueing import keys, registry
from queueing.catalog import Catalog
from queueing.jobs import ChatMessage, Job, Sampling
from queueing.jobstore import AsyncJobStore, JobStore
from queueing.settings import Settings
from workers.liveness import Liveness
from workers.models import ModelManager
from workers.runner import JobRunner
from workers.runtime import WorkerRuntime
from workers.stats import WorkerStats


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_model_stalls_when_none_of_its_generations_moves_for_the_bound() -> None:
    clock = Clock()
    live = Liveness(stall_seconds=30, clock=clock)
    a = live.started("m")
    clock.now += 29
    assert live.stalled() == []
    clock.now += 2
    assert live.stalled() == ["m"]
    a.tick()
    assert live.stalled() == []
    live.ended(a)
    clock.now += 100
    assert live.stalled() == []  # nothing running: nothing to stall


def test_a_job_waiting_behind_a_moving_one_is_not_a_stall_but_each_model_counts_alone() -> None:
    clock = Clock()
    live = Liveness(stall_seconds=30, clock=clock)
    moving, waiting, other = live.started("m"), live.started("m"), live.started("n")
    for _ in range(10):
        clock.now += 10
        moving.tick()
    assert live.stalled() == ["n"]
    live.ended(moving)
    assert live.stalled() == ["m", "n"]  # the one left of m has not moved for 100 s
    live.ended(waiting)
    live.ended(other)


def test_a_model_load_does_not_count_as_a_stall() -> None:
    clock = Clock()
    live = Liveness(stall_seconds=30, clock=clock)
    live.started("m")
    live.load_started()
    clock.now += 60
    assert live.stalled() == []
    live.load_ended()
    clock.now += 29
    assert live.stalled() == []  # the wait starts again after the load
    clock.now += 2
    assert live.stalled() == ["m"]


class GatedEngine:
    """Gives its first output, then waits for ``go`` before each next one: a generation that stops moving."""

    name = "gated"

    def __init__(self) -> None:
        self.go = threading.Event()

    def generate(self, request: GenerationRequest) -> Iterator[Output]:
        yield Output(prompt_tokens=1)
        self.go.wait(30)
        yield Output(text="x", prompt_tokens=1, completion_tokens=1)
        yield Output(prompt_tokens=1, completion_tokens=1, finish_reason="stop")

    def abort(self, request_id: str) -> None: ...
    def health(self) -> bool:
        return True

    def close(self) -> None: ...


class Consumer:
    """Celery's consumer as the runtime uses it: queue changes handed to its loop."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, str]] = []

    def call_soon(self, fn: Any, queue: str) -> None:
        fn(queue)

    def add_task_queue(self, queue: str) -> None:
        self.changes.append(("add", queue))

    def cancel_task_queue(self, queue: str) -> None:
        self.changes.append(("cancel", queue))


def fresh(url: str) -> list[registry.WorkerInfo]:
    async def go() -> list[registry.WorkerInfo]:
        a = aredis.Redis.from_url(url)
        try:
            return await registry.fresh_workers(a, 5.0)
        finally:
            await a.aclose()

    return asyncio.run(go())


def test_a_stalled_worker_leaves_its_queue_and_routing_and_rejoins_when_it_moves(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    engine = GatedEngine()
    models = ModelManager(Catalog(models={}))
    models.adopt("m", engine)
    liveness = Liveness(stall_seconds=0.2)
    stats = WorkerStats()
    runner = JobRunner("w", redis_client, models, stats=stats, liveness=liveness)
    rt = WorkerRuntime(
        name="w",
        node="w@h",
        settings=Settings(redis_url=redis_server.url),
        client=redis_client,
        models=models,
        runner=runner,
        stats=stats,
        store=JobStore(redis_client),
        consumer=Consumer(),
    )
    consumer = rt.consumer
    job = Job(model="m", messages=[ChatMessage(role="user", content="x")], sampling=Sampling(max_tokens=2))

    async def create() -> None:
        a = aredis.Redis.from_url(redis_server.url)
        await AsyncJobStore(a, ttl=60).create(job)
        await a.aclose()

    asyncio.run(create())
    worker = threading.Thread(target=runner.run, args=(job,))
    worker.start()
    try:
        while stats.snapshot().in_flight == 0:
            threading.Event().wait(0.01)
        rt.check_liveness()
        registry.announce(redis_client, rt.info(), ttl=5)
        assert [w.name for w in fresh(redis_server.url)] == ["w"]  # moving (within the bound)

        threading.Event().wait(0.3)  # no output for longer than the bound
        rt.check_liveness()
        info = rt.info()
        assert (info.healthy, info.stalled, info.models) == (False, ["m"], [])
        assert consumer.changes == [("cancel", keys.model_queue("m"))]
        registry.announce(redis_client, info, ttl=5)
        assert fresh(redis_server.url) == []  # routing leaves it alone
        assert "m" not in rt.serving()  # a job routed here before goes back to the shared queue
    finally:
        engine.go.set()
        worker.join(10)
    rt.check_liveness()
    info = rt.info()
    assert (info.healthy, info.stalled, info.models) == (True, [], ["m"])
    assert consumer.changes[-1] == ("add", keys.model_queue("m"))
    registry.announce(redis_client, info, ttl=5)
    assert [w.name for w in fresh(redis_server.url)] == ["w"]
