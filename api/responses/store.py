"""Stored Responses API objects in Redis: the response, the conversation it saw, who may read it, and the
event log of a background response (replayable from any sequence number).

A response is visible only to the API key that created it: the record keeps a hash of the key (never the
key), and a lookup with another key finds nothing, exactly as a missing response.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aredis
from pydantic import BaseModel, Field

from api.protocol.responses import ResponseObject
from queueing import keys
from queueing._codec import text


class StoredResponse(BaseModel):
    owner: str
    response: ResponseObject
    # The items the model saw for this response, each with an id: the stored conversation of
    # previous_response_id, its output, then this request's own input.
    context: list[dict[str, Any]] = Field(default_factory=list)
    # The job that generates it (cancelling a background response cancels it).
    job_id: str | None = None
    # A background response's request, so that another API process can take over driving it.
    request: dict[str, Any] | None = None


# KEYS: the stored response. ARGV: the new one, its TTL in seconds. Saved unless a cancel landed first.
_SAVE_UNLESS_CANCELLED = """
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current).response.status == 'cancelled' then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


class ResponseStore:
    def __init__(self, client: aredis.Redis, ttl: int, max_block_ms: int = 200) -> None:
        self._r = client
        self.ttl = ttl
        self._save_unless_cancelled = client.register_script(_SAVE_UNLESS_CANCELLED)
        # A blocking read must end well inside the client's socket timeout, or the wait itself reads as
        # Redis being unavailable (the API's client times out after ``api_redis_timeout``).
        self.max_block_ms = max(1, max_block_ms)

    async def save(self, stored: StoredResponse) -> None:
        key = keys.response_key(stored.response.id)
        await self._r.set(key, stored.model_dump_json(), ex=self.ttl)

    async def save_unless_cancelled(self, stored: StoredResponse) -> bool:
        """``save``, in one step with the check: a cancel that lands between a read and a write would
        otherwise be overwritten by the state it cancelled. False if the response was cancelled."""
        key = keys.response_key(stored.response.id)
        args: list[str | int] = [stored.model_dump_json(), self.ttl]
        return bool(await self._save_unless_cancelled(keys=[key], args=args))

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        stored = await self.peek(response_id)
        return stored if stored is not None and stored.owner == owner else None

    async def peek(self, response_id: str) -> StoredResponse | None:
        """Whoever owns it: for the server's own bookkeeping, never for a client."""
        raw = await self._r.get(keys.response_key(response_id))
        return None if raw is None else StoredResponse.model_validate_json(raw)

    async def delete(self, response_id: str, owner: str) -> bool:
        if await self.get(response_id, owner) is None:
            return False
        await self._r.delete(keys.response_key(response_id), keys.response_events_key(response_id))
        return True

    # --- a background response's event log ---

    async def append(self, response_id: str, sequence_number: int, event: dict[str, Any]) -> None:
        """Log one event. Entry ids are the sequence numbers (+1: Redis refuses 0-0), so a replay reads
        from any number directly, and an event logged twice (a new holder repeating one) is refused."""
        key = keys.response_events_key(response_id)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.xadd(key, {"e": json.dumps(event)}, id=f"{sequence_number + 1}-0")
            pipe.expire(key, self.ttl)
            await pipe.execute(raise_on_error=False)

    async def events_after(
        self, response_id: str, after: int, block_ms: int | None = None
    ) -> list[tuple[int, dict[str, Any]]]:
        """Logged events with a sequence number above ``after``, waiting up to ``block_ms`` for one."""
        key = keys.response_events_key(response_id)
        block = None if block_ms is None else min(block_ms, self.max_block_ms)
        found: Any = await self._r.xread({key: f"{after + 1}-0"}, count=256, block=block)
        out: list[tuple[int, dict[str, Any]]] = []
        for _, entries in found or []:
            for entry_id, fields in entries:
                out.append((int(text(entry_id).split("-")[0]) - 1, json.loads(fields[b"e"])))
        return out
