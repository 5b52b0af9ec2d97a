"""How a worker talks to its broker: kombu's Redis transport with one crash on a lost connection worked
around, and Celery's consumer retrying a lost connection every second.

When Redis goes away while the worker holds unacknowledged messages (every running job: acks are late),
Celery's consumer closes the broken connection twice, by ``collect()`` and then ``close()``. The first pass
lets go of the transport; the second tries again to put the unacknowledged messages back through it and
fails on the missing reference with an AttributeError, which is not a connection error: the worker exits
with "Unrecoverable error" instead of reconnecting (seen on every Redis restart under load, kombu 5.7).
Raised as a connection error instead, it is ignored like the first pass's (Redis is away: nothing can be
put back), and the consumer reconnects once Redis returns.
"""

from __future__ import annotations

from typing import Any

import redis
from celery.worker import consumer as celery_consumer
from kombu.transport import redis as kombu_redis


class _LostConnection:
    """A connection error, not an AttributeError, for a channel whose connection was let go."""

    connection: Any

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise redis.ConnectionError("the broker connection was closed")
        return super()._connparams(asynchronous)  # type: ignore[misc]


class Channel(_LostConnection, kombu_redis.Channel):
    pass


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(_LostConnection, kombu_redis.SentinelChannel):
    """kombu's sentinel channel with the same fix: a failover closes the broker connection just as a
    restart does."""


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


class Consumer(celery_consumer.Consumer):  # type: ignore[misc]
    """Celery's consumer, trying to reach a lost broker every second: Celery waits 2, 4, 6 … up to 30 s
    between tries, so after a long Redis outage a worker would stay away for up to half a minute once Redis
    is back. One connection attempt a second costs nothing."""

    def ensure_connected(self, conn: Any) -> Any:
        ensure = conn.ensure_connection

        def every_second(*args: Any, **kwargs: Any) -> Any:
            return ensure(*args, **{**kwargs, "interval_start": 0, "interval_step": 1, "interval_max": 1})

        conn.ensure_connection = every_second
        return super().ensure_connected(conn)
