"""Fair shares among the keys of one class: a key that uses more than its share of a model lately queues
behind the other keys of its class, and its running streams give their slots up to them.

Two measures, both in tokens (prompt and completion) and both in Redis, so every API process sees the same:

- *used*: what each key's requests used of a model over the last ``window`` seconds (counted per 5-second
  bucket when each request ends);
- *held*: what each key's requests in flight may use (their prompt's estimate plus ``max_tokens``), counted
  from admission to end. This is what sees a key that queues thirty requests at once, at once, rather than
  when the first of them ends.

A key is over its share when either exceeds ``SLACK`` times an equal split among the keys that used or hold
the model (itself included): one key sending ten times the load of three others uses 10/13 of the tokens
against an equal split of 1/4, so its requests wait on its class's second step (queueing/bands.py) while the
others' go first, and its streams give their slots up to them. A key with a single request in flight is
never over by what it holds (equal keys taking turns would otherwise each look over while the others think).

A key with more requests of a class in flight than its equal split of the workers' slots among the keys with
requests of that class (at least one) is *queued*: what it adds would wait behind its own requests anyway, so
it waits on the second step too, and a key that comes later goes first. This is what holds when the heavy key
was alone until then, so that no split of the tokens made it over its share: its backlog does not stand in
front of the newcomer. Such a job gives its slot up only as a normal one does (until its first token), so a
key alone does not churn its own streams. Work-conserving: what the others leave is all the heavy key's.

Like deficit round robin, the unit shared is the token, not the request; unlike it, nothing of ours sits
between the queue and the workers: kombu's priority lists do the ordering, so a worker pops what it would
have popped anyway. A request costs one Lua call at admission and two short writes at its end.
"""

from __future__ import annotations

import time

import redis.asyncio as aredis

from queueing import keys
from queueing.jobs import Job, Priority, Share
from queueing.prefixes import estimated_tokens

# An equal split of the window's tokens times this is a key's share: two keys at 55/45 are both within it.
SLACK = 1.5
SHARES: tuple[Share, ...] = ("within", "over", "queued")

# KEYS: the model's used-token buckets of the window, then its held tokens (a zset: "<account>\t<tokens>\t
# <class>\t<job id>" -> when it is given up for lost, ms). ARGV: the account, the slack, the request's
# member, ms it may be held, the slots of the workers serving the model, the request's class. Holds the
# request's tokens, then 1 when the account is over its share of the tokens, 2 when only of the slots (split
# among the keys with requests of its class: classes do not wait behind each other's backlogs anyway), 0
# when within both.
_ADMIT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local held_key, hold = KEYS[#KEYS], tonumber(ARGV[4])
-- A member an API process that died never gave back counts until it is given up for lost.
redis.call('ZREMRANGEBYSCORE', held_key, '-inf', now)
redis.call('ZADD', held_key, now + hold, ARGV[3])
if redis.call('PTTL', held_key) < hold then redis.call('PEXPIRE', held_key, hold) end
local used, held, requests, in_class, seen = {}, {}, {}, {}, {}
for i = 1, #KEYS - 1 do
  local flat = redis.call('HGETALL', KEYS[i])
  for j = 1, #flat, 2 do used[flat[j]] = (used[flat[j]] or 0) + tonumber(flat[j + 1]) end
end
for _, member in ipairs(redis.call('ZRANGE', held_key, 0, -1)) do
  local account, tokens, class = string.match(member, '^(.-)\t(%d+)\t(.-)\t')
  held[account] = (held[account] or 0) + tonumber(tokens)
  requests[account] = (requests[account] or 0) + 1
  if class == ARGV[6] then in_class[account] = (in_class[account] or 0) + 1 end
end
local n, total_used, total_held = 0, 0, 0
for account, v in pairs(used) do
  if v > 0 then
    total_used = total_used + v
    if not seen[account] then seen[account] = true; n = n + 1 end
  end
end
for account, v in pairs(held) do
  total_held = total_held + v
  if not seen[account] then seen[account] = true; n = n + 1 end
end
local me, slack = ARGV[1], tonumber(ARGV[2])
if (used[me] or 0) > slack * total_used / n then return 1 end
if (requests[me] or 0) > 1 and held[me] > slack * total_held / n then return 1 end
-- More requests in flight than its split of the slots: the rest would wait behind its own anyway, and a key
-- that comes later goes first (also when this key was alone: the others are not known yet).
local keys_in_class = 0
for _ in pairs(in_class) do keys_in_class = keys_in_class + 1 end
if (in_class[me] or 0) > math.max(1, tonumber(ARGV[5]) / keys_in_class) then return 2 end
return 0
"""


def expected_tokens(job: Job) -> int:
    """What a job may use: its prompt's estimate (the one affinity routing uses) and its ``max_tokens``."""
    texts = [m.content for m in job.messages] + [job.prompt or ""]
    prompt = sum(estimated_tokens(t) for t in texts)
    prompt += sum(estimated_tokens(x) if isinstance(x, str) else len(x) for x in job.inputs)
    generated = 0 if job.kind in ("embedding", "count") else job.sampling.max_tokens
    return max(1, prompt + generated)


class FairShare:
    def __init__(self, client: aredis.Redis, window: float, hold_seconds: float = 3600.0) -> None:
        self._r = client
        self.window = window
        # Longer than any request: a held request that was never given back is given up after it.
        self.hold_seconds = hold_seconds
        self._admit = client.register_script(_ADMIT)

    def _buckets(self, now: float) -> list[int]:
        last = int(now // keys.SHARE_BUCKET_SECONDS)
        span = max(1, round(self.window / keys.SHARE_BUCKET_SECONDS))
        return [last - i for i in range(span)]

    async def admit(
        self, model: str, account: str, tokens: int, request: str, slots: int, priority: Priority
    ) -> Share:
        """Hold ``tokens`` that ``account``'s request ``request`` for ``model`` may use, until ``release``;
        is the account over its share? ``slots``: how many jobs the workers serving the model run at once."""
        if self.window <= 0:
            return "within"
        buckets = [keys.share_key(model, b) for b in self._buckets(time.time())]
        found = await self._admit(
            keys=[*buckets, keys.share_held_key(model)],
            args=[
                account,
                SLACK,
                _member(account, tokens, priority, request),
                int(self.hold_seconds * 1000),
                slots,
                priority,
            ],
        )
        return SHARES[int(found)]

    async def release(self, model: str, account: str, held: int, request: str, priority: Priority) -> None:
        """The request admitted holding ``held`` tokens ended."""
        if self.window > 0:
            await self._r.zrem(keys.share_held_key(model), _member(account, held, priority, request))

    async def spent(self, model: str, account: str, used: int) -> None:
        """``account``'s request for ``model`` ended having used ``used`` tokens."""
        if self.window <= 0 or used <= 0:
            return
        key = keys.share_key(model, self._buckets(time.time())[0])
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.hincrby(key, account, used)
            pipe.expire(key, int(self.window) + 2 * keys.SHARE_BUCKET_SECONDS)
            await pipe.execute()


def _member(account: str, tokens: int, priority: Priority, request: str) -> str:
    return f"{account}\t{tokens}\t{priority}\t{request}"


def held_tokens(member: str) -> int:
    """The tokens a held member (``_member``) holds (counted from the right, past the job id and class)."""
    return int(member.rsplit("\t", 3)[1])
