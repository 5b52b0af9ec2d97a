"""The one SSE layer: framing, keep-alive pings, an error after the first byte, the protocol's last event.

Protocol adapters yield ``Frame``s (an event name, if the protocol names events, and its JSON data); this
module writes them as OpenAI and Anthropic frame them: LF line endings, one write per event. Once a stream has
started its status and headers are gone, so an error is an event in the stream (in the protocol's shape),
followed by the protocol's final sentinel (``[DONE]`` for OpenAI's chat and completions streams; none for
the Responses API and Anthropic Messages, whose error event is itself the last).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import redis
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from api import errors
from api.streams import StreamOverflow

logger = logging.getLogger(__name__)

PING_SECONDS = 15


@dataclass(frozen=True)
class Frame:
    data: str
    event: str | None = None
    id: str | None = None

    def sse(self) -> ServerSentEvent:
        # sse-starlette's own separator is CRLF; OpenAI and Anthropic send LF.
        return ServerSentEvent(data=self.data, event=self.event, id=self.id, sep="\n")


@dataclass(frozen=True)
class Framing:
    """What differs between protocols' streams."""

    # The frames that report an error once the stream has started.
    error: Callable[[errors.ApiError], list[Frame]]
    # Sent after the last event, also after an error; None: the protocol has no sentinel.
    done: Frame | None = None
    # The keep-alive frame; None: an SSE comment, which every client ignores.
    ping: Frame | None = None


DONE = Frame("[DONE]")


async def _framed(
    frames: AsyncIterator[Frame], framing: Framing, close: Callable[[], Awaitable[None]]
) -> AsyncIterator[ServerSentEvent]:
    try:
        async for frame in frames:
            yield frame.sse()
    except errors.ApiError as exc:
        for frame in framing.error(errors.counted(exc)):
            yield frame.sse()
    except (redis.RedisError, StreamOverflow) as exc:
        logger.error("stream ended early: %r", exc)
        for frame in framing.error(errors.counted(errors.redis_unavailable())):
            yield frame.sse()
    finally:
        await close()
    if framing.done is not None:
        yield framing.done.sse()


async def _nothing() -> None:
    return None


def respond(
    frames: AsyncIterator[Frame],
    framing: Framing,
    close: Callable[[], Awaitable[None]] | None = None,
    headers: dict[str, str] | None = None,
) -> EventSourceResponse:
    """The streaming response for ``frames``; ``close`` runs once the stream ends, however it ends (also
    when the client left before the body started)."""
    close = close or _nothing
    ping = framing.ping
    return EventSourceResponse(
        _framed(frames, framing, close),
        headers=headers,
        ping=PING_SECONDS,
        sep="\n",
        ping_message_factory=(lambda: ping.sse()) if ping is not None else None,
        background=BackgroundTask(close),
    )
