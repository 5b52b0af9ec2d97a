"""Redis Sentinel: the fleet's Redis found through sentinels, so that a failover needs no restart.

``INFERQ_REDIS_URL=redis+sentinel://[[user]:password@]host:26379,host2:26379,host3:26379/mymaster[/db]``
(``?sentinel_password=...`` when the sentinels require one of their own). Every client of inferq's makes its
connections through ``pool_kwargs``: each new connection asks the sentinels where the master of ``mymaster``
is now, and a connection whose server stopped being the master (a failover demoted it: ``READONLY``) is
closed, so the next command reconnects to the new one. The Celery broker uses kombu's sentinel transport
with the same sentinels (``celery_broker``), and the API's pub/sub connection resolves the master the same
way each time it reconnects (api/streams.py).

What a failover can lose: Redis replicates asynchronously, so the writes the old master took in its last
moments may never reach the replica that takes over. The replica holds a prefix of the master's writes (in
order), which is what inferq recovers from: a job whose record is gone is submitted again by the API that
follows it, one whose message is gone is re-sent by the sweep of unsent jobs, a worker's lost heartbeat is
written again within an interval, and a stream whose events were lost continues from the job's event log
or ends with an error event (README, Operations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis
import redis.asyncio as aredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

SCHEME = "redis+sentinel"
DEFAULT_PORT = 26379


@dataclass(frozen=True)
class SentinelConfig:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def parse(url: str) -> SentinelConfig | None:
    """The sentinel configuration ``url`` names, or None for a plain ``redis://`` (or ``unix://``) URL."""
    parts = urlsplit(url)
    if parts.scheme != SCHEME:
        return None
    # urlsplit's hostname/port take one host; the sentinels are a comma-separated list.
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        if not host:
            raise ValueError(f"{SCHEME} URL: a sentinel address without a host: {item!r}")
        sentinels.append((host, int(port) if port else DEFAULT_PORT))
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path:
        raise ValueError(f"{SCHEME} URL names no master: {SCHEME}://host:26379/<master name>[/db]")
    query = parse_qs(parts.query)
    return SentinelConfig(
        sentinels=tuple(sentinels),
        service=path[0],
        db=int(path[1]) if len(path) > 1 else 0,
        username=unquote(user) or None,
        password=unquote(password) or None,
        sentinel_password=query.get("sentinel_password", [None])[0],
    )


def _sentinel_kwargs(config: SentinelConfig, timeout: float) -> dict[str, Any]:
    # A sentinel that is down or frozen must not hold up the lookup: the next one is asked.
    kwargs: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if config.sentinel_password:
        kwargs["password"] = config.sentinel_password
    return kwargs


# What a master that a failover demoted answers a blocked or a writing command.
_DEMOTED = ("UNBLOCKED force unblock from blocking operation, instance state changed",)


def _demoted(error: redis.ResponseError) -> bool:
    return isinstance(error, redis.ReadOnlyError) or str(error).startswith(_DEMOTED)


class _FollowsMaster:
    """Mixed into a redis-py connection class: each socket connect asks the sentinels for the master's
    address first (a failover moves it), and a reply that says this server was demoted closes the connection
    and raises a connection error, so the command's retry, or the next command, reconnects to the new
    master."""

    def __init__(self, *, sentinel: Sentinel, service: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sentinel = sentinel
        self.service = service

    def _connect(self) -> Any:
        self.host, self.port = self.sentinel.discover_master(self.service)
        return super()._connect()  # type: ignore[misc]

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.ResponseError as exc:
            if not _demoted(exc):
                raise
            self.disconnect()  # type: ignore[attr-defined]
            raise redis.ConnectionError(f"{self.host}:{self.port} is no longer the master") from None


class _FollowsMasterAsync:
    """``_FollowsMaster`` for redis-py's asyncio connections."""

    def __init__(self, *, sentinel: AsyncSentinel, service: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sentinel = sentinel
        self.service = service

    async def _connect(self) -> None:
        self.host, self.port = await self.sentinel.discover_master(self.service)
        await super()._connect()  # type: ignore[misc]

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.ResponseError as exc:
            if not _demoted(exc):
                raise
            await self.disconnect()  # type: ignore[attr-defined]
            raise redis.ConnectionError(f"{self.host}:{self.port} is no longer the master") from None


class FollowsMaster(_FollowsMaster, redis.Connection):
    pass


class FollowsMasterAsync(_FollowsMasterAsync, aredis.Connection):
    pass


def pool_kwargs(url: str, *, asyncio: bool = False, sentinel_timeout: float = 0.5) -> dict[str, Any]:
    """What a redis-py connection pool for ``url`` is made with: redis-py's own reading of a plain URL, or,
    for a sentinel URL, connections that find the master through the sentinels."""
    config = parse(url)
    if config is None:
        if asyncio:
            from redis.asyncio.connection import parse_url as parse_async

            return dict(parse_async(url))
        from redis.connection import parse_url as parse_sync

        return dict(parse_sync(url))  # type: ignore[no-untyped-call]
    kwargs: dict[str, Any] = {"db": config.db, "service": config.service}
    if config.password:
        kwargs["password"] = config.password
    if config.username:
        kwargs["username"] = config.username
    sentinel_kwargs = _sentinel_kwargs(config, sentinel_timeout)
    if asyncio:
        kwargs["connection_class"] = FollowsMasterAsync
        kwargs["sentinel"] = AsyncSentinel(list(config.sentinels), sentinel_kwargs=sentinel_kwargs)
    else:
        kwargs["connection_class"] = FollowsMaster
        kwargs["sentinel"] = Sentinel(list(config.sentinels), sentinel_kwargs=sentinel_kwargs)
    return kwargs


class MasterAddress:
    """For a connection made by hand (api/streams.py): where the master is now, asked of the sentinels on
    each call."""

    def __init__(self, config: SentinelConfig, timeout: float) -> None:
        self.service = config.service
        self.sentinel = AsyncSentinel(
            list(config.sentinels), sentinel_kwargs=_sentinel_kwargs(config, timeout)
        )

    async def __call__(self) -> tuple[str, int]:
        host, port = await self.sentinel.discover_master(self.service)
        return str(host), int(port)

    async def aclose(self) -> None:
        await close_sentinels({"sentinel": self.sentinel})


def master_address(url: str, timeout: float = 0.5) -> MasterAddress | None:
    """The master's address finder for a sentinel URL; None for a plain one."""
    config = parse(url)
    return None if config is None else MasterAddress(config, timeout)


async def close_sentinels(kwargs: dict[str, Any]) -> None:
    """Close the connections to the sentinels that an asyncio pool made with ``pool_kwargs`` holds (closing
    the pool closes only its connections to the master)."""
    sentinel = kwargs.get("sentinel")
    if isinstance(sentinel, AsyncSentinel):
        for client in sentinel.sentinels:
            await client.aclose()


def celery_broker(url: str, timeout: float = 2.0) -> tuple[str, dict[str, Any]]:
    """The broker URL and extra transport options for Celery: kombu's ``sentinel://`` transport, one URL per
    sentinel (its way of listing them), for a sentinel URL; ``url`` itself otherwise."""
    config = parse(url)
    if config is None:
        return url, {}
    auth = ""
    if config.password:
        auth = f"{quote(config.username or '', safe='')}:{quote(config.password, safe='')}@"
    broker = ";".join(f"sentinel://{auth}{h}:{p}/{config.db}" for h, p in config.sentinels)
    return broker, {"master_name": config.service, "sentinel_kwargs": _sentinel_kwargs(config, timeout)}
