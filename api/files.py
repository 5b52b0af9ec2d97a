"""The Files API behind ``/v1/files``: metadata in Redis, bytes in a FileStore.

Each file is its owner's (``api.auth.owner_of`` of the key that uploaded it, or of the key that created the
batch whose output it is): another key neither lists it nor reads it, and is told it does not exist.

Ids are ``file-`` + 24 hex digits: the creation time in milliseconds, then a random part that counts up
within a millisecond. The index scores each id by that time, so ids, index order and list cursors agree,
and a cursor still works after its file was deleted.
"""

from __future__ import annotations

import asyncio
import builtins
import io
import re
import secrets
import time
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import BinaryIO, Literal, cast

import redis.asyncio as aredis
from redis.typing import EncodableT, FieldT

from api import errors
from api.filestore import FileStore, FileTooLarge
from api.protocol.files import FileDeleted, FileList, FileObject
from queueing import keys
from queueing._codec import text

_ID = re.compile(r"file-([0-9a-f]{12})[0-9a-f]{12}")
# Index entries read per round trip while listing (a purpose filter may skip many).
_SCAN = 500


def _read_all(handle: BinaryIO) -> bytes:
    with handle:
        return handle.read()


def _file(raw: Mapping[bytes | str, bytes | str]) -> FileObject:
    meta = {text(k): text(v) for k, v in raw.items()}
    return FileObject(
        id=meta["id"],
        bytes=int(meta["bytes"]),
        created_at=int(meta["created_at"]),
        filename=meta["filename"],
        purpose=meta["purpose"],
    )


