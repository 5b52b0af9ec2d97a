"""A streamed request that waits in the queue hears where it stands: SSE comments with its queue position.

A stream's response begins once a worker accepted its jobs (api/serving/core.py: an error until then is a
plain HTTP error). When that takes longer than ``FIRST_AFTER`` seconds, this middleware begins the response
itself (200, ``text/event-stream``) and sends ``: queue position N`` every ``EVERY`` seconds until the
stream's own response takes over; every client ignores SSE comments, and they keep proxies from timing the
wait out. The response's own start is then dropped (its status is the 200 already sent); an error answered
after that point (the job failed before its first token, the request timed out) is sent as the protocol's
error event instead, in the stream's own shape: OpenAI's ``data: {"error": ...}`` and ``[DONE]``, the
Responses API's ``error`` event, Anthropic's ``event: error``.

Position 1 is the next job a worker takes: the messages on the lists served before its own (higher classes,
keys within their share: queueing/bands.py) and those ahead of it on its own list.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import redis
import redis.asyncio as aredis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from queueing import keys
from queueing.bands import message_priority
from queueing.jobs import Job

FIRST_AFTER = 1.0
EVERY = 1.0
# Most messages of one list searched for the job's own.
SEARCH_MOST = 10_000

# KEYS: a queue's lists served before the job's own, then its own. ARGV: the job's task id, most searched.
# kombu pushes at a list's head and pops from its tail: what lies between ours and the tail came first.
# Returns the position (1: next), or -1 when the message is not there (taken by a worker).
_POSITION = """
local ahead = 0
for i = 1, #KEYS - 1 do ahead = ahead + redis.call('LLEN', KEYS[i]) end
local items = redis.call('LRANGE', KEYS[#KEYS], -tonumber(ARGV[2]), -1)
for i = #items, 1, -1 do
  if string.find(items[i], ARGV[1], 1, true) then return ahead + (#items - i) + 1 end
end
return -1
"""


class Positions:
    """Where a queued job stands in the queue it was sent to."""

    def __init__(self, client: aredis.Redis) -> None:
        self._position = client.register_script(_POSITION)

    async def of(self, job: Job, queue: str) -> int | None:
        step = message_priority(job)
        lists = keys.queue_list_keys(queue)[: step + 1]
        found = int(await self._position(keys=lists, args=[f'"{job.id}.{job.attempt}"', SEARCH_MOST]))
        return None if found < 0 else found


@dataclass
class Room:
    """One request's streamed jobs waiting for a worker (set by api/serving/fanout.py)."""

    where: Callable[[], Awaitable[int | None]] | None = None
    queued: asyncio.Event = field(default_factory=asyncio.Event)
    started: bool = False

    def waiting(self, where: Callable[[], Awaitable[int | None]]) -> None:
        self.where = where
        self.queued.set()


# The room of the request being served (set per POST request by the middleware below).
waiting_room: ContextVar[Room | None] = ContextVar("waiting_room", default=None)


def furthest(runs: Sequence[tuple[Job, str]], positions: Positions) -> Callable[[], Awaitable[int | None]]:
    """The position of the last of several jobs to start (a response waits for all of them)."""

    async def where() -> int | None:
        found = [p for job, queue in runs if (p := await positions.of(job, queue)) is not None]
        return max(found) if found else None

    return where


def _error_frames(path: str, body: bytes) -> bytes:
    """An error response's JSON body as the stream's own error event."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = {"error": {"message": body.decode(errors="replace"), "type": "server_error"}}
    if path.endswith("/messages"):
        return b"event: error\ndata: " + json.dumps(parsed).encode() + b"\n\n"
    if path.endswith("/responses"):
        event = {"type": "error", "sequence_number": 0, "error": parsed.get("error", parsed)}
        return b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n"
    return b"data: " + json.dumps(parsed).encode() + b"\n\ndata: [DONE]\n\n"


SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
]


class QueuePositionMiddleware:
    def __init__(self, app: ASGIApp, first_after: float = FIRST_AFTER, every: float = EVERY) -> None:
        self.app = app
        self.first_after = first_after
        self.every = every

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        room = Room()
        token = waiting_room.set(room)
        lock = asyncio.Lock()
        # ours: the response we began; answered: the app began its own (or we stopped trying).
        state = {"ours": False, "answered": False, "sse": False}
        error_body = bytearray()

        async def app_send(message: Message) -> None:
            async with lock:
                if message["type"] == "http.response.start":
                    state["answered"] = True
                    if not state["ours"]:
                        await send(message)
                        return
                    content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                    state["sse"] = message["status"] == 200 and content_type.startswith(b"text/event-stream")
                    return
                if message["type"] != "http.response.body" or not state["ours"] or state["sse"]:
                    await send(message)
                    return
                error_body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    frames = _error_frames(scope["path"], bytes(error_body))
                    await send({"type": "http.response.body", "body": frames, "more_body": False})

        async def tick() -> None:
            await room.queued.wait()
            await asyncio.sleep(self.first_after)
            while True:
                where = room.where
                try:
                    position = await where() if where is not None else None
                except redis.RedisError:
                    position = None
                async with lock:
                    if state["answered"] or room.started:
                        return
                    if not state["ours"]:
                        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                        state["ours"] = True
                    line = (
                        b": queued\n\n" if position is None else f": queue position {position}\n\n".encode()
                    )
                    await send({"type": "http.response.body", "body": line, "more_body": True})
                await asyncio.sleep(self.every)

        ticker = asyncio.create_task(tick())
        try:
            await self.app(scope, receive, app_send)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ticker
            waiting_room.reset(token)
