"""Sentinel URLs, and inferq's Redis clients following a failover against a real primary, replica and three
sentinels (tests/sentinels.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from api.streams import StreamHub
from ops.redis_server import masked
from queueing import keys
from queueing.sentinel import SentinelConfig, celery_broker, close_sentinels, parse, pool_kwargs
from tests.sentinels import SentinelGroup

URL = "redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2,10.0.0.3:26380/inferq/2?sentinel_password=sp"


def test_a_sentinel_url_names_the_sentinels_the_master_and_the_passwords() -> None:
    assert parse(URL) == SentinelConfig(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380)),
        service="inferq",
        db=2,
        password="s3cret",
        sentinel_password="sp",
    )
    assert parse("redis+sentinel://h1/m") == SentinelConfig(sentinels=(("h1", 26379),), service="m")
    assert parse("redis://127.0.0.1:6379/0") is None
    with pytest.raises(ValueError, match="names no master"):
        parse("redis+sentinel://h1:26379")


def test_celery_gets_kombus_sentinel_transport_and_logs_no_password() -> None:
    broker, options = celery_broker(URL)
    assert broker == "sentinel://:s3cret@10.0.0.1:26379/2;sentinel://:s3cret@10.0.0.2:26379/2;" + (
        "sentinel://:s3cret@10.0.0.3:26380/2"
    )
    assert options["master_name"] == "inferq" and options["sentinel_kwargs"]["password"] == "sp"
    assert celery_broker("redis://127.0.0.1:6379/0") == ("redis://127.0.0.1:6379/0", {})
    assert "s3cret" not in masked(URL) and "=sp" not in masked(URL)


@pytest.fixture(scope="module")
def group() -> Iterator[SentinelGroup]:
    g = SentinelGroup()
    yield g
    g.stop()


def until(check: Any, timeout: float = 15.0) -> float:
    """Seconds until ``check()`` returned without a Redis error."""
    t0 = time.monotonic()
    while True:
        try:
            check()
            return time.monotonic() - t0
        except redis.RedisError:
            assert time.monotonic() - t0 < timeout, "never reached the new master"
            time.sleep(0.1)


def test_clients_follow_a_failover_without_being_made_again(group: SentinelGroup) -> None:
    made_sync = pool_kwargs(group.url)
    sync = redis.Redis.from_pool(redis.BlockingConnectionPool(**made_sync, timeout=2))  # type: ignore[no-untyped-call]

    async def main() -> None:
        made = pool_kwargs(group.url, asyncio=True)
        client = aredis.Redis.from_pool(aredis.ConnectionPool(**made))  # closing it closes the pool
        hub = StreamHub(group.url, reconnect_delay=0.1, keepalive=0.2, dead_after=1.0)
        await hub.start()
        try:
            assert sync.set("before", 1) and await client.get("before") == b"1"
            await asyncio.to_thread(group.fail_over)
            took = await asyncio.to_thread(until, lambda: sync.set("after", 1))
            for _ in range(150):
                try:
                    assert await client.get("after") == b"1"
                    break
                except redis.RedisError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail("the asyncio client never reached the new master")
            # The pub/sub connection found the new master too: a publish there reaches a subscriber.
            for _ in range(150):
                if hub.connected:
                    break
                await asyncio.sleep(0.1)
            async with hub.subscribe("job-1") as sub:
                await client.publish(keys.stream_channel("job-1"), b"hello")
                assert await sub.get(5) == b"hello"
            print(f"\nsync client wrote to the new master {took:.2f} s after the promotion")  # noqa: T201
        finally:
            await hub.close()
            await client.aclose()
            await close_sentinels(made)

    try:
        asyncio.run(main())
    finally:
        sync.close()
        for client in made_sync["sentinel"].sentinels:
            client.close()


class Answers:
    """Stands in for the sentinels' answer: first the replica (a master that a failover demoted and that
    came back as a replica), then the real master."""

    def __init__(self, *addresses: tuple[str, int]) -> None:
        self.addresses = list(addresses)

    def discover_master(self, service: str) -> tuple[str, int]:
        return self.addresses.pop(0) if len(self.addresses) > 1 else self.addresses[0]


def test_a_demoted_master_is_left_for_the_one_the_sentinels_name() -> None:
    group = SentinelGroup(sentinels=1)
    try:
        replica, primary = ("127.0.0.1", group.replica.port), group.master()
        kwargs = {**pool_kwargs(group.url), "sentinel": Answers(replica, primary)}
        retry = Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
        client = redis.Redis.from_pool(redis.ConnectionPool(**kwargs, retry=retry))
        try:
            # The replica answers READONLY: the connection is closed and the retry reconnects, to the master.
            assert client.set("k", "v")
            assert client.connection_pool.get_connection().port == primary[1]
        finally:
            client.close()
    finally:
        group.stop()
