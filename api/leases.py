"""Leases in Redis: which API process drives a long-lived piece of work (a batch, a background response).

A holder renews its lease while it works; when its process dies the lease lapses and another process takes
the work over. Both steps are one Lua script each, so a renewal never overwrites another holder's lease.
"""

from __future__ import annotations

import redis.asyncio as aredis

_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Leases:
    def __init__(self, client: aredis.Redis) -> None:
        self._lease = client.register_script(_LEASE)
        self._release = client.register_script(_RELEASE)

    async def take(self, key: str, holder: str, seconds: float) -> bool:
        """Take the lease at ``key``, or renew it when ``holder`` has it; False while another holds it."""
        args: list[str | int] = [holder, int(seconds * 1000)]
        return bool(await self._lease(keys=[key], args=args))

    async def release(self, key: str, holder: str) -> None:
        await self._release(keys=[key], args=[holder])
