"""Batch lines are queued behind interactive requests: kombu's Redis transport keeps each priority in a list
of its own and pops priority 0 first."""

from __future__ import annotations

import json

import redis

from ops.redis_server import RedisServer
from queueing import keys
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
    base, *_, lowest = keys.queue_list_keys(queue)
    assert lowest == f"{queue}{keys.KOMBU_PRIORITY_SEP}{keys.BATCH_PRIORITY}"
    assert (redis_client.llen(base), redis_client.llen(lowest)) == (1, 2)
    assert redis_client.llen(keys.queue_list_keys(keys.worker_queue("w1"))[-1]) == 1
    # The job on the wire keeps its priority, so a re-queue after a worker died keeps it too.
    message = json.loads(redis_client.lindex(lowest, 0))  # type: ignore[arg-type]
    assert message["properties"]["priority"] == keys.BATCH_PRIORITY


def test_the_message_headers_never_show_the_prompt(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    # Flower and task events show argsrepr: anyone who can open Flower's pages would read prompts there.
    app = create_celery(Settings(redis_url=redis_server.url), CATALOG)
    sent = [
        Job(model="m", messages=[ChatMessage(role="user", content="my secret prompt")]),
        Job(model="m", kind="completion", prompt="my secret prompt"),
        Job(model="m", kind="embedding", inputs=["my secret prompt"]),
    ]
    try:
        for job in sent:
            enqueue(app, job)
    finally:
        app.close()
    # LPUSH: the list holds the newest first.
    for job, raw in zip(sent[::-1], redis_client.lrange(keys.model_queue("m"), 0, -1), strict=True):
        headers = json.loads(raw)["headers"]
        assert "secret" not in json.dumps(headers)
        assert job.id in headers["argsrepr"] and headers["kwargsrepr"] == "{}"
