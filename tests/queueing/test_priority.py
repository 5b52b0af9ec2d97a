"""Each class queues behind the ones above it (high, interactive, low, then batch lines): kombu's Redis
transport keeps each priority in a list of its own and pops priority 0 first."""

from __future__ import annotations

import json
import time

import redis

from ops.redis_server import RedisServer
from queueing import keys
from queueing.bands import message_priority, yields_below
from queueing.catalog import Catalog
from queueing.celery_app import create_celery, enqueue
from queueing.jobs import ChatMessage, Job, Priority
from queueing.settings import Settings

CATALOG = Catalog.model_validate({"models": {"m": {"id": "m", "sources": {"llamacpp": {"path": "/x.gguf"}}}}})


def job(priority: Priority) -> Job:
    return Job(model="m", messages=[ChatMessage(role="user", content="hi")], priority=priority)


def test_batch_jobs_go_to_the_lowest_priority_list(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    app = create_celery(Settings(redis_url=redis_server.url), CATALOG)
    try:
        enqueue(app, job("batch"))
        enqueue(app, job("batch"))
        enqueue(app, job("interactive"))
        enqueue(app, job("batch"), worker="w1")
    finally:
        app.close()
    queue = keys.model_queue("m")
    lowest = keys.queue_list_keys(queue)[-1]
    assert lowest == f"{queue}{keys.KOMBU_PRIORITY_SEP}9"
    assert (redis_client.llen(keys.queue_list_keys(queue)[2]), redis_client.llen(lowest)) == (1, 2)
    assert redis_client.llen(keys.queue_list_keys(keys.worker_queue("w1"))[-1]) == 1
    # The job on the wire keeps its priority, so a re-queue after a worker died keeps it too.
    message = json.loads(redis_client.lindex(lowest, 0))  # type: ignore[arg-type]
    assert message["properties"]["priority"] == 9


def test_each_class_has_a_list_of_its_own_served_in_class_order(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    now = time.time()
    sent = [
        job("batch"),  # no deadline: 9
        job("batch").model_copy(update={"deadline": now + 20 * 3600}),  # 8
        job("batch").model_copy(update={"deadline": now + 3 * 3600}),  # 7
        job("batch").model_copy(update={"deadline": now + 600}),  # 6
        job("low").model_copy(update={"share": "over"}),  # 5
        job("low"),  # 4
        job("interactive").model_copy(update={"share": "over"}),  # 3
        job("interactive"),  # 2
        job("high").model_copy(update={"share": "over"}),  # 1
        job("high"),  # 0
    ]
    app = create_celery(Settings(redis_url=redis_server.url), CATALOG)
    try:
        for j in sent:
            enqueue(app, j)
    finally:
        app.close()
    # The lists in the order a worker pops them: one message each, from high within its share down to the
    # batch line with the most time left.
    found = []
    for key in keys.queue_list_keys(keys.model_queue("m")):
        assert redis_client.llen(key) == 1
        found.append(json.loads(redis_client.lindex(key, 0))["properties"]["priority"])  # type: ignore[arg-type]
    assert found == list(range(10))
    assert [message_priority(j) for j in reversed(sent)] == list(range(10))


def test_a_job_yields_to_higher_classes_and_to_its_own_class_only_when_over_its_share() -> None:
    assert yields_below(job("high")) == 0, "nothing takes a high job's slot"
    assert yields_below(job("high").model_copy(update={"share": "over"})) == 1
    assert yields_below(job("interactive")) == 2
    assert yields_below(job("interactive").model_copy(update={"share": "over"})) == 3
    # Batch lines give their slot to any class above batch, never to another batch line.
    soon = job("batch").model_copy(update={"deadline": time.time() + 60})
    assert yields_below(soon) == yields_below(job("batch")) == 6


def test_the_message_headers_never_show_the_prompt(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    # Flower and task events show argsrepr: anyone who can open Flower's pages would read prompts there.
    app = create_celery(Settings(redis_url=redis_server.url), CATALOG)
    sent = [
        Job(model="m", messages=[ChatMessage(role="user", content="my secret prompt")], priority="high"),
        Job(model="m", kind="completion", prompt="my secret prompt"),
        Job(model="m", kind="embedding", inputs=["my secret prompt"]),
    ]
    try:
        for job in sent:
            enqueue(app, job)
    finally:
        app.close()
    # LPUSH: the list holds the newest first.
    messages = [
        m for key in keys.queue_list_keys(keys.model_queue("m")) for m in redis_client.lrange(key, 0, -1)
    ]
    assert len(messages) == 3
    for raw in messages:
        headers = json.loads(raw)["headers"]
        assert "secret" not in json.dumps(headers)
        assert any(job.id in headers["argsrepr"] for job in sent) and headers["kwargsrepr"] == "{}"
