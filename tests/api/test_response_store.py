"""Stored responses in a real Redis: a cancel is never overwritten by the state it cancelled."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aredis

from api.protocol.responses import ResponseObject, ResponsesRequest
from api.responses.store import ResponseStore, StoredResponse
from ops.redis_server import RedisServer
from queueing import keys


def stored(status: str) -> StoredResponse:
    request = ResponsesRequest(model="m", input="hi")
    response = ResponseObject.from_request(request, id="resp_1", status=status)
    return StoredResponse(owner="o", response=response)


def test_a_save_unless_cancelled_leaves_a_cancelled_response_cancelled(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    async def main() -> tuple[bool, bool, str | None]:
        client = aredis.Redis.from_url(redis_server.url)
        store = ResponseStore(client, ttl=60)
        try:
            await store.save(stored("queued"))
            moved = await store.save_unless_cancelled(stored("in_progress"))
            await store.save(stored("cancelled"))
            overwritten = await store.save_unless_cancelled(stored("completed"))
            kept = await store.peek("resp_1")
            return moved, overwritten, None if kept is None else kept.response.status
        finally:
            await client.aclose()

    assert asyncio.run(main()) == (True, False, "cancelled")
    assert 0 < redis_client.ttl(keys.response_key("resp_1")) <= 60
