"""Per-model scaling signals at /metrics (api/scaling.py), from a fleet written into a real Redis: registry
entries, job records and sets, queue lists and fair-share held tokens."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aredis
from fastapi.testclient import TestClient

from api.app import create_app
from api.fairness import FairShare
from api.scaling import decode_rates
from ops.redis_server import RedisServer
from queueing import keys, registry
from queueing.catalog import DEFAULT_CATALOG, Catalog
from queueing.jobs import Priority
from queueing.registry import WorkerInfo
from queueing.settings import Settings

SMOL, GEMMA = "smollm2-135m", "gemma3-270m"  # both in the default catalog


def worker(name: str, models: list[str], concurrency: int, tpot: float | None) -> WorkerInfo:
    return WorkerInfo(
        name=name, host="h", pid=1, engine="llamacpp", models=models, concurrency=concurrency, ewma_tpot=tpot
    )


def hold(url: str, model: str, tokens: int, request: str, priority: Priority = "interactive") -> None:
    async def main() -> None:
        client = aredis.Redis.from_url(url)
        await FairShare(client, window=30).admit(model, "acct", tokens, request, 4, priority)
        await client.aclose()

    asyncio.run(main())


def scrape(http: TestClient) -> dict[tuple[str, str], float]:
    """(metric, model) -> value of the per-model gauges."""
    text = http.get("/metrics").text
    found = re.findall(r'^(inferq_(?:model|token)_\w+)\{model="([^"]+)"\} (\S+)$', text, re.M)
    return {(name, model): float(value) for name, model, value in found}


@pytest.fixture
def http(redis_server: RedisServer, redis_client: redis.Redis) -> Iterator[TestClient]:
    settings = Settings(redis_url=redis_server.url, no_worker_timeout=0.3, heartbeat_interval=0.1)
    with TestClient(create_app(settings, Catalog.load(DEFAULT_CATALOG))) as c:
        yield c


def test_in_flight_queue_depth_and_backlog_per_model(
    http: TestClient, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    # a: 4 slots at 0.05 s/token (80 tokens/s); b: 2 slots at 0.1 s/token split between two models (10 each);
    # c: not measured yet, adds no rate.
    for w in (worker("a", [SMOL], 4, 0.05), worker("b", [SMOL, GEMMA], 2, 0.1), worker("c", [SMOL], 8, None)):
        registry.announce(redis_client, w, ttl=30)
    for job_id, model in (("j1", SMOL), ("j2", GEMMA), ("j3", SMOL), ("j5", GEMMA)):
        redis_client.hset(keys.job_key(job_id), "model", model)
    # j4's record is gone (expired): it counts to no model.
    redis_client.sadd(keys.worker_jobs_key("a"), "j1", "j2", "j4")
    redis_client.sadd(keys.worker_jobs_key("b"), "j3")
    redis_client.sadd(keys.worker_assigned_key("b"), "j5")
    smol_lists = keys.queue_list_keys(keys.model_queue(SMOL))
    redis_client.rpush(smol_lists[0], "m1")
    redis_client.rpush(smol_lists[2], "m2", "m3")
    redis_client.rpush(keys.queue_list_keys(keys.model_queue(GEMMA))[9], "m4")
    hold(redis_server.url, SMOL, 500, "r1")
    hold(redis_server.url, SMOL, 400, "r2", "high")
    hold(redis_server.url, GEMMA, 35, "r3")
    # Given up for lost (its score, when it is, long past): not backlog any more.
    redis_client.zadd(keys.share_held_key(SMOL), {"gone\t7000\tinteractive\tr0": 1})

    got = scrape(http)
    assert got[("inferq_model_in_flight", SMOL)] == 2 and got[("inferq_model_in_flight", GEMMA)] == 1
    assert got[("inferq_model_queue_depth", SMOL)] == 3  # shared queue, every class
    assert got[("inferq_model_queue_depth", GEMMA)] == 2  # one shared, one on b's own queue
    assert got[("inferq_token_backlog", SMOL)] == 900 and got[("inferq_token_backlog", GEMMA)] == 35
    assert got[("inferq_token_backlog_seconds", SMOL)] == pytest.approx(900 / 90)
    assert got[("inferq_token_backlog_seconds", GEMMA)] == pytest.approx(35 / 10)


def test_backlog_without_a_measured_worker_has_tokens_but_no_seconds(
    http: TestClient, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    registry.announce(redis_client, worker("c", [SMOL], 8, None), ttl=30)
    hold(redis_server.url, SMOL, 120, "r1")
    got = scrape(http)
    assert got[("inferq_token_backlog", SMOL)] == 120
    assert ("inferq_token_backlog_seconds", SMOL) not in got
    assert got[("inferq_model_in_flight", GEMMA)] == 0 and got[("inferq_model_queue_depth", GEMMA)] == 0


def test_a_worker_with_several_models_splits_its_rate_among_them() -> None:
    rates = decode_rates(
        [worker("a", [SMOL, GEMMA], 4, 0.02), worker("b", [GEMMA], 1, 0.5), worker("c", [], 4, 1)]
    )
    assert rates == {SMOL: pytest.approx(100), GEMMA: pytest.approx(102)}
