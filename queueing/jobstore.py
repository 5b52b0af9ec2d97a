"""Job records in Redis: one hash per request, so that no accepted job is lost when its worker dies.

Transitions are Lua scripts so that a claim, a finish and a re-queue never interleave. The worker side is
synchronous (Celery threads) and the API side asynchronous; both use the scripts and field names here.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import redis
import redis.asyncio as aredis
from pydantic import BaseModel
from redis.typing import EncodableT, FieldT

from queueing import keys
from queueing._codec import text
from queueing.events import ErrorCode
from queueing.jobs import Job, JobState

# KEYS: job, worker's job set, worker's assigned set. ARGV: attempt, worker, now, job id.
_CLAIM = """
redis.call('SREM', KEYS[3], ARGV[4])
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[2], 'started_at', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
return 1
"""

# KEYS: job, worker's job set. ARGV: attempt, worker, job id, state, then field/value pairs of the result.
_FINISH = """
redis.call('SREM', KEYS[2], ARGV[3])
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[2] then
  return 0
end
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'running' and state ~= 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[4], unpack(ARGV, 5))
return 1
"""

# KEYS: job[, worker's job set]. ARGV: worker[, job id]. Returns the payload and the new attempt, or nil when
# the job moved on. For a dead worker (its sets are dropped afterwards), or for a running batch line that
# gives its own slot up (then the job leaves the worker's set here).
_REQUEUE = """
if #KEYS > 1 then redis.call('SREM', KEYS[2], ARGV[2]) end
if redis.call('HGET', KEYS[1], 'state') ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  return nil
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'queued')
redis.call('HDEL', KEYS[1], 'worker', 'routed_to')
return {redis.call('HGET', KEYS[1], 'payload'), attempt}
"""

# KEYS: job. ARGV: dead worker. Like _REQUEUE, for a job still waiting in the dead worker's own queue.
_REQUEUE_ROUTED = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return nil end
if redis.call('HGET', KEYS[1], 'routed_to') ~= ARGV[1] then return nil end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HDEL', KEYS[1], 'routed_to')
return {redis.call('HGET', KEYS[1], 'payload'), attempt}
"""

# KEYS: job, worker's assigned set. ARGV: worker, job id. Hands a job routed to this worker (which cannot
# serve it after all: its model was unloaded meanwhile) back to routing, keeping its attempt.
_UNROUTE = """
redis.call('SREM', KEYS[2], ARGV[2])
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
if redis.call('HGET', KEYS[1], 'routed_to') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'routed_to')
return 1
"""

# KEYS: worker's assigned set. ARGV: worker, job key prefix. Drops entries whose job is no longer waiting
# for this worker (finished, cancelled, re-routed, expired), so in-flight counts cannot drift for long.
_HEAL_ASSIGNED = """
local dropped = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local state = redis.call('HGET', ARGV[2] .. id, 'state')
  local routed = redis.call('HGET', ARGV[2] .. id, 'routed_to')
  if state ~= 'queued' or routed ~= ARGV[1] then
    redis.call('SREM', KEYS[1], id)
    dropped = dropped + 1
  end
end
return dropped
"""

# KEYS: job. Cancels a job that has not finished yet.
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' or state == 'running' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled')
  return 1
end
return 0
"""


class JobRecord(BaseModel):
    """A job's record as the API reads it back: where it stands and, once it ended, its result."""

    state: JobState
    attempt: int = 1
    model: str = ""
    worker: str | None = None
    routed_to: str | None = None
    created_at: float | None = None
    started_at: float | None = None
    # Set when the job ended (done, cancelled):
    text: str = ""
    finish_reason: Literal["stop", "length", "cancelled"] = "stop"
    stop_sequence: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # Embedding jobs: the vectors as a JSON text (a lost Finished event is rebuilt from them).
    embeddings: str | None = None
    # Failed jobs:
    error: str | None = None
    error_code: ErrorCode = ErrorCode.INTERNAL

    @classmethod
    def of(cls, raw: dict[str, str]) -> JobRecord | None:
        # The payload is the job itself; readers that need it decode it on their own.
        return cls.model_validate({k: v for k, v in raw.items() if k != "payload"}) if raw else None


