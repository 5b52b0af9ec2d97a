"""The worker registry: each worker's heartbeat key holds what it serves and how it is doing, and expires
when the worker stops beating.

Two notions of "alive": a worker is *fresh* while its last beat (in Redis server time, one clock for the
fleet) is within two heartbeat intervals, and only fresh workers are routed to; it is *dead* once its
heartbeat key expired (the TTL, a few intervals), and only then are its jobs taken back. Being wrong about
freshness costs a detour; being wrong about death costs a job run twice.
"""

from __future__ import annotations

import time
from typing import Literal

import redis
import redis.asyncio as aredis
from pydantic import BaseModel, Field, computed_field

from queueing import keys
from queueing._codec import text

ModelState = Literal["loading", "ready", "unloading"]


class ModelStatus(BaseModel):
    state: ModelState
    engine: str
    pinned: bool = False
    bytes: int = 0
    last_used: float = Field(default_factory=time.time)
    keep_alive: float | None = None  # seconds idle before unloading; None: never


class LoadFailure(BaseModel):
    message: str
    at: float = Field(default_factory=time.time)


class PromptCacheInfo(BaseModel):
    """What a worker's engines hold of earlier prompts, and how often a generation found its prefix there."""

    entries: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def hit_rate(self) -> float | None:
        """Share of generations that took part of their prompt from the cache."""
        total = self.hits + self.misses
        return None if total == 0 else round(self.hits / total, 4)


class WorkerInfo(BaseModel):
    name: str
    node: str = ""  # Celery nodename, the destination of remote-control commands
    host: str
    pid: int
    platform: str = ""
    engine: str
    # Models ready to serve (their queues are consumed); model_states also has those loading or unloading.
    models: list[str]
    # False while running jobs stopped moving (workers/liveness.py): routing leaves the worker alone, and
    # the stalled models are neither in ``models`` nor consumed, until they move again.
    healthy: bool = True
    stalled: list[str] = []
    model_states: dict[str, ModelStatus] = {}
    # Catalog models this worker's engine can load on demand, and the last load failure of each.
    capable: list[str] = []
    load_errors: dict[str, LoadFailure] = {}
    concurrency: int
    weight: float = 1.0
    max_models: int = 0
    memory_budget: int = 0
    in_flight: int = 0
    completed: int = 0
    failed: int = 0
    tokens_generated: int = 0
    ewma_ttft: float | None = None  # seconds to the first token
    ewma_tpot: float | None = None  # seconds per output token after the first
    ewma_prefill_tps: float | None = None  # prompt tokens evaluated per second (uncached ones)
    prompt_cache: PromptCacheInfo = PromptCacheInfo()
    started_at: float = Field(default_factory=time.time)
    heartbeat_at: float = Field(default_factory=time.time)


def expected_seconds(worker: WorkerInfo, load: int, max_tokens: int) -> float | None:
    """How long a new job would take on ``worker``: its measured service time, stretched by the jobs queued
    ahead of it beyond its free slots. None while the worker has not been measured yet."""
    if worker.ewma_ttft is None or worker.ewma_tpot is None:
        return None
    service = worker.ewma_ttft + worker.ewma_tpot * max(max_tokens - 1, 0)
    queued_ahead = max(0, load - worker.concurrency + 1)
    return service * (1 + queued_ahead / worker.concurrency)


# KEYS: heartbeat key, workers set, seen zset. ARGV: info json, ttl ms, name.
_ANNOUNCE = """
local t = redis.call('TIME')
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], t[1] * 1000 + math.floor(t[2] / 1000), ARGV[3])
return 1
"""

# KEYS: seen zset. ARGV: freshness ms, heartbeat key prefix. Returns the infos of fresh workers.
_FRESH = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local names = redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')
local out = {}
for _, name in ipairs(names) do
  local raw = redis.call('GET', ARGV[2] .. name)
  if raw then table.insert(out, raw) end
end
return out
"""


def announce(client: redis.Redis, info: WorkerInfo, ttl: float) -> None:
    info.heartbeat_at = time.time()
    client.eval(
        _ANNOUNCE,
        3,
        keys.worker_key(info.name),
        keys.WORKERS_SET,
        keys.WORKERS_SEEN,
        info.model_dump_json(),
        int(ttl * 1000),
        info.name,
    )


def deregister(client: redis.Redis, name: str) -> None:
    with client.pipeline(transaction=False) as pipe:
        pipe.delete(keys.worker_key(name))
        pipe.srem(keys.WORKERS_SET, name)
        pipe.zrem(keys.WORKERS_SEEN, name)
        pipe.execute()


def known_names(members: set[bytes | str]) -> list[str]:
    return sorted(text(m) for m in members)


def known_workers(client: redis.Redis) -> list[str]:
    return known_names(client.smembers(keys.WORKERS_SET))


def is_alive(client: redis.Redis, name: str) -> bool:
    return bool(client.exists(keys.worker_key(name)))


async def live_workers(client: aredis.Redis) -> list[WorkerInfo]:
    """Workers whose heartbeat key has not expired (fresh or not)."""
    names = sorted(text(m) for m in await client.smembers(keys.WORKERS_SET))
    if not names:
        return []
    raws = await client.mget([keys.worker_key(n) for n in names])
    return [WorkerInfo.model_validate_json(raw) for raw in raws if raw is not None]


async def fresh_workers(client: aredis.Redis, fresh_seconds: float) -> list[WorkerInfo]:
    """Healthy workers seen within ``fresh_seconds``: the candidates for new work. A worker whose jobs
    stalled still beats, but anything routed to it would wait behind them."""
    raws = await client.eval(_FRESH, 1, keys.WORKERS_SEEN, int(fresh_seconds * 1000), keys.WORKER_PREFIX)
    infos = [WorkerInfo.model_validate_json(raw) for raw in raws]
    return sorted((w for w in infos if w.healthy), key=lambda w: w.name)


async def is_alive_async(client: aredis.Redis, name: str) -> bool:
    return bool(await client.exists(keys.worker_key(name)))
