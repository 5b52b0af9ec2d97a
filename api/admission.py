"""Bounded queues: a model with ``max_queued`` requests waiting refuses the next with 429 and a Retry-After
computed from how fast its queue drained over the last minute (the jobs workers claimed, counted per 5-second
bucket by the claim: queueing/jobstore.py), not a constant: a client that waits that long finds a place.

Waiting is what sits on the model's shared queue, every class together (queueing.keys.queue_list_keys); jobs
routed to one worker's own queue are that worker's backlog and do not count here.
"""

from __future__ import annotations

import math
import time

import redis.asyncio as aredis

from api import errors
from queueing import keys

# The drain rate is measured over this many seconds of claims.
RATE_WINDOW = 60
# Retry-After never says less than this, nor more than RETRY_MOST.
RETRY_LEAST, RETRY_MOST = 1, 60


class QueueBound:
    def __init__(self, client: aredis.Redis, max_queued: int) -> None:
        self._r = client
        self.max_queued = max_queued

    async def admit(self, model: str) -> None:
        """Raise the 429 when ``model``'s queue holds ``max_queued`` requests already."""
        if self.max_queued <= 0:
            return
        now = time.time()
        bucket = int(now // keys.DRAIN_BUCKET_SECONDS)
        # The buckets of the last minute that are over (the current one is still filling).
        buckets = [bucket - i for i in range(1, RATE_WINDOW // keys.DRAIN_BUCKET_SECONDS + 1)]
        async with self._r.pipeline(transaction=False) as pipe:
            for key in keys.queue_list_keys(keys.model_queue(model)):
                pipe.llen(key)
            pipe.mget([keys.drain_key(model, b) for b in buckets])
            *depths, drained = await pipe.execute()
        waiting = sum(int(d) for d in depths)
        if waiting < self.max_queued:
            return
        rate = sum(int(n) for n in drained if n is not None) / RATE_WINDOW
        # Long enough for the queue to drain below the bound at the rate it drained lately.
        ahead = waiting - self.max_queued + 1
        retry = RETRY_MOST if rate <= 0 else min(RETRY_MOST, max(RETRY_LEAST, math.ceil(ahead / rate)))
        raise errors.ApiError(
            429,
            f"The queue of '{model}' is full ({waiting} requests waiting, at most {self.max_queued}); it "
            f"drains at {rate:.2f} requests/s. Please try again in {retry}s.",
            "rate_limit_error",
            None,
            "queue_full",
            headers={"retry-after": str(retry)},
        )
