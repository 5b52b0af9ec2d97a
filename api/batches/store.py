"""Batch records in Redis: the batch object, its line results (each written once), and the lease that lets
one API process at a time drive a batch. Everything a restarted API process needs to carry on is here."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any, cast

import redis.asyncio as aredis

from api.leases import Leases
from api.protocol.batches import (
    TERMINAL,
    Batch,
    BatchErrors,
    BatchList,
    BatchStatus,
    BatchUsage,
    RequestCounts,
    ResultLine,
)
from api.usage import ANONYMOUS, Account
from queueing import keys
from queueing._codec import text

# KEYS: batch, active set. ARGV: new status, now, JSON list of the statuses it may move from, "1" when the new
# status is terminal, batch id, then field/value pairs. Sets ``<status>_at`` with the status, as the batch
# object has a timestamp per status; a terminal status takes the batch off the active set in the same step.
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
for _, from in ipairs(cjson.decode(ARGV[3])) do
  if from == status then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[1] .. '_at', ARGV[2], unpack(ARGV, 6))
    if ARGV[4] == '1' then redis.call('SREM', KEYS[2], ARGV[5]) end
    return 1
  end
end
return 0
"""

# KEYS: results, batch. ARGV: line index, result, counter to bump, input tokens, output tokens.
# A result already there wins: a line that ran twice (its worker died after finishing) counts once.
_RECORD = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
redis.call('HINCRBY', KEYS[2], 'input_tokens', ARGV[4])
redis.call('HINCRBY', KEYS[2], 'output_tokens', ARGV[5])
return 1
"""

# KEYS: lease. ARGV: holder token, ttl ms. Takes a free lease or extends one's own.
# The fields set at creation, kept as one JSON document; the rest are hash fields of their own.
_STATIC = {
    "id",
    "endpoint",
    "model",
    "input_file_id",
    "completion_window",
    "created_at",
    "expires_at",
    "metadata",
}
_TIMES = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


class BatchStore:
    def __init__(self, client: aredis.Redis) -> None:
        self._r = client
        self._transition = client.register_script(_TRANSITION)
        self._record = client.register_script(_RECORD)
        self._leases = Leases(client)

    async def create(self, batch: Batch, owner: str = "", account: Account = ANONYMOUS) -> None:
        """``owner``: the creator's (api.auth.owner_of); only its key sees the batch and its files. Its
        lines' usage counts to ``account`` (api/usage.py)."""
        key = keys.batch_key(batch.id)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    "doc": batch.model_dump_json(include=_STATIC),
                    "status": batch.status,
                    "total": batch.request_counts.total,
                    "completed": 0,
                    "failed": 0,
                    "input_tokens": 0,
                    "output_tokens": 0,
                    "owner": owner,
                    "account_id": account.id,
                    "account_name": account.name,
                },
            )
            pipe.zadd(keys.BATCHES_INDEX, {batch.id: time.time()})
            pipe.sadd(keys.BATCHES_ACTIVE, batch.id)
            await pipe.execute()

    async def get(self, batch_id: str, owner: str | None = None) -> Batch | None:
        """The batch; None if there is none, or (``owner`` given) it is another key's."""
        raw = await self._r.hgetall(keys.batch_key(batch_id))
        if not raw:
            return None
        h = {text(k): text(v) for k, v in raw.items()}
        if owner is not None and h.get("owner", "") != owner:
            return None
        return _batch(h)

    async def account(self, batch_id: str) -> Account:
        found = await self._r.hmget(keys.batch_key(batch_id), ["account_id", "account_name"])
        if found[0] is None or found[1] is None:
            return ANONYMOUS
        return Account(text(found[0]), text(found[1]))

    async def owner(self, batch_id: str) -> str:
        raw = await self._r.hget(keys.batch_key(batch_id), "owner")
        return "" if raw is None else text(raw)

    async def page(self, after: str | None, limit: int, owner: str = "") -> BatchList:
        """``owner``'s batches, newest first; ``after`` is the last id of the previous page."""
        start = 0
        if after is not None:
            rank = cast(int | None, await self._r.zrevrank(keys.BATCHES_INDEX, after))
            start = 0 if rank is None else rank + 1
        found: list[Batch] = []
        more = False
        # Read in slices, skipping other keys' batches, until the page and one more are found.
        while not more:
            raw = cast(list[bytes], await self._r.zrevrange(keys.BATCHES_INDEX, start, start + 99))
            start += len(raw)
            for batch_id in (text(i) for i in raw):
                batch = await self.get(batch_id, owner)
                if batch is None:
                    continue
                if len(found) == limit:
                    more = True
                    break
                found.append(batch)
            if len(raw) < 100:
                break
        return BatchList(
            data=found,
            first_id=found[0].id if found else None,
            last_id=found[-1].id if found else None,
            has_more=more,
        )

    async def active(self) -> list[str]:
        return sorted(text(m) for m in await self._r.smembers(keys.BATCHES_ACTIVE))

    async def move(
        self, batch_id: str, status: BatchStatus, allowed_from: Iterable[str], **fields: str | None
    ) -> bool:
        """Change the status if it is one of ``allowed_from``, stamping ``<status>_at`` and setting
        ``fields``; a terminal status also takes the batch off the active set."""
        pairs = [v for k, val in fields.items() if val is not None for v in (k, val)]
        terminal = "1" if status in TERMINAL else "0"
        args = [status, int(time.time()), json.dumps(list(allowed_from)), terminal, batch_id, *pairs]
        return bool(await self._transition(keys=[keys.batch_key(batch_id), keys.BATCHES_ACTIVE], args=args))

    async def retire(self, batch_id: str) -> None:
        """Take a batch that has ended off the active set."""
        await self._r.srem(keys.BATCHES_ACTIVE, batch_id)

    async def record(self, batch_id: str, index: int, result: ResultLine) -> bool:
        """Write line ``index``'s result unless one is there; True when this call wrote it."""
        usage = (result.response.body.get("usage") or {}) if result.response else {}
        args: list[str | int] = [
            index,
            result.model_dump_json(),
            "completed" if result.ok else "failed",
            int(usage.get("prompt_tokens", 0)),
            int(usage.get("completion_tokens", 0)),
        ]
        return bool(
            await self._record(keys=[keys.batch_results_key(batch_id), keys.batch_key(batch_id)], args=args)
        )

    async def results(self, batch_id: str) -> dict[int, ResultLine]:
        raw = await self._r.hgetall(keys.batch_results_key(batch_id))
        return {int(k): ResultLine.model_validate_json(v) for k, v in raw.items()}

    async def done_lines(self, batch_id: str) -> set[int]:
        return {int(k) for k in await self._r.hkeys(keys.batch_results_key(batch_id))}

    async def status(self, batch_id: str) -> str | None:
        raw = await self._r.hget(keys.batch_key(batch_id), "status")
        return text(raw) if raw is not None else None

    async def lease(self, batch_id: str, holder: str, seconds: float) -> bool:
        return await self._leases.take(keys.batch_lease_key(batch_id), holder, seconds)

    async def release(self, batch_id: str, holder: str) -> None:
        await self._leases.release(keys.batch_lease_key(batch_id), holder)


def _batch(h: dict[str, str]) -> Batch:
    doc: dict[str, Any] = json.loads(h["doc"])
    done = int(h.get("completed", 0)), int(h.get("failed", 0))
    tokens = int(h.get("input_tokens", 0)), int(h.get("output_tokens", 0))
    return Batch(
        **doc,
        status=h["status"],
        **{t: int(h[t]) for t in _TIMES if t in h},
        output_file_id=h.get("output_file_id"),
        error_file_id=h.get("error_file_id"),
        errors=BatchErrors.model_validate_json(h["errors"]) if "errors" in h else None,
        request_counts=RequestCounts(total=int(h.get("total", 0)), completed=done[0], failed=done[1]),
        usage=BatchUsage(input_tokens=tokens[0], output_tokens=tokens[1], total_tokens=sum(tokens)),
    )
