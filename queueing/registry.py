"""The worker registry: each worker's heartbeat key holds what it serves and expires when it stops beating."""

from __future__ import annotations

import time

import redis
import redis.asyncio as aredis
from pydantic import BaseModel, Field

from queueing import keys
from queueing._codec import text


class WorkerInfo(BaseModel):
    name: str
    host: str
    pid: int
    engine: str
    models: list[str]
    concurrency: int
    started_at: float = Field(default_factory=time.time)
    heartbeat_at: float = Field(default_factory=time.time)


def announce(client: redis.Redis, info: WorkerInfo, ttl: float) -> None:
    info.heartbeat_at = time.time()
    with client.pipeline(transaction=False) as pipe:
        pipe.set(keys.worker_key(info.name), info.model_dump_json(), px=int(ttl * 1000))
        pipe.sadd(keys.WORKERS_SET, info.name)
        pipe.execute()


def deregister(client: redis.Redis, name: str) -> None:
    with client.pipeline(transaction=False) as pipe:
        pipe.delete(keys.worker_key(name))
        pipe.srem(keys.WORKERS_SET, name)
        pipe.execute()


def known_workers(client: redis.Redis) -> list[str]:
    return sorted(text(m) for m in client.smembers(keys.WORKERS_SET))


def is_alive(client: redis.Redis, name: str) -> bool:
    return bool(client.exists(keys.worker_key(name)))


async def live_workers(client: aredis.Redis) -> list[WorkerInfo]:
    names = sorted(text(m) for m in await client.smembers(keys.WORKERS_SET))
    if not names:
        return []
    raws = await client.mget([keys.worker_key(n) for n in names])
    return [WorkerInfo.model_validate_json(raw) for raw in raws if raw is not None]


async def is_alive_async(client: aredis.Redis, name: str) -> bool:
    return bool(await client.exists(keys.worker_key(name)))
