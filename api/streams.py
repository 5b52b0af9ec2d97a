"""One pub/sub connection per API process, fanning events out to bounded per-request queues.

Every streamed token crosses this module, so it reads Redis with a bare asyncio protocol and hiredis rather
than redis-py's PubSub: measured on 2 cores at 80 messages/s, redis-py's ``get_message`` cost ~330 µs of CPU
per message against ~35 µs for a bare wakeup, and that CPU is taken from the engine on a shared machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any

import hiredis
import redis
from redis.connection import SSLConnection, parse_url

from queueing import keys, sentinel
from queueing.sentinel import master_address

logger = logging.getLogger(__name__)


class StreamOverflow(Exception):
    """A consumer fell so far behind that its queue filled; the stream can no longer be trusted."""


class Subscription:
    def __init__(self, channel: str, maxsize: int) -> None:
        self.channel = channel
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
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


def _command(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _PubSubProtocol(asyncio.Protocol):
    def __init__(self, hub: StreamHub) -> None:
        self._hub = hub
        self._reader = hiredis.Reader()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            self._hub._dispatch(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class StreamHub:
    def __init__(
        self,
        redis_url: str,
        queue_size: int = 4096,
        reconnect_delay: float = 0.5,
        timeout: float = 0.5,
        keepalive: float = 1.0,
        dead_after: float = 5.0,
    ) -> None:
        # A sentinel URL: the master's address is asked for at each (re)connect (queueing/sentinel.py).
        self._master = master_address(redis_url, timeout)
        config = sentinel.parse(redis_url)
        self._options: dict[str, Any] = (
            parse_url(redis_url)  # type: ignore[no-untyped-call]
            if config is None
            else {"password": config.password, "username": config.username}
        )
        self._queue_size = queue_size
        self._reconnect_delay = reconnect_delay
        # Connecting may take this long (Redis may be frozen: the kernel still accepts the connection).
        self._timeout = timeout
        # A PING every ``keepalive`` seconds; a connection that answered nothing for ``dead_after`` is dead.
        # A frozen (SIGSTOPped) Redis or a cut network closes nothing, so without this the hub would wait on
        # a silent socket forever and never resubscribe. Generous: a loaded Redis is slow, not dead.
        self._keepalive = keepalive
        self._dead_after = dead_after
        self._last_reply = 0.0
        self._subs: dict[str, Subscription] = {}
        self._transport: asyncio.Transport | None = None
        self._keeper: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    async def start(self) -> None:
        protocol = await self._connect()
        self._keeper = asyncio.create_task(self._keep_connected(protocol), name="inferq-pubsub")

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if self._transport is not None:
            self._transport.close()
        if self._master is not None:
            await self._master.aclose()

    @contextlib.asynccontextmanager
    async def subscribe(self, request_id: str, confirm_within: float = 5.0) -> AsyncIterator[Subscription]:
        """Subscribe and wait for Redis to confirm it, so no event published after this returns is missed."""
        channel = keys.stream_channel(request_id)
        sub = Subscription(channel, self._queue_size)
        self._subs[channel] = sub
        try:
            if not self.connected:
                # Reconnecting: a 503 now rather than a request that waits for a Redis that is away.
                raise redis.ConnectionError("pub/sub connection to Redis is down")
            self._send(_command("SUBSCRIBE", channel))
            try:
                await asyncio.wait_for(asyncio.shield(sub.ready), confirm_within)
            except TimeoutError:
                message = f"Redis did not confirm SUBSCRIBE within {confirm_within}s"
                raise redis.TimeoutError(message) from None
            yield sub
        finally:
            self._subs.pop(channel, None)
            self._send(_command("UNSUBSCRIBE", channel))

    def _send(self, data: bytes) -> None:
        # While reconnecting there is no transport; the reconnect subscribes every channel still wanted.
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    async def _connect(self) -> _PubSubProtocol:
        loop = asyncio.get_running_loop()
        opts = self._options
        protocol = _PubSubProtocol(self)
        async with asyncio.timeout(self._timeout):
            if self._master is not None:
                host, port = await self._master()
                transport, _ = await loop.create_connection(lambda: protocol, host, port)
            elif "path" in opts:
                transport, _ = await loop.create_unix_connection(lambda: protocol, opts["path"])
            else:
                tls = ssl.create_default_context() if opts.get("connection_class") is SSLConnection else None
                transport, _ = await loop.create_connection(
                    lambda: protocol, opts.get("host", "localhost"), opts.get("port", 6379), ssl=tls
                )
        self._transport = transport
        self._last_reply = loop.time()
        if opts.get("password"):
            user = [opts["username"]] if opts.get("username") else []
            self._send(_command("AUTH", *user, opts["password"]))
        for channel in self._subs:
            self._send(_command("SUBSCRIBE", channel))
        return protocol

    async def _keep_connected(self, protocol: _PubSubProtocol) -> None:
        while True:
            await self._until_lost(protocol)
            # Events published while disconnected are lost; each request's watchdog reads its job record.
            logger.warning("pub/sub connection to Redis lost; reconnecting")
            self._transport = None
            while True:
                await asyncio.sleep(self._reconnect_delay)
                try:
                    protocol = await self._connect()
                    break
                except (OSError, TimeoutError, redis.RedisError) as exc:
                    logger.warning("pub/sub reconnect failed: %r", exc)

    async def _until_lost(self, protocol: _PubSubProtocol) -> None:
        """Returns once the connection closed, or answered nothing (not even a PING) for ``dead_after``
        seconds, which closes it."""
        loop = asyncio.get_running_loop()
        while not protocol.lost.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(protocol.lost), self._keepalive)
            if protocol.lost.done():
                return
            if loop.time() - self._last_reply > self._dead_after:
                logger.warning("pub/sub connection silent for %.1fs (Redis frozen?)", self._dead_after)
                if self._transport is not None:
                    self._transport.abort()
                return
            self._send(_command("PING"))

    def _dispatch(self, reply: Any) -> None:
        self._last_reply = asyncio.get_running_loop().time()
        if isinstance(reply, hiredis.ReplyError):
            logger.error("pub/sub connection: %s", reply)
            return
        if not isinstance(reply, list) or len(reply) < 3:
            return  # +OK of AUTH
        kind, channel = reply[0], reply[1].decode()
        sub = self._subs.get(channel)
        if sub is None:
            return
        if kind == b"message":
            try:
                sub.queue.put_nowait(reply[2])
            except asyncio.QueueFull:
                sub.overflowed = True
        elif kind == b"subscribe" and not sub.ready.done():
            sub.ready.set_result(None)
