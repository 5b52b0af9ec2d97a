"""A streamed job's events, kept: one Redis stream per job, which the live path and a resumed stream read.

The worker appends each event and publishes it in one script, so what a client is sent live is exactly what
the log holds, under the same id. Ids are ``<attempt>-<n>`` (the n-th event of that attempt): increasing, so
a replay reads from any id with XRANGE; and a worker still running a superseded attempt (one re-queued after
its heartbeat lapsed) cannot append, because Redis refuses an id below the last one, nor publish, because the
script publishes only what it logged.

Pub/sub stays the live path (one message per event, no per-reader polling), and the log is what a reader
that came late or lost messages reads: a client that reconnects with ``Last-Event-ID``, on any API process.
Bounded: at most ``MAX_EVENTS`` entries (the worker coalesces tokens, so a long answer is a few hundred),
and gone ``stream_log_ttl`` after the last event. Non-streamed jobs keep no log: their result is the record.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple, cast

import redis.asyncio as aredis

from queueing import keys

# Entries kept per job at most (XADD MAXLEN ~): far more than a stream of the longest answer holds.
MAX_EVENTS = 100_000

# KEYS: the job's log, its channel. ARGV: entry id, encoded event, MAX_EVENTS, TTL ms. Returns 0 when Redis
# refused the id (a superseded attempt): nothing is published then.
EMIT = """
local ok = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], ARGV[1], 'e', ARGV[2])
if type(ok) == 'table' and ok.err then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', KEYS[2], ARGV[1] .. ' ' .. ARGV[2])
return 1
"""
EMIT_SHA = hashlib.sha1(EMIT.encode()).hexdigest()


class EventId(NamedTuple):
    """An event's place in its job's log; ordered as the log is."""

    attempt: int
    n: int

    def __str__(self) -> str:
        return f"{self.attempt}-{self.n}"

    @classmethod
    def parse(cls, raw: str | bytes) -> EventId | None:
        """The id of ``raw``, or None where it is not one."""
        head, _, tail = (raw.decode() if isinstance(raw, bytes) else raw).partition("-")
        if not (head.isdigit() and tail.isdigit()):
            return None
        return cls(int(head), int(tail))


START = EventId(0, 0)


def split(message: bytes) -> tuple[EventId | None, bytes]:
    """A message of a job's channel: ``<id> <event>`` from a logged job, the bare event from another."""
    if message[:1] == b"{":
        return None, message
    head, _, body = message.partition(b" ")
    return EventId.parse(head), body


class Channel:
    """Where one attempt of a job sends its events: its pub/sub channel, and its log if it streams."""

    __slots__ = ("attempt", "log", "name", "sent")

    def __init__(self, job_id: str, attempt: int, logged: bool) -> None:
        self.name = keys.stream_channel(job_id)
        self.log = keys.job_events_key(job_id) if logged else None
        self.attempt = attempt
        self.sent = 0

    def next_id(self) -> str:
        self.sent += 1
        return str(EventId(self.attempt, self.sent))


async def read_after(client: aredis.Redis, job_id: str, after: EventId) -> list[bytes]:
    """The logged events of a job after ``after``, as its channel carries them (``<id> <event>``)."""
    found = await client.xrange(keys.job_events_key(job_id), min=f"({after}", max="+")
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], found or [])
    return [entry_id + b" " + fields[b"e"] for entry_id, fields in entries]
