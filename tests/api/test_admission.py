"""The queue bound in a real Redis: a Retry-After promises a place, held for the retry when it is due."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio as aredis

from api import errors
from api.admission import QueueBound, parse_retry_count, requested_retry
from ops.redis_server import RedisServer
from queueing import keys
from queueing.jobs import Priority

MODEL = "m"
# QueueBound's max_queued and max_queued_per_class.
QueueBoundArgs = tuple[int, int]


def waiting(client: redis.Redis, step: int, n: int) -> None:
    """``n`` messages on the model's shared queue at priority ``step``."""
    for _ in range(n):
        client.lpush(keys.queue_list_keys(keys.model_queue(MODEL))[step], b"{}")


def drained(client: redis.Redis, claims: int) -> None:
    """``claims`` claims in a finished bucket of the last minute."""
    bucket = int(time.time() // keys.DRAIN_BUCKET_SECONDS) - 2
    client.set(keys.drain_key(MODEL, bucket), claims)


def admit(url: str, bound: QueueBoundArgs, priority: Priority = "interactive", retry: bool = False) -> int:
    """0 when admitted, else the Retry-After given."""

    async def main() -> int:
        client = aredis.Redis.from_url(url)
        requested_retry.set(retry)
        try:
            await QueueBound(client, *bound).admit(MODEL, priority)
            return 0
        except errors.ApiError as exc:
            assert exc.status == 429 and exc.code == "queue_full"
            return int(exc.headers["retry-after"])
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_each_refusal_is_promised_a_later_place_and_a_retry_takes_its_place_when_due(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    url, bound = redis_server.url, (2, 0)
    drained(redis_client, 12)  # 0.2 requests/s
    waiting(redis_client, 2, 2)
    # One place must drain (5 s); the next refused is behind it too (10 s).
    assert admit(url, bound) == 5
    assert admit(url, bound) == 10
    assert admit(url, bound, retry=True) == 15, "a retry with no place due yet queues like a new request"
    promised = keys.promise_key(MODEL)
    assert redis_client.zcard(promised) == 3
    # The first place comes due; one request drained meanwhile: the place is held for its retry.
    first = redis_client.zrange(promised, 0, 0)[0]
    assert isinstance(first, bytes)
    redis_client.zadd(promised, {first: time.time() * 1000 - 100})
    redis_client.rpop(keys.queue_list_keys(keys.model_queue(MODEL))[2])
    assert admit(url, bound) > 0, "a new request does not take a place held for a retry"
    assert admit(url, bound, retry=True) == 0, "the retry takes it, bound or not"
    assert redis_client.zscore(promised, first) is None
    # Places long past their time are let go.
    redis_client.zadd(promised, {b"gone": time.time() * 1000 - 60_000})
    admit(url, bound)
    assert redis_client.zscore(promised, b"gone") is None


def test_an_empty_queue_admits_whatever_is_held_and_a_class_has_its_own_bound(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    url = redis_server.url
    redis_client.zadd(keys.promise_key(MODEL), {b"p1": time.time() * 1000, b"p2": time.time() * 1000})
    assert admit(url, (1, 0)) == 0, "nothing waits: workers must not idle for clients not back yet"
    redis_client.delete(keys.promise_key(MODEL))
    drained(redis_client, 60)
    waiting(redis_client, 4, 1)  # one low request waits
    assert admit(url, (0, 1), "low") == 1
    assert admit(url, (0, 1), "high") == 0, "the high class's own part of the queue is empty"
    assert admit(url, (0, 0), "low") == 0, "no bound at all"


@pytest.mark.parametrize(("value", "retry"), [(None, False), ("0", False), ("1", True), ("x", False)])
def test_a_retry_is_what_the_sdks_retry_count_says(value: str | None, retry: bool) -> None:
    assert parse_retry_count(value) is retry
