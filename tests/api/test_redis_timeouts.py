"""The API's Redis timeouts against a real Redis, on both event loops the API may run on: a reply that came
in time counts even when a busy loop reads it late; a frozen Redis still fails within the timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
import uvloop

from api.app import api_redis
from api.redis_breaker import RedisBreaker
from ops.redis_server import RedisServer
from queueing.settings import Settings
from tests.fleet import freeze, thaw

TIMEOUT = 0.2
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    # Its own server: the test freezes it.
    s = RedisServer()
    yield s
    s.stop()


def run(loop: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())


async def ping_while_the_loop_is_busy(server: RedisServer, client: aredis.Redis, busy: float) -> bool:
    """A PING that Redis answers well within the timeout, but whose reply waits in the socket while the loop
    is busy for ``busy`` seconds. Redis is frozen until the PING is surely out and its task waiting, so that
    the order is the same on every run."""
    await client.ping()  # connected, so the next PING is only a write and a read
    freeze(server)
    try:
        ping = asyncio.ensure_future(client.ping())
        await asyncio.sleep(TIMEOUT / 10)  # the PING is out; its task waits for the reply
    finally:
        thaw(server)  # Redis answers now
    time.sleep(busy)  # noqa: ASYNC251 (the point: a loop busy for longer than the timeout)
    return await ping


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_reply_in_time_counts_when_a_busy_loop_reads_it_late(server: RedisServer, loop: str) -> None:
    async def main() -> None:
        client, _ = api_redis(Settings(redis_url=server.url, api_redis_timeout=TIMEOUT))
        # What the API did before: redis-py's own socket timeout, which the same busy loop trips.
        plain = aredis.Redis.from_url(server.url, socket_timeout=TIMEOUT)
        try:
            assert await ping_while_the_loop_is_busy(server, client, busy=3 * TIMEOUT) is True
            with pytest.raises(redis.TimeoutError):
                await ping_while_the_loop_is_busy(server, plain, busy=3 * TIMEOUT)
        finally:
            await client.aclose()
            await plain.aclose()

    run(loop, main)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_frozen_redis_still_times_out_within_the_timeout(server: RedisServer, loop: str) -> None:
    async def main() -> None:
        client, _ = api_redis(Settings(redis_url=server.url, api_redis_timeout=TIMEOUT))
        try:
            assert await client.set("k", "v")
            freeze(server)
            try:
                for _ in range(2):  # a warm connection, then the fresh one that replaces it
                    t0 = time.monotonic()
                    with pytest.raises(redis.TimeoutError):
                        await client.get("k")
                    took = time.monotonic() - t0
                    assert TIMEOUT <= took < TIMEOUT + 0.15, took
            finally:
                thaw(server)
            assert await client.get("k") == b"v"
        finally:
            await client.aclose()

    run(loop, main)


def test_a_timeout_opens_the_breaker_until_a_ping_answers(server: RedisServer) -> None:
    """After one command timed out, the breaker says Redis is away (new requests then answer 503 at once,
    api/auth.py) until the probe's PING is answered; a slow PING while frozen keeps it open."""

    async def main() -> None:
        breaker = RedisBreaker(probe_every=0.05)
        client, _ = api_redis(Settings(redis_url=server.url, api_redis_timeout=TIMEOUT), breaker)
        breaker.attach(client)
        try:
            await client.ping()
            assert not breaker.open
            freeze(server)
            try:
                with pytest.raises(redis.TimeoutError):
                    await client.get("k")
                assert breaker.open
                await asyncio.sleep(4 * TIMEOUT)  # several probes, each timing out
                assert breaker.open
            finally:
                thaw(server)
            thawed = time.monotonic()
            while breaker.open:
                assert time.monotonic() - thawed < 2 * TIMEOUT + 0.5, "the breaker stayed open"
                await asyncio.sleep(0.01)
            assert await client.ping()
        finally:
            await breaker.close()
            await client.aclose()

    run("uvloop", main)
