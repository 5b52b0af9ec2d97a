"""A runner's side of Redis, which may be away for a while: the events it sends, the writes it must make
(retried until Redis is back, bounded), and the reads it can do without.

While Redis was found unreachable a moment ago, the calls a job can do without (an event published, a cancel
poll) are skipped rather than each waiting out its own timeout, so that a generation keeps its pace through an
outage; the first call after the pause tries Redis again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from queueing import events
from queueing.eventlog import Channel
from workers.sender import Sender

logger = logging.getLogger(__name__)
T = TypeVar("T")
# What Redis raises while it is unreachable (down, restarting, frozen): worth waiting out. Anything else
# (a script error) is a bug and fails the job.
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)


class Outbox:
    def __init__(
        self,
        client: redis.Redis,
        record_retry: float,
        log_ttl: float,
        most_tokens: int = 64,
        pause: float = 1.0,
    ) -> None:
        self._r = client
        self._record_retry = record_retry
        self._pause = pause
        self._away_until = 0.0
        self._sender = Sender(client, int(log_ttl * 1000), most_tokens, UNREACHABLE, self.found_away)

    def away(self) -> bool:
        """Whether Redis was found unreachable a moment ago."""
        return time.monotonic() < self._away_until

    def found_away(self) -> None:
        self._away_until = time.monotonic() + self._pause

    def publish(
        self,
        channel: Channel,
        event: events.AnyEvent,
        droppable: bool = False,
        tokens: int = 0,
        wait: bool | None = None,
    ) -> None:
        """Pub/sub is at-most-once and the API replays what it missed from the job record, so an event
        that cannot be sent is dropped, never waited for; deltas are not even tried while Redis is away.

        A stream's event goes into its log in the same script (a resumed stream reads it there), through
        the worker's one sender (workers/sender.py): a droppable event (a delta of ``tokens`` tokens) is
        handed over and not waited for, any other (unless ``wait`` is False) returns once it and
        everything before it was sent."""
        if droppable and self.away():
            return
        if channel.log is not None:
            self._sender.send(channel, event, tokens, wait=not droppable if wait is None else wait)
            return
        try:
            self._r.publish(channel.name, events.encode(event))
        except UNREACHABLE as exc:
            logger.warning("dropped a %s event of %s: Redis unreachable (%s)", event.type, channel.name, exc)
            self.found_away()

    def settle(self, channel: Channel) -> None:
        """Return once the events handed over for ``channel`` were sent: its log holds them (what the next
        attempt of a moved stream reads) before its record says it ended."""
        if channel.log is not None:
            self._sender.send(channel, None)

    def durably(self, what: str, action: Callable[[], T]) -> T:
        """``action`` retried while Redis is unreachable, for at most ``record_retry`` seconds."""
        deadline = time.monotonic() + self._record_retry
        pause, warned = 0.05, False
        while True:
            try:
                return action()
            except UNREACHABLE as exc:
                if time.monotonic() + pause > deadline:
                    raise
                if not warned:
                    logger.warning("%s: Redis unreachable (%s); retrying until it is back", what, exc)
                    warned = True
                self.found_away()
                time.sleep(pause)
                pause = min(pause * 2, 1.0)

    def maybe(self, action: Callable[[], T], default: T) -> T:
        """``action``, or ``default`` when Redis is away: for calls a job can go on without."""
        if self.away():
            return default
        try:
            return action()
        except UNREACHABLE as exc:
            logger.warning("Redis unreachable (%s); the running jobs go on without it", exc)
            self.found_away()
            return default