class Files:
    def __init__(self, client: aredis.Redis, store: FileStore, max_bytes: int) -> None:
        self._r = client
        self._store = store
        self.max_bytes = max_bytes
        self._last_ms = 0
        self._seq = 0

    def _new_id(self) -> tuple[str, int]:
        ms = max(time.time_ns() // 1_000_000, self._last_ms)
        if ms == self._last_ms:
            self._seq += 1
        else:
            # 47 random bits leave room to count up within the millisecond without a carry.
            self._last_ms, self._seq = ms, secrets.randbits(47)
        return f"file-{ms:012x}{self._seq:012x}", ms

    async def create(self, filename: str, purpose: str, source: BinaryIO, owner: str = "") -> FileObject:
        """Stores an upload; more than ``max_bytes`` is the 413 ``file_too_large``, and nothing is kept."""
        return await self._add(filename, purpose, source, self.max_bytes, owner)

    async def create_bytes(self, filename: str, purpose: str, data: bytes, owner: str = "") -> FileObject:
        """Stores a file the system made (batch output), which the upload limit does not apply to."""
        return await self._add(filename, purpose, io.BytesIO(data), len(data), owner)

    async def _add(
        self, filename: str, purpose: str, source: BinaryIO, max_bytes: int, owner: str
    ) -> FileObject:
        file_id, ms = self._new_id()
        try:
            size = await asyncio.to_thread(self._store.save, file_id, source, max_bytes)
        except FileTooLarge as exc:
            raise errors.file_too_large(exc.limit) from exc
        file = FileObject(id=file_id, bytes=size, created_at=ms // 1000, filename=filename, purpose=purpose)
        # Bytes first, then metadata: a listed file always has its bytes.
        try:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hset(keys.file_key(file_id), mapping={**_stored(file), "owner": owner})
                pipe.zadd(keys.FILES_INDEX, {file_id: ms})
                await pipe.execute()
        except BaseException:
            await asyncio.to_thread(self._store.delete, file_id)
            raise
        return file

    async def get(self, file_id: str, owner: str = "") -> FileObject:
        raw = await self._r.hgetall(keys.file_key(file_id)) if _ID.fullmatch(file_id) else {}
        if not raw or not _owned(raw, owner):
            raise errors.file_not_found(file_id)
        return _file(raw)

    async def open(self, file_id: str, owner: str = "") -> BinaryIO:
        """The file's bytes for reading (the caller closes the handle); 404 when the file is unknown."""
        await self.get(file_id, owner)
        try:
            return await asyncio.to_thread(self._store.open, file_id)
        except FileNotFoundError as exc:
            # Deleted between the metadata read and the open.
            raise errors.file_not_found(file_id) from exc

    async def read(self, file_id: str, owner: str = "") -> bytes:
        return await asyncio.to_thread(_read_all, await self.open(file_id, owner))

    async def list(
        self,
        purpose: str | None,
        limit: int,
        after: str | None,
        order: Literal["asc", "desc"],
        owner: str = "",
    ) -> FileList:
        """One page of ``owner``'s files, newest first for ``desc``; ``after`` is the last id of the
        previous page."""
        page: builtins.list[FileObject] = []
        more = False
        async with aclosing(self._walk(after, order, owner)) as walk:
            async for file in walk:
                if purpose is None or file.purpose == purpose:
                    if len(page) == limit:
                        more = True
                        break
                    page.append(file)
        return FileList(
            data=page,
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
            has_more=more,
        )

    async def _walk(
        self, after: str | None, order: Literal["asc", "desc"], owner: str
    ) -> AsyncGenerator[FileObject, None]:
        desc = order == "desc"
        start: int | str = "+inf" if desc else "-inf"
        if after is not None:
            match = _ID.fullmatch(after)
            if match is None:
                raise errors.invalid_request(f"`after` is not a file id: {after}", "after", "invalid_value")
            start = int(match.group(1), 16)
        offset = 0
        while True:
            rows = await _index_slice(self._r, desc, start, offset)
            offset += len(rows)
            # Within the cursor's millisecond the ids order the files; the cursor itself is not repeated.
            ids = [
                file_id
                for file_id, score in rows
                if after is None or score != start or (file_id < after if desc else file_id > after)
            ]
            async with self._r.pipeline(transaction=False) as pipe:
                for file_id in ids:
                    pipe.hgetall(keys.file_key(file_id))
                metas = await pipe.execute()
            for raw in metas:
                if raw and _owned(raw, owner):  # (deleted since the index was read, or another's)
                    yield _file(raw)
            if len(rows) < _SCAN:
                return

    async def delete(self, file_id: str, owner: str = "") -> FileDeleted:
        """Removes the metadata, then the bytes; 404 when the file is unknown."""
        await self.get(file_id, owner)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.delete(keys.file_key(file_id))
            pipe.zrem(keys.FILES_INDEX, file_id)
            removed, _ = await pipe.execute()
        if not removed:
            raise errors.file_not_found(file_id)
        await asyncio.to_thread(self._store.delete, file_id)
        return FileDeleted(id=file_id, deleted=True)


def _owned(raw: Mapping[bytes | str, bytes | str], owner: str) -> bool:
    stored = raw.get(b"owner", raw.get("owner", b""))
    return text(stored) == owner


def _stored(file: FileObject) -> dict[FieldT, EncodableT]:
    return {
        "id": file.id,
        "bytes": file.bytes,
        "created_at": file.created_at,
        "filename": file.filename,
        "purpose": file.purpose,
    }


async def _index_slice(
    client: aredis.Redis, desc: bool, start: int | str, offset: int
) -> list[tuple[str, float]]:
    """Up to _SCAN index entries from ``start`` (a score, or an infinite end) onwards, with their scores."""
    if desc:
        rows = await client.zrevrangebyscore(
            keys.FILES_INDEX, start, "-inf", start=offset, num=_SCAN, withscores=True
        )
    else:
        rows = await client.zrangebyscore(
            keys.FILES_INDEX, start, "+inf", start=offset, num=_SCAN, withscores=True
        )
    return [(text(member), float(score)) for member, score in cast(list[tuple[bytes, float]], rows)]
