"""The API's Redis pool against a real Redis: what a burst opened is closed once idle, down to a floor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
import redis.asyncio as aredis

from api.redis_pool import ShrinkingPool
from ops.redis_server import RedisServer

BURST = 20
NAME = "pool-under-test"


def _open_here(url: str) -> int:
    """Connections Redis sees from this pool (named with CLIENT SETNAME through client_name)."""
    r = redis.Redis.from_url(url)
    try:
        return sum(1 for c in r.client_list() if c.get("name") == NAME)
    finally:
        r.close()


@asynccontextmanager
async def _burst_pool(url: str) -> AsyncIterator[tuple[ShrinkingPool, aredis.Redis]]:
    """A pool and its client, after a burst that opened ``BURST`` connections."""
    pool = ShrinkingPool.from_url(url, max_connections=64, client_name=NAME)
    client = aredis.Redis.from_pool(pool)
    try:
        await _burst(client)
        yield pool, client
    finally:
        await client.aclose()


async def _burst(client: aredis.Redis) -> None:
    # BLPOP with a timeout holds its connection, so the pool must open one per caller.
    await asyncio.gather(*(client.blpop([f"nothing-{i}"], timeout=0.2) for i in range(BURST)))


def test_shrink_closes_idle_connections_beyond_the_floor(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with _burst_pool(redis_server.url) as (pool, client):
            assert _open_here(redis_server.url) == BURST
            # Not idle long enough yet: nothing closes.
            assert await pool.shrink(idle_for=60.0, keep=4) == 0
            assert _open_here(redis_server.url) == BURST
            assert await pool.shrink(idle_for=0.0, keep=4) == BURST - 4
            assert _open_here(redis_server.url) == 4
            # The pool still serves, and opens again what a new burst needs.
            assert await client.ping()
            await _burst(client)
            assert _open_here(redis_server.url) == BURST

    asyncio.run(main())


def test_a_connection_in_use_is_never_closed(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with _burst_pool(redis_server.url) as (pool, client):

            async def wait() -> object:
                return await client.blpop(["still-waiting"], timeout=1.0)

            held = asyncio.create_task(wait())
            await asyncio.sleep(0.2)
            assert await pool.shrink(idle_for=0.0, keep=0) == BURST - 1
            assert _open_here(redis_server.url) == 1
            assert await held is None  # its command ran to its own timeout on the connection kept

    asyncio.run(main())