class JobStore:
    """Worker side (synchronous)."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)
        self._requeue = client.register_script(_REQUEUE)
        self._requeue_routed = client.register_script(_REQUEUE_ROUTED)
        self._heal = client.register_script(_HEAL_ASSIGNED)
        self._unroute = client.register_script(_UNROUTE)

    def claim(self, job: Job, worker: str) -> bool:
        keys_ = [keys.job_key(job.id), keys.worker_jobs_key(worker), keys.worker_assigned_key(worker)]
        return bool(self._claim(keys=keys_, args=[job.attempt, worker, time.time(), job.id]))

    def finish(self, job: Job, worker: str, state: JobState, **result: str | int) -> bool:
        pairs: list[Any] = [v for item in result.items() for v in item]
        keys_ = [keys.job_key(job.id), keys.worker_jobs_key(worker)]
        return bool(self._finish(keys=keys_, args=[job.attempt, worker, job.id, state.value, *pairs]))

    def state(self, job_id: str) -> JobState | None:
        raw = self._r.hget(keys.job_key(job_id), "state")
        return JobState(text(raw)) if raw else None

    def running_on(self, worker: str) -> list[str]:
        return [text(m) for m in self._r.smembers(keys.worker_jobs_key(worker))]

    def assigned_to(self, worker: str) -> list[str]:
        return [text(m) for m in self._r.smembers(keys.worker_assigned_key(worker))]

    def is_waiting(self, job: Job) -> bool:
        """The job is queued and this is its current attempt (not finished, cancelled or superseded)."""
        state, attempt = self._r.hmget(keys.job_key(job.id), ["state", "attempt"])
        return state is not None and text(state) == JobState.QUEUED and int(attempt or 0) == job.attempt

    def runs_on(self, job: Job, worker: str) -> bool:
        """This attempt of the job is running on ``worker`` (its claim there went through)."""
        state, owner, attempt = self._r.hmget(keys.job_key(job.id), ["state", "worker", "attempt"])
        running = state is not None and text(state) == JobState.RUNNING
        return running and owner is not None and text(owner) == worker and int(attempt or 0) == job.attempt

    def unroute(self, job: Job, worker: str) -> bool:
        keys_ = [keys.job_key(job.id), keys.worker_assigned_key(worker)]
        return bool(self._unroute(keys=keys_, args=[worker, job.id]))

    def heal_assigned(self, worker: str) -> int:
        return int(self._heal(keys=[keys.worker_assigned_key(worker)], args=[worker, keys.JOB_PREFIX]))

    def forget_worker(self, worker: str) -> None:
        """Drop what a dead worker held: its job sets and the messages left in its own queue (their jobs
        were re-queued first; a stale message would be dropped at claim anyway)."""
        queue = keys.worker_queue(worker)
        self._r.delete(
            keys.worker_jobs_key(worker), keys.worker_assigned_key(worker), *keys.queue_list_keys(queue)
        )
        self._r.zrem(keys.WORKERS_SEEN, worker)

    def requeue(self, job_id: str, dead_worker: str) -> Job | None:
        """Hand a dead worker's running job back to the queue as its next attempt."""
        return self._next_attempt(self._requeue(keys=[keys.job_key(job_id)], args=[dead_worker]))

    def requeue_routed(self, job_id: str, dead_worker: str) -> Job | None:
        """Take back a job that waits in a dead worker's own queue, as its next attempt."""
        return self._next_attempt(self._requeue_routed(keys=[keys.job_key(job_id)], args=[dead_worker]))

    def yield_slot(self, job: Job, worker: str) -> Job | None:
        """Queue a running job again as its next attempt, freeing this worker's slot (preemption)."""
        keys_ = [keys.job_key(job.id), keys.worker_jobs_key(worker)]
        return self._next_attempt(self._requeue(keys=keys_, args=[worker, job.id]))

    @staticmethod
    def _next_attempt(found: list[bytes] | None) -> Job | None:
        if not found:
            return None
        payload, attempt = found
        return Job.model_validate_json(payload).model_copy(update={"attempt": int(attempt)})


class AsyncJobStore:
    """API side (asyncio)."""

    def __init__(self, client: aredis.Redis, ttl: float = 4200.0) -> None:
        self._r = client
        self._ttl = ttl
        self._cancel = client.register_script(_CANCEL)

    async def create(self, job: Job, ttl: float | None = None) -> None:
        key = keys.job_key(job.id)
        mapping: dict[FieldT, EncodableT] = {
            "state": JobState.QUEUED.value,
            "attempt": job.attempt,
            "model": job.model,
            "payload": job.model_dump_json(),
            "created_at": time.time(),
        }
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, int(ttl or self._ttl))
            await pipe.execute()

    async def resume_point(self, job_id: str) -> tuple[int, bool]:
        """Where a job whose record may already exist stands: the attempt to use, and whether that attempt
        is live (queued, running or ended) and only needs following. A missing or cancelled job is submitted
        again, as a new attempt so that a stale message of the old one is dropped at claim."""
        state, attempt = await self._r.hmget(keys.job_key(job_id), ["state", "attempt"])
        if state is None:
            return 1, False
        if text(state) == JobState.CANCELLED:
            return int(attempt or 0) + 1, False
        return int(attempt or 1), True

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self._r.hgetall(keys.job_key(job_id))
        return JobRecord.of({text(k): text(v) for k, v in raw.items()})

    async def cancel(self, job_id: str) -> bool:
        return bool(await self._cancel(keys=[keys.job_key(job_id)]))
