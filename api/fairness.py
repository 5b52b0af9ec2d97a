"""Fair shares among the keys of one class: a key that used more than its share of a model's tokens lately
queues behind the other keys of its class, and its running streams give their slots up to them.

Shares are measured in tokens (prompt and completion) over the last ``window`` seconds, counted in Redis per
model, account and 5-second bucket, so every API process sees the same shares: a request counts what it may
use (its prompt's estimate and ``max_tokens``) from its admission to its end, then what it used. Counting it
from the start is what lets a key that queues thirty requests at once be seen at once, not when the first of
them ends.

A key is over its share when it holds more than ``SLACK`` times an equal split among the keys that used the
model in the window (itself included): one key sending ten times the load of three others holds 10/13 of the
tokens against an equal split of 1/4, so its requests wait on its class's second step (queueing/bands.py)
while the others' go first. Work-conserving: what the others leave is all its own.

Like deficit round robin, the unit shared is the token, not the request; unlike it, nothing of ours sits
between the queue and the workers: kombu's priority lists do the ordering, so a worker pops what it would
have popped anyway. A request costs one Lua call at admission (count and decide) and two counts at its end.
"""

from __future__ import annotations

import time

import redis.asyncio as aredis

from queueing import keys
from queueing.jobs import Job

# An equal split of the window's tokens times this is a key's share: two keys at 55/45 are both within it.
SLACK = 1.5
# A request's prompt counts this many characters a token until its end says how many it had.
CHARS_PER_TOKEN = 4

# KEYS: the model's share buckets of the window, the current one first. ARGV: the account, the slack, the
# tokens the request may use, the current bucket's TTL in seconds. Counts them to the account, then 1 when
# the account used more than its share of the tokens the buckets hold.
_ADMIT = """
redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
-- Per account over the window; a request longer than the window gives back more than its bucket still
-- holds, so a sum below 0 counts as 0.
local sums = {}
for i = 1, #KEYS do
  local flat = redis.call('HGETALL', KEYS[i])
  for j = 1, #flat, 2 do
    sums[flat[j]] = (sums[flat[j]] or 0) + tonumber(flat[j + 1])
  end
end
local total, n = 0, 0
for _, used in pairs(sums) do
  if used > 0 then
    total = total + used
    n = n + 1
  end
end
local mine = math.max(sums[ARGV[1]] or 0, 0)
if n < 2 or total <= 0 then return 0 end
if mine > tonumber(ARGV[2]) * total / n then return 1 end
return 0
"""


def expected_tokens(job: Job) -> int:
    """What a job may use: its prompt's estimate (``CHARS_PER_TOKEN``) and its ``max_tokens``."""
    chars = sum(len(m.content) for m in job.messages) + len(job.prompt or "")
    chars += sum(len(x) if isinstance(x, str) else 4 * len(x) for x in job.inputs)
    generated = 0 if job.kind in ("embedding", "count") else job.sampling.max_tokens
    return max(1, chars // CHARS_PER_TOKEN + generated)


class FairShare:
    def __init__(self, client: aredis.Redis, window: float) -> None:
        self._r = client
        self.window = window
        self._admit = client.register_script(_ADMIT)

    def _buckets(self, now: float) -> list[int]:
        last = int(now // keys.SHARE_BUCKET_SECONDS)
        span = max(1, round(self.window / keys.SHARE_BUCKET_SECONDS))
        return [last - i for i in range(span)]

    @property
    def _ttl(self) -> int:
        return int(self.window) + 2 * keys.SHARE_BUCKET_SECONDS

    async def admit(self, model: str, account: str, tokens: int) -> bool:
        """Count ``tokens`` that ``account``'s request for ``model`` may use; is the account over its share
        of the model's tokens, these included? (``returned`` them at the request's end.)"""
        if self.window <= 0:
            return False
        buckets = [keys.share_key(model, b) for b in self._buckets(time.time())]
        found = await self._admit(keys=buckets, args=[account, SLACK, tokens, self._ttl])
        return bool(found)

    async def returned(self, model: str, account: str, tokens: int) -> None:
        """A request admitted with ``tokens`` ended: what it used is counted by ``spent``."""
        await self.spent(model, account, -tokens)

    async def spent(self, model: str, account: str, tokens: int) -> None:
        """``account``'s request for ``model`` ended having used ``tokens``."""
        if self.window <= 0 or tokens == 0:
            return
        key = keys.share_key(model, self._buckets(time.time())[0])
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.hincrby(key, account, tokens)
            pipe.expire(key, self._ttl)
            await pipe.execute()
