"""One pub/sub connection per API process, fanning events out to bounded per-request queues."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

import redis.asyncio as aredis

from queueing import keys

logger = logging.getLogger(__name__)


class StreamOverflow(Exception):
    """A consumer fell so far behind that its queue filled; the stream can no longer be trusted."""


class Subscription:
    def __init__(self, channel: str, maxsize: int) -> None:
        self.channel = channel
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize)
        self.ready = asyncio.get_running_loop().create_future()
        self.overflowed = False

    async def get(self, wait: float) -> bytes | None:
        """The next raw event, or None after ``wait`` seconds without one."""
        if self.overflowed:
            raise StreamOverflow(self.channel)
        if not self.queue.empty():
            return self.queue.get_nowait()
        try:
            # asyncio.timeout, not wait_for: no extra task per event on the hot path.
            async with asyncio.timeout(wait):
                return await self.queue.get()
        except TimeoutError:
            return None


class StreamHub:
    def __init__(self, client: aredis.Redis, queue_size: int = 4096) -> None:
        self._pubsub = client.pubsub()
        self._queue_size = queue_size
        self._subs: dict[str, Subscription] = {}
        self._reader: asyncio.Task[None] | None = None
        # A channel of our own keeps the connection subscribed (redis-py ends a reader with no subscriptions).
        self._home = f"{keys.PREFIX}:api:{os.getpid()}:{id(self)}"

    async def start(self) -> None:
        await self._pubsub.subscribe(self._home)
        self._reader = asyncio.create_task(self._read(), name="inferq-pubsub")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    @contextlib.asynccontextmanager
    async def subscribe(self, request_id: str, confirm_within: float = 5.0) -> AsyncIterator[Subscription]:
        """Subscribe and wait for Redis to confirm it, so no event published after this returns is missed."""
        channel = keys.stream_channel(request_id)
        sub = Subscription(channel, self._queue_size)
        self._subs[channel] = sub
        try:
            await self._pubsub.subscribe(channel)
            await asyncio.wait_for(asyncio.shield(sub.ready), confirm_within)
            yield sub
        finally:
            self._subs.pop(channel, None)
            await self._pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(ignore_subscribe_messages=False, timeout=None)
            except aredis.ConnectionError as exc:
                # redis-py reconnects and re-subscribes on the next read; events published meanwhile are
                # lost, which the job record covers (see api/jobs.py).
                logger.warning("pub/sub connection lost: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if message is None:
                continue
            channel = message["channel"].decode()
            sub = self._subs.get(channel)
            if sub is None:
                continue
            kind = message["type"]
            if kind == "message":
                try:
                    sub.queue.put_nowait(message["data"])
                except asyncio.QueueFull:
                    sub.overflowed = True
            elif kind == "subscribe" and not sub.ready.done():
                sub.ready.set_result(None)
