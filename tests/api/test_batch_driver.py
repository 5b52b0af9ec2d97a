"""The batch driver's recovery paths against a real Redis, with stand-ins for the files and the fleet: what a
process taking a batch over finds and does."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import redis
import redis.asyncio as aredis

from api import errors
from api.batches.driver import BatchDriver
from api.batches.store import BatchStore
from api.jobs import Limits
from api.protocol.batches import Batch, LineResponse, ResultLine
from api.protocol.files import FileObject
from ops.redis_server import RedisServer
from queueing import keys
from queueing.catalog import Catalog
from queueing.settings import Settings
from tests.api.test_batch_store import batch


class Files:
    """Holds files in memory; ``read`` of an unknown id is the API's 404."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def read(self, file_id: str, owner: str = "") -> bytes:
        if file_id not in self.data:
            raise errors.file_not_found(file_id)
        return self.data[file_id]

    async def create_bytes(self, filename: str, purpose: str, data: bytes, owner: str = "") -> FileObject:
        file_id = f"file-{len(self.data)}"
        self.data[file_id] = data
        return FileObject(id=file_id, bytes=len(data), created_at=0, filename=filename, purpose=purpose)


def drive(url: str, go: Callable[[BatchDriver, BatchStore, Files], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        client = aredis.Redis.from_url(url)
        store, files = BatchStore(client), Files()
        fleet: Any = SimpleNamespace(limits=Limits(60, 1, 0.05))
        driver = BatchDriver(store, files, fleet, Catalog(models={}), Settings())  # type: ignore[arg-type]
        try:
            return await go(driver, store, files)
        finally:
            await client.aclose()

    return asyncio.run(main())


def result(custom_id: str, status: int = 200) -> ResultLine:
    return ResultLine(
        id=f"batch_req_{custom_id}",
        custom_id=custom_id,
        response=LineResponse(status_code=status, request_id="r", body={}),
    )


def test_input_file_gone_fails_the_batch(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    async def go(driver: BatchDriver, store: BatchStore, files: Files) -> Batch | None:
        await store.create(batch())
        await driver._drive("batch_1")
        return await store.get("batch_1")

    got = drive(redis_server.url, go)
    assert got is not None and got.status == "failed" and got.failed_at
    assert got.errors and got.errors.data[0].code == "file_not_found"
    assert got.errors.data[0].param == "input_file_id"
    assert redis_client.smembers(keys.BATCHES_ACTIVE) == set()


def test_a_batch_left_finalizing_is_finished_by_the_next_holder(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    async def go(driver: BatchDriver, store: BatchStore, files: Files) -> tuple[Batch | None, Files]:
        await store.create(batch(total=3))
        for i, (name, status) in enumerate([("a", 200), ("b", 404), ("c", 200)]):
            await store.record("batch_1", i, result(name, status))
        await store.move("batch_1", "in_progress", ["validating"])
        await store.move("batch_1", "finalizing", ["in_progress"])
        await driver._drive("batch_1")  # the holder that moved it to finalizing died before the files
        return await store.get("batch_1"), files

    got, files = drive(redis_server.url, go)
    assert got is not None and got.status == "completed" and got.completed_at
    assert got.output_file_id and got.error_file_id
    output = files.data[got.output_file_id].decode().splitlines()
    assert [ResultLine.model_validate_json(x).custom_id for x in output] == ["a", "c"]
    assert ResultLine.model_validate_json(files.data[got.error_file_id]).custom_id == "b"


def test_an_ended_batch_still_listed_active_is_dropped(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    async def go(driver: BatchDriver, store: BatchStore, files: Files) -> tuple[list[str], Files]:
        await store.create(batch())
        await store.move("batch_1", "cancelling", ["validating"])
        await store.move("batch_1", "cancelled", ["cancelling"])
        # Ended, yet still in the active set (a crash between the two steps could leave this before the
        # status move took the batch off the set itself).
        redis_client.sadd(keys.BATCHES_ACTIVE, "batch_1")
        await driver._drive("batch_1")
        return await store.active(), files

    active, files = drive(redis_server.url, go)
    assert active == [] and files.data == {}, "nothing is run or written again"
