"""While Redis is known not to answer, new requests are refused at once instead of each waiting its timeout.

A command that times out (api/redis_timeouts.py) opens the breaker; from then on the key check and the health
check answer 503 ``redis_unavailable`` without a Redis command, and a probe PINGs Redis every
``probe_every`` seconds until one answers within the timeout, which closes it. Without it, every new request
spent its own ``api_redis_timeout`` finding out what the previous one had just learnt, and on a loaded
machine that wait plus a late turn of the event loop passed the promised second (CI: 1.23 s for a new
request while Redis was frozen).

Only timeouts open it: a Redis that refuses connections (stopped, restarting) fails each command at once
anyway. A slow but living Redis answers the probe, so it closes within one probe; the requests and streams
already running go on using Redis as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis
import redis.asyncio as aredis

logger = logging.getLogger(__name__)


class RedisBreaker:
    def __init__(self, probe_every: float = 0.1) -> None:
        self.probe_every = probe_every
        self._client: aredis.Redis | None = None
        self._probe: asyncio.Task[None] | None = None

    @property
    def open(self) -> bool:
        return self._probe is not None

    def attach(self, client: aredis.Redis) -> None:
        """The client whose PING closes the breaker (its connections call ``trip``)."""
        self._client = client

    def trip(self) -> None:
        """A command timed out: open, unless already open (or no client to probe with yet)."""
        if self._probe is not None or self._client is None:
            return
        logger.warning("Redis did not answer in time: new requests get 503 until a PING answers")
        loop = asyncio.get_running_loop()
        self._probe = loop.create_task(self._until_answered(), name="inferq-redis-probe")

    async def _until_answered(self) -> None:
        assert self._client is not None
        while True:
            await asyncio.sleep(self.probe_every)
            try:
                await self._client.ping()
            except redis.RedisError:
                continue
            logger.info("Redis answers again")
            self._probe = None
            return

    async def close(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
