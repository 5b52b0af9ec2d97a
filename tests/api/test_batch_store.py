"""Batch records in a real Redis: results written once, status moves, leases, pages."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis
import redis.asyncio as aredis

from api.batches.store import BatchStore
from api.protocol.batches import Batch, LineError, LineResponse, RequestCounts, ResultLine
from ops.redis_server import RedisServer

T = TypeVar("T")


def run(url: str, go: Callable[[BatchStore], Awaitable[T]]) -> T:
    async def main() -> T:
        client = aredis.Redis.from_url(url)
        try:
            return await go(BatchStore(client))
        finally:
            await client.aclose()

    return asyncio.run(main())


def batch(batch_id: str = "batch_1", total: int = 3) -> Batch:
    return Batch(
        id=batch_id,
        endpoint="/v1/chat/completions",
        input_file_id="file-1",
        completion_window="24h",
        status="validating",
        created_at=1,
        expires_at=86401,
        request_counts=RequestCounts(total=total),
        metadata={"k": "v"},
    )


def ok(custom_id: str, completion_tokens: int = 5) -> ResultLine:
    usage = {"prompt_tokens": 2, "completion_tokens": completion_tokens}
    response = LineResponse(status_code=200, request_id="r", body={"usage": usage})
    return ResultLine(id=f"batch_req_{custom_id}", custom_id=custom_id, response=response)


def test_each_line_counts_once(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    async def go(store: BatchStore) -> Batch | None:
        await store.create(batch())
        assert await store.record("batch_1", 0, ok("a"))
        assert not await store.record("batch_1", 0, ok("a-again", 100)), "a second result for line 0"
        failed = ResultLine(id="x", custom_id="b", error=LineError(code="batch_expired", message="late"))
        assert await store.record("batch_1", 2, failed)
        assert sorted(await store.done_lines("batch_1")) == [0, 2]
        assert (await store.results("batch_1"))[0].custom_id == "a"
        return await store.get("batch_1")

    got = run(redis_server.url, go)
    assert got is not None and got.metadata == {"k": "v"}
    assert (got.request_counts.completed, got.request_counts.failed, got.request_counts.total) == (1, 1, 3)
    assert (got.usage.input_tokens, got.usage.output_tokens, got.usage.total_tokens) == (2, 5, 7)


def test_status_moves_only_from_allowed_states(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    async def go(store: BatchStore) -> None:
        await store.create(batch())
        assert await store.active() == ["batch_1"]
        assert not await store.move("batch_1", "finalizing", ["in_progress"])
        assert await store.move("batch_1", "in_progress", ["validating"])
        assert await store.move("batch_1", "cancelling", ["validating", "in_progress"])
        files = {"output_file_id": "file-o", "error_file_id": None}
        assert await store.move("batch_1", "cancelled", ["cancelling"], **files)
        got = await store.get("batch_1")
        assert got is not None and got.status == "cancelled" and got.output_file_id == "file-o"
        assert got.error_file_id is None and got.in_progress_at and got.cancelling_at and got.cancelled_at
        assert await store.active() == [], "a finished batch is driven no more"
        assert not await store.move("nope", "in_progress", ["validating"])

    run(redis_server.url, go)


def test_one_lease_holder_at_a_time(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    async def go(store: BatchStore) -> None:
        assert await store.lease("batch_1", "p1", 0.2)
        assert not await store.lease("batch_1", "p2", 5)
        assert await store.lease("batch_1", "p1", 0.2), "the holder renews"
        await asyncio.sleep(0.3)
        assert await store.lease("batch_1", "p2", 5), "a lapsed lease is taken over"
        await store.release("batch_1", "p1")
        assert not await store.lease("batch_1", "p1", 5), "releasing another's lease does nothing"
        await store.release("batch_1", "p2")
        assert await store.lease("batch_1", "p1", 5)

    run(redis_server.url, go)


def test_pages_newest_first(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    async def go(store: BatchStore) -> list[list[str]]:
        for i in range(5):
            await store.create(batch(f"batch_{i}"))
        pages, after = [], None
        while True:
            page = await store.page(after, 2)
            pages.append([b.id for b in page.data])
            if not page.has_more:
                return pages
            after = page.last_id

    assert run(redis_server.url, go) == [["batch_4", "batch_3"], ["batch_2", "batch_1"], ["batch_0"]]
