"""The API's Redis connection pool: it waits when full, and gives back what a burst opened.

redis-py's pools never close an idle connection. After 1,000 concurrent streams the API's pool stayed at its
256-connection cap for good (tests/e2e/test_many_streams.py, gc counts: 256 ``Connection`` objects, each with
its hiredis reader, uvloop transport, retry, encoder and re-auth listeners), and those scattered objects kept
~24 MiB of heap pages resident that ``malloc_trim`` could not hand back. ``shrink`` closes the connections
idle longer than a bound, down to a floor, so the pool's size follows the load instead of its peak.

It reads two attributes of redis-py's ``ConnectionPool`` (``_lock``, ``_available_connections``); where a
redis-py release lacks them ``shrink`` does nothing (tests/api/test_redis_pool.py checks it does shrink).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import redis
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool

from api.redis_timeouts import LoopFairTimeout


class NoConnectionFree(redis.ConnectionError):
    """Every connection stayed busy for the pool's wait: the API process is overloaded, Redis may be fine."""


KEEP = 8  # idle connections always kept: the steady load of a quiet API process needs a few


class ShrinkingPool(BlockingConnectionPool):
    """A ``BlockingConnectionPool`` that remembers when each connection was last released."""

    def __init__(self, wait: float | None = None, **kwargs: Any) -> None:
        """``wait``: seconds a command may wait for a free connection, measured by a ``LoopFairTimeout``
        (redis-py's own ``timeout`` would trip when a busy loop is slow to hand a released one over)."""
        super().__init__(**{**kwargs, "timeout": None})
        self._wait = wait
        # Keyed by the connection (its class has __slots__, so no attribute can go on it); an entry goes
        # when its connection is closed here, and a connection lives as long as the pool does.
        self._released_at: dict[AbstractConnection, float] = {}

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        get = super().get_connection
        if self._wait is None:
            return await get(*args, **kwargs)  # type: ignore[no-untyped-call,no-any-return]
        try:
            async with LoopFairTimeout(self._wait):
                return await get(*args, **kwargs)  # type: ignore[no-untyped-call,no-any-return]
        except TimeoutError:
            raise NoConnectionFree(f"No Redis connection free within {self._wait}s") from None

    async def release(self, connection: AbstractConnection) -> None:
        self._released_at[connection] = time.monotonic()
        await super().release(connection)

    async def shrink(self, idle_for: float, keep: int = KEEP) -> int:
        """Closes the connections idle for ``idle_for`` seconds or more, beyond the ``keep`` most recently
        used; returns how many it closed."""
        lock: asyncio.Lock | None = getattr(self, "_lock", None)
        available: list[AbstractConnection] | None = getattr(self, "_available_connections", None)
        if lock is None or available is None:
            return 0
        now = time.monotonic()
        async with lock:
            # The pool takes from the end of the list and gives back to it (LIFO), so the least recently
            # used are at the front.
            spare = available[: max(0, len(available) - keep)]
            idle = [c for c in spare if now - self._released_at.get(c, now) >= idle_for]
            for connection in idle:
                available.remove(connection)
                self._released_at.pop(connection, None)
        for connection in idle:
            # An idle connection that a Redis restart already broke has nothing left to close.
            with contextlib.suppress(redis.RedisError, OSError):
                await connection.disconnect()
        return len(idle)
