"""The API's pub/sub hub against a real Redis: confirmed subscriptions, fan-out, reconnecting."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis

from api.streams import StreamHub
from ops.redis_server import RedisServer
from queueing import keys


async def _eventually(check: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Polls state held by another process (Redis), which nothing here can await."""
    for _ in range(int(seconds / 0.05)):
        if check():
            return True
        await asyncio.sleep(0.05)
    return check()


def _subscribers(r: redis.Redis, request_id: str) -> int:
    return int(r.pubsub_numsub(keys.stream_channel(request_id))[0][1])


async def _publish_later(url: str, channel: str, *payloads: bytes) -> None:
    def go() -> None:
        r = redis.Redis.from_url(url)
        for p in payloads:
            r.publish(channel, p)
        r.close()

    await asyncio.to_thread(go)


def test_each_subscription_gets_only_its_own_channel(redis_server: RedisServer) -> None:
    async def main() -> None:
        hub = StreamHub(redis_server.url)
        await hub.start()
        try:
            async with hub.subscribe("a") as a, hub.subscribe("b") as b:
                await _publish_later(redis_server.url, keys.stream_channel("a"), b"1", b"2")
                await _publish_later(redis_server.url, keys.stream_channel("b"), b"x")
                assert [await a.get(2), await a.get(2)] == [b"1", b"2"]
                assert await b.get(2) == b"x"
                assert await a.get(0.05) is None
            # Unsubscribed: Redis no longer routes the channel to this connection.
            r = redis.Redis.from_url(redis_server.url)
            assert await _eventually(lambda: _subscribers(r, "a") == 0)
        finally:
            await hub.close()

    asyncio.run(main())


def test_hub_resubscribes_after_redis_restarts() -> None:
    server = RedisServer()
    port = server.port

    async def main() -> None:
        nonlocal server
        hub = StreamHub(server.url, reconnect_delay=0.1)
        await hub.start()
        try:
            async with hub.subscribe("r") as sub:
                server.stop()
                server = RedisServer(port=port)
                r = redis.Redis.from_url(server.url)
                assert await _eventually(lambda: _subscribers(r, "r") == 1), "hub did not resubscribe"
                await _publish_later(server.url, keys.stream_channel("r"), b"after")
                assert await sub.get(2) == b"after"
        finally:
            await hub.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()
