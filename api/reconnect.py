"""The reconnect grace of a resumable stream (api/resume.py): when its client leaves, its job is due for
cancelling ``stream_reconnect_grace`` seconds later, unless the client comes back first. The due times are a
sorted set in Redis (scored by Redis' own clock), so whichever API process sweeps first cancels the job, also
when the process the client left is gone."""

from __future__ import annotations

import redis.asyncio as aredis

from queueing import keys
from queueing._codec import text
from queueing.jobstore import AsyncJobStore

# KEYS: the cancel-after set. ARGV: job id, grace ms. A streamed job whose client left, due for cancelling.
_CANCEL_LATER = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[2]), ARGV[1])
"""

# KEYS: the cancel-after set. ARGV: most to take. Takes the due ones off the set, so each is cancelled once
# whichever API process sweeps.
_DUE_CANCELS = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[1])
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return due
"""


class ReconnectGrace:
    def __init__(self, client: aredis.Redis, store: AsyncJobStore) -> None:
        self._r = client
        self._store = store
        self._later = client.register_script(_CANCEL_LATER)
        self._due = client.register_script(_DUE_CANCELS)

    async def left(self, job_id: str, grace: float) -> None:
        """The job's client left: cancel the job ``grace`` seconds from now."""
        await self._later(keys=[keys.CANCEL_AFTER], args=[job_id, int(grace * 1000)])

    async def came_back(self, job_id: str) -> None:
        """Its client resumed the stream: the job is no longer due for cancelling."""
        await self._r.zrem(keys.CANCEL_AFTER, job_id)

    async def cancel_due(self, limit: int = 100) -> list[str]:
        """Cancels the jobs whose grace ran out; their ids."""
        due = [text(j) for j in await self._due(keys=[keys.CANCEL_AFTER], args=[limit])]
        for job_id in due:
            await self._store.cancel(job_id)
        return due
