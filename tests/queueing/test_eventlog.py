"""A streamed job's event log against a real Redis: what the worker's script logs is what it publishes, under
the same id; a superseded attempt can do neither; a reader takes the log from any id on."""

from __future__ import annotations

import asyncio
import json

import redis
import redis.asyncio as aredis

from ops.redis_server import RedisServer
from queueing import eventlog, keys
from queueing.eventlog import Channel, EventId


def emit(client: redis.Redis, channel: Channel, payload: str) -> int:
    script = client.register_script(eventlog.EMIT)
    assert channel.log is not None
    return int(script(keys=[channel.log, channel.name], args=[channel.next_id(), payload, 100, 60_000]))


def test_logged_events_are_published_with_their_ids_and_read_back_from_any_id(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    pubsub = redis_client.pubsub()
    pubsub.subscribe(keys.stream_channel("j1"))
    assert pubsub.get_message(timeout=1) is not None  # the subscribe confirmation
    channel = Channel("j1", attempt=1, logged=True)
    for text in ("a", "b", "c"):
        assert emit(redis_client, channel, json.dumps({"t": text})) == 1
    live = [pubsub.get_message(timeout=1)["data"] for _ in range(3)]
    assert live == [b'1-1 {"t": "a"}', b'1-2 {"t": "b"}', b'1-3 {"t": "c"}']
    assert [eventlog.split(m) for m in live][1] == (EventId(1, 2), b'{"t": "b"}')
    assert 0 < redis_client.pttl(keys.job_events_key("j1")) <= 60_000

    async def read(after: EventId) -> list[bytes]:
        client = aredis.Redis.from_url(redis_server.url)
        try:
            return await eventlog.read_after(client, "j1", after)
        finally:
            await client.aclose()

    assert asyncio.run(read(eventlog.START)) == live
    assert asyncio.run(read(EventId(1, 2))) == live[2:]
    assert asyncio.run(read(EventId(1, 3))) == []
    pubsub.close()


def test_a_superseded_attempt_can_neither_log_nor_publish(redis_client: redis.Redis) -> None:
    old, new = Channel("j2", attempt=1, logged=True), Channel("j2", attempt=2, logged=True)
    assert emit(redis_client, old, "{}") == 1
    assert emit(redis_client, new, "{}") == 1
    pubsub = redis_client.pubsub()
    pubsub.subscribe(keys.stream_channel("j2"))
    assert pubsub.get_message(timeout=1) is not None
    # The worker of attempt 1 still runs (its heartbeat lapsed, it was re-queued): Redis refuses its id.
    assert emit(redis_client, old, "{}") == 0
    assert pubsub.get_message(timeout=0.3) is None
    entries = [e for e, _ in redis_client.xrange(keys.job_events_key("j2")) or []]
    assert entries == [b"1-1", b"2-1"]
    pubsub.close()


def test_ids_order_as_the_log_does_and_unlogged_messages_have_none() -> None:
    assert EventId(1, 9) < EventId(1, 10) < EventId(2, 1)
    assert EventId.parse("3-14") == EventId(3, 14) and str(EventId(3, 14)) == "3-14"
    assert EventId.parse("x-1") is None and EventId.parse("12") is None
    assert eventlog.split(b'{"type": "started"}') == (None, b'{"type": "started"}')
