"""Bounded queues: a model with ``max_queued`` requests waiting (or ``max_queued_per_class`` of the request's
own class) refuses the next with 429 and a Retry-After computed from how fast its queue drained over the last
minute (the jobs workers claimed, counted per 5-second bucket by the claim: queueing/jobstore.py), not a
constant.

A Retry-After is a promise: the refused request's place comes after everyone told to come back before it, at
the rate the queue drains, and that place is held for it when it is due. Held places count as waiting for
new requests; a retry (the OpenAI and Anthropic SDKs say which try a request is in
``x-stainless-retry-count``) that comes back when a place is due takes one, bound or not. Without this, a
client that obeys Retry-After comes back to a queue that new requests, sent the moment an earlier answer
ended, filled again before it. A place not taken within ``GRACE_MS`` of its time is let go; and while nothing
waits, a new request is never refused for places held for clients not back yet, so workers never idle for
them.

Waiting is what sits on the model's shared queue (queueing.keys.queue_list_keys); jobs routed to one worker's
own queue are that worker's backlog and do not count here.
"""

from __future__ import annotations

import time
import uuid
from contextvars import ContextVar

import redis.asyncio as aredis

from api import errors
from queueing import keys
from queueing.bands import BANDS
from queueing.jobs import Priority

# The drain rate is measured over this many seconds of claims.
RATE_WINDOW = 60
# Retry-After never says less than this, nor more than RETRY_MOST.
RETRY_LEAST, RETRY_MOST = 1, 60
# A retry this early still takes its place; a place is held this long after its time.
EARLY_MS, GRACE_MS = 500, 3000
RETRY_COUNT_HEADER = "x-stainless-retry-count"

# Whether the request says it is a retry (set per request in api/app.py).
requested_retry: ContextVar[bool] = ContextVar("requested_retry", default=False)

# KEYS: the queue's lists (one per step), the drain buckets of the window, the promised places (a zset:
# member -> when it is due, ms). ARGV: lists, bound, class bound, the class's first and last list (1-based),
# retry ("1"), the member a refusal promises, rate window s, least and most Retry-After s, early and grace ms.
# Returns {1} when admitted, else {0, waiting, bound, drain rate, Retry-After, 'model' or 'class'}.
_ADMIT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local lists, most_queued, most_class = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local first, last = tonumber(ARGV[4]), tonumber(ARGV[5])
local early, grace = tonumber(ARGV[11]), tonumber(ARGV[12])
local promises = KEYS[#KEYS]
redis.call('ZREMRANGEBYSCORE', promises, '-inf', now - grace)
if ARGV[6] == '1' then
  local due = redis.call('ZRANGEBYSCORE', promises, '-inf', now + early, 'LIMIT', 0, 1)
  if #due > 0 then
    redis.call('ZREM', promises, due[1])
    return {1}
  end
end
local depth, in_class = 0, 0
for i = 1, lists do
  local n = redis.call('LLEN', KEYS[i])
  depth = depth + n
  if i >= first and i <= last then in_class = in_class + n end
end
if depth == 0 then return {1} end
local held = redis.call('ZCOUNT', promises, '-inf', now + early)
local waiting, bound, which = nil, nil, nil
if most_queued > 0 and depth + held >= most_queued then
  waiting, bound, which = depth, most_queued, 'model'
elseif most_class > 0 and in_class + held >= most_class then
  waiting, bound, which = in_class, most_class, 'class'
else
  return {1}
end
local claims = 0
for i = lists + 1, #KEYS - 1 do claims = claims + tonumber(redis.call('GET', KEYS[i]) or '0') end
local rate = claims / tonumber(ARGV[8])
-- Ahead of this request: what must drain to bring the queue below its bound, and everyone promised a place.
local ahead = waiting - bound + 1 + redis.call('ZCARD', promises)
local retry = tonumber(ARGV[10])
if rate > 0 then retry = math.min(retry, math.max(tonumber(ARGV[9]), math.ceil(ahead / rate))) end
redis.call('ZADD', promises, now + retry * 1000, ARGV[7])
redis.call('PEXPIRE', promises, tonumber(ARGV[10]) * 1000 + grace)
return {0, waiting, bound, tostring(rate), retry, which}
"""


def parse_retry_count(value: str | None) -> bool:
    """Whether a request's ``x-stainless-retry-count`` says it is a retry (anything unreadable: no)."""
    try:
        return value is not None and int(value) > 0
    except ValueError:
        return False


class QueueBound:
    def __init__(self, client: aredis.Redis, max_queued: int, max_queued_per_class: int = 0) -> None:
        self._r = client
        self.max_queued = max_queued
        self.max_queued_per_class = max_queued_per_class
        self._admit = client.register_script(_ADMIT)

    async def admit(self, model: str, priority: Priority) -> None:
        """Raise the 429 when ``model``'s queue (or ``priority``'s part of it) is at its bound."""
        if self.max_queued <= 0 and self.max_queued_per_class <= 0:
            return
        # Numbered by the workers' clocks: this one is as good to a second, all a 5-second bucket needs.
        now_bucket = int(time.time() // keys.DRAIN_BUCKET_SECONDS)
        # The buckets of the last minute that are over (the current one is still filling).
        buckets = [now_bucket - i for i in range(1, RATE_WINDOW // keys.DRAIN_BUCKET_SECONDS + 1)]
        lists = keys.queue_list_keys(keys.model_queue(model))
        band = BANDS[priority]
        found = await self._admit(
            keys=[*lists, *(keys.drain_key(model, b) for b in buckets), keys.promise_key(model)],
            args=[
                len(lists),
                self.max_queued,
                self.max_queued_per_class,
                band[0] + 1,
                band[-1] + 1,
                "1" if requested_retry.get() else "0",
                uuid.uuid4().hex,
                RATE_WINDOW,
                RETRY_LEAST,
                RETRY_MOST,
                EARLY_MS,
                GRACE_MS,
            ],
        )
        if int(found[0]) == 1:
            return
        waiting, bound, rate, retry = int(found[1]), int(found[2]), float(found[3]), int(found[4])
        which = (
            f"The queue of '{model}'"
            if found[5] in (b"model", "model")
            else f"The {priority} queue of '{model}'"
        )
        raise errors.ApiError(
            429,
            f"{which} is full ({waiting} requests waiting, at most {bound}); it drains at {rate:.2f} "
            f"requests/s. Please try again in {retry}s.",
            "rate_limit_error",
            None,
            "queue_full",
            headers={"retry-after": str(retry)},
        )
