"""Timeouts for the API's Redis commands that a busy event loop does not trip.

A timeout measures wall time, and on a loaded API process that is not the time Redis took. With a thousand
streams starting at once on two cores, one pass of the loop over its ready callbacks can take longer than
the whole timeout: Redis answered in a millisecond, but the reply waited unread in the socket while the loop
ran other requests, and the timer, due in the same pass, cancelled the command anyway. CI saw exactly that:
32 of 1,000 streams answered 503 ``redis_unavailable`` from a Redis that was up and idle.

``LoopFairTimeout`` gives the loop one more look before it expires: when the delay is up, it waits for the
loop to poll its sockets once more and to run what that poll woke, and only then cancels. A reply that
arrived in time is read; a Redis that is frozen or gone still fails within the delay plus one pass of the
loop (its promise: health and new requests answer 503 within about a second).

The API's connections take no socket timeout of their own (redis-py's would trip the same way): reading,
writing and connecting run under a ``LoopFairTimeout`` instead (``loop_fair``), and so does the wait for a
pooled connection (api/redis_pool.py).
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

import redis
from redis.asyncio.connection import AbstractConnection

from api.redis_breaker import RedisBreaker

# Long enough that the next timer phase comes after a poll of the sockets on every loop: uvloop runs a
# zero delay as call_soon, which would come before the poll.
_AFTER_A_POLL = 0.001


class LoopFairTimeout:
    """``asyncio.timeout(delay)`` that expires only once the loop has read what arrived within the delay.

    How: at the delay, a 1 ms timer (its phase comes after the loop's next poll of the sockets); from that,
    the expiry with ``call_soon``, so it runs after the callbacks that poll scheduled, among them the wakeup
    of the task whose reply came. A task woken in time leaves the block before it expires.
    """

    __slots__ = ("_delay", "_handle", "_loop", "_timeout")

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._timeout = asyncio.timeout(None)
        self._handle: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> LoopFairTimeout:
        self._loop = asyncio.get_running_loop()
        await self._timeout.__aenter__()
        self._handle = self._loop.call_later(self._delay, self._poll_once_more)
        return self

    def _poll_once_more(self) -> None:
        self._handle = self._loop.call_later(_AFTER_A_POLL, self._expire)

    def _expire(self) -> None:
        self._handle = None
        # A deadline already passed: asyncio schedules the cancellation with call_soon.
        self._timeout.reschedule(self._loop.time())

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        await self._timeout.__aexit__(kind, exc, tb)
        return None


def _timed_out(what: str, delay: float, connection: Any) -> redis.TimeoutError:
    if connection.breaker is not None:
        connection.breaker.trip()
    return redis.TimeoutError(f"Timeout {what} Redis ({connection.host}) after {delay}s")


class _LoopFair:
    """Mixed into a redis-py connection class (TCP, TLS or Unix socket, whichever the URL names): its
    reads and writes run under a ``LoopFairTimeout`` of ``command_timeout`` seconds, a connect under one of
    ``connect_timeout``. The pool is
    created with ``socket_timeout=None``, so redis-py's own timeouts stay out of the way. A command cancelled
    mid-read closes its connection (redis-py does that on any exception), so no late reply is read by the
    next command."""

    def __init__(
        self,
        *,
        command_timeout: float,
        connect_timeout: float,
        breaker: RedisBreaker | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.command_timeout = command_timeout
        # Told of every timeout: new requests are refused at once until Redis answers (api/redis_breaker.py).
        self.breaker = breaker
        # A connect takes several turns of the loop (connect, the connection's callbacks, its first
        # commands), each of which a busy loop delays, so it has a budget of its own: a burst on two cores
        # saw connects to an idle Redis time out at 2 s. Its commands still each have ``command_timeout``,
        # so connecting to a frozen Redis (whose kernel still accepts) fails within that.
        self.connect_timeout = connect_timeout

    async def connect(self) -> None:
        try:
            async with LoopFairTimeout(self.connect_timeout):
                await super().connect()  # type: ignore[misc]
        except TimeoutError:
            raise _timed_out("connecting to", self.connect_timeout, self) from None

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            async with LoopFairTimeout(self.command_timeout):
                await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except TimeoutError:
            raise _timed_out("writing to", self.command_timeout, self) from None

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            async with LoopFairTimeout(self.command_timeout):
                return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except TimeoutError:
            raise _timed_out("reading from", self.command_timeout, self) from None


_made: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def loop_fair(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """``connection_class`` with its timeouts made loop-fair; it takes ``command_timeout`` and
    ``connect_timeout`` keywords."""
    made = _made.get(connection_class)
    if made is None:
        name = f"LoopFair{connection_class.__name__}"
        made = _made[connection_class] = type(name, (_LoopFair, connection_class), {})
    return made
