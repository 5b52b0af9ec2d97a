"""Resumable chat and completions streams: every event has an id, and a client that lost its connection
gets the rest from any API process.

A one-choice chat or completions stream names each SSE event ``<attempt>-<n>.<k>``: the k-th frame rendered
after the job's logged event ``<attempt>-<n>`` (queueing/eventlog.py). Rendering is a function of the request
and the job's events (``created`` is kept here, tool call ids derive from the job id), so any API process
renders the same frames from the job's log. A client that reconnects to ``GET /v1/streams/{id}`` (the id of
the completion) with ``Last-Event-ID`` gets the frames after that one: the logged ones first, then live ones,
nothing twice. While it is away its job goes on for ``stream_reconnect_grace`` seconds (api/jobs.py).

A streamed response (``POST /v1/responses``) is resumed as OpenAI resumes a background one: ``GET
/v1/responses/{id}?stream=true&starting_after=<sequence number>`` (api/routes/responses.py); its events are
numbered already, and the same numbers are rendered again from the same job events.

A stream of several choices (``n`` > 1, several prompts) has no ids: its jobs' events interleave as they
come, and a second rendering could not put them in the same order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any, Literal, NamedTuple

import redis.asyncio as aredis
from pydantic import BaseModel

from api.jobrun import JobRun
from api.serving import core, sse
from queueing import keys
from queueing.eventlog import EventId

# The route a client resumes a stream at (api/routes/streams.py).
STREAM_ROUTE = "/v1/streams/{stream_id}"
# Whose request this is (api.auth.owner_of, set per request in api/app.py): only they may resume its stream.
requested_owner: ContextVar[str] = ContextVar("requested_owner", default="")


class FrameId(NamedTuple):
    attempt: int
    n: int
    k: int

    def __str__(self) -> str:
        return f"{self.attempt}-{self.n}.{self.k}"

    @classmethod
    def parse(cls, raw: str) -> FrameId | None:
        event, _, k = raw.strip().partition(".")
        at = EventId.parse(event)
        if at is None or not k.isdigit():
            return None
        return cls(at.attempt, at.n, int(k))


Protocol = Literal["chat", "completions", "responses"]


class Resumable(BaseModel):
    """What rendering a stream again needs besides the job's events: the request, whose it was, and the one
    field of its chunks that no event holds."""

    protocol: Protocol
    body: dict[str, Any]
    owner: str
    created: int
    # A response's conversation as its model saw it (its previous response's, then its input): rendering
    # it again must not depend on that previous response still being stored.
    context: list[dict[str, Any]] | None = None


class ResumableStore:
    def __init__(self, client: aredis.Redis, ttl: float) -> None:
        self._r = client
        # As long as the job's event log: past it there is nothing to resume from.
        self._ttl = max(1, int(ttl))

    async def save(self, stream_id: str, resumable: Resumable) -> None:
        await self._r.set(keys.resumable_key(stream_id), resumable.model_dump_json(), ex=self._ttl)

    async def get(self, stream_id: str, owner: str) -> Resumable | None:
        raw = await self._r.get(keys.resumable_key(stream_id))
        found = None if raw is None else Resumable.model_validate_json(raw)
        # Another key's stream reads as no stream at all.
        return found if found is not None and found.owner == owner else None


async def offer(
    serve: core.Serve,
    work: core.Work,
    protocol: Protocol,
    body: BaseModel,
    created: int,
    context: list[dict[str, Any]] | None = None,
) -> core.Serve:
    """Makes a one-job stream resumable: its request is kept, and its job goes on for the reconnect grace
    when the client leaves. Returns how to serve it."""
    if len(work.jobs) != 1:
        return serve
    d = serve.dispatcher
    request = body.model_dump(mode="json", by_alias=True, exclude_unset=True)
    owner = requested_owner.get()
    kept = Resumable(protocol=protocol, body=request, owner=owner, created=created, context=context)
    await ResumableStore(d.client, d.stream_log_ttl).save(work.jobs[0].id, kept)
    grace = dataclasses.replace(serve.options, reconnect_grace=d.reconnect_grace, merge_deltas=False)
    return dataclasses.replace(serve, options=grace)


def ids(frames: AsyncIterator[sse.Frame], stream: core.Stream) -> AsyncIterator[sse.Frame]:
    """The frames of a stream, with ids where it can be resumed (one job)."""
    return with_ids(frames, stream.runs[0]) if len(stream.runs) == 1 else frames


async def with_ids(
    frames: AsyncIterator[sse.Frame], run: JobRun, after: FrameId | None = None
) -> AsyncIterator[sse.Frame]:
    """``frames`` of ``run``'s stream, each with its id; those up to ``after`` (the client had them) are
    rendered but not sent."""
    last: EventId | None = None
    k = 0
    async for frame in frames:
        at = run.position
        k = k + 1 if at == last else 1
        last = at
        frame_id = FrameId(at.attempt, at.n, k)
        if after is not None and frame_id <= after:
            continue
        yield dataclasses.replace(frame, id=str(frame_id))
