"""kombu's Redis transport for the worker's consumer, with one crash on a lost connection worked around.

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
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise redis.ConnectionError("the broker connection was closed")
        return super()._connparams(asynchronous)  # type: ignore[no-untyped-call]


class Transport(kombu_redis.Transport):
    Channel = Channel
