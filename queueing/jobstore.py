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
from queueing.settings import get_settings

# Unsent-ledger scores are Redis' own clock in ms (TIME in the scripts): one clock for every process. A
# record that ended is kept only the retention more (PEXPIRE), never longer than the TTL it already has.

# KEYS: job, worker's job set, worker's assigned set, the model's drain bucket (keys.drain_key). ARGV:
# attempt, worker, now, job id.
_CLAIM = """
redis.call('SREM', KEYS[3], ARGV[4])
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[2], 'started_at', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
redis.call('INCR', KEYS[4])
redis.call('PEXPIRE', KEYS[4], 120000)
return 1
"""

# KEYS: job, worker's job set. ARGV: attempt, worker, job id, state, retention ms, then field/value pairs
# of the result. A record that is gone altogether (Redis restarted empty under the running job) is written
# anew with the result, so the request still waiting for it reads it from there.
_FINISH = """
redis.call('SREM', KEYS[2], ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'state', ARGV[4], 'attempt', ARGV[1], 'worker', ARGV[2], unpack(ARGV, 6))
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return 1
end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[2] then
  return 0
end
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'running' and state ~= 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[4], unpack(ARGV, 6))
local left = redis.call('PTTL', KEYS[1])
if left < 0 or left > tonumber(ARGV[5]) then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
return 1
"""

# KEYS: job, worker's job set, unsent ledger. ARGV: worker, job id, "1" to write the ledger entry. Returns
# the payload and the new attempt, or nil when the job moved on. For a dead worker (its sets are dropped
# afterwards), or for a running batch line that gives its own slot up. The ledger entry is written in this
# same step, so a re-queuer that dies before its send leaves the job to the sweep (_SWEEP_UNSENT).
_REQUEUE = """
redis.call('SREM', KEYS[2], ARGV[2])
if redis.call('HGET', KEYS[1], 'state') ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  return nil
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'queued')
redis.call('HDEL', KEYS[1], 'worker', 'routed_to')
if ARGV[3] == '1' then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[3], t[1] * 1000 + math.floor(t[2] / 1000), ARGV[2] .. '#' .. attempt)
end
return {redis.call('HGET', KEYS[1], 'payload'), attempt}
"""

# KEYS: job, unsent ledger. ARGV: dead worker, job id. Like _REQUEUE, for a job still waiting in the dead
# worker's own queue.
_REQUEUE_ROUTED = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return nil end
if redis.call('HGET', KEYS[1], 'routed_to') ~= ARGV[1] then return nil end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HDEL', KEYS[1], 'routed_to')
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], t[1] * 1000 + math.floor(t[2] / 1000), ARGV[2] .. '#' .. attempt)
return {redis.call('HGET', KEYS[1], 'payload'), attempt}
"""

# KEYS: unsent ledger. ARGV: job key prefix, age ms, most entries. The entries older than ``age``: one whose
# job still waits as that attempt is handed out (payload and attempt) and its score moved to now, so that
# other sweepers leave it alone for another ``age`` while this one sends it (and if this one dies too, the
# next sweep after that sends it); one whose job ended, moved on to a later attempt or expired is dropped.
_SWEEP_UNSENT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ARGV[2], 'LIMIT', 0, ARGV[3])
local out = {}
for _, member in ipairs(due) do
  local at = string.find(member, '#[^#]*$')
  local key = ARGV[1] .. string.sub(member, 1, at - 1)
  local attempt = string.sub(member, at + 1)
  local found = redis.call('HMGET', key, 'state', 'attempt', 'payload')
  if found[1] == 'queued' and found[2] == attempt and found[3] then
    redis.call('ZADD', KEYS[1], now, member)
    table.insert(out, found[3])
    table.insert(out, attempt)
  else
    redis.call('ZREM', KEYS[1], member)
  end
end
return out
"""

# KEYS: kombu's unacked index and hash, unsent ledger. ARGV: job key prefix, delivered before (seconds, the
# consumers' clock), most entries. A message taken off the shared queue that long ago whose job still waits,
# unclaimed and routed to nobody, as that very attempt, was taken by a worker that died before its claim (a
# live one claims within milliseconds): the job is handed out as its next attempt, listed as unsent. The
# task id in the message's headers is "<job id>.<attempt>" (queueing/celery_app.py).
_RESCUE_UNCLAIMED = """
local out = {}
local tags = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, tag in ipairs(tags) do
  local raw = redis.call('HGET', KEYS[2], tag)
  local id, attempt = nil, nil
  if raw then id, attempt = string.match(raw, '"id": "([^"]+)%.(%d+)"') end
  if id then
    local key = ARGV[1] .. id
    local found = redis.call('HMGET', key, 'state', 'attempt', 'payload', 'routed_to')
    if found[1] == 'queued' and found[2] == attempt and found[3] and not found[4] then
      local next = redis.call('HINCRBY', key, 'attempt', 1)
      local t = redis.call('TIME')
      redis.call('ZADD', KEYS[3], t[1] * 1000 + math.floor(t[2] / 1000), id .. '#' .. next)
      table.insert(out, found[3])
      table.insert(out, next)
    end
  end
end
return out
"""

# KEYS: unsent ledger. ARGV: member. An entry for a job about to be sent for the first time (AsyncJobStore).
_MARK_UNSENT = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000), ARGV[1])
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

# KEYS: job. ARGV: retention ms. Cancels a job that has not finished yet. A running one is stopped by its
# worker within a poll, long before the record expires.
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' or state == 'running' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled')
  local left = redis.call('PTTL', KEYS[1])
  if left < 0 or left > tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
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


def _retention_ms(retention: float | None) -> int:
    return int(1000 * (get_settings().job_retention if retention is None else retention))


def _jobs(found: list[bytes] | None) -> list[Job]:
    """Jobs from a script's flat reply of (payload, attempt) pairs."""
    pairs = found or []
    return [j for p, a in zip(pairs[::2], pairs[1::2], strict=True) if (j := JobStore.next_attempt([p, a]))]


class JobStore:
    """Worker side (synchronous). ``retention``: seconds a record is kept once its job ended (default: the
    ``job_retention`` setting)."""

    def __init__(self, client: redis.Redis, retention: float | None = None) -> None:
        self._r = client
        self._retention_ms = _retention_ms(retention)
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)
        self._requeue = client.register_script(_REQUEUE)
        self._requeue_routed = client.register_script(_REQUEUE_ROUTED)
        self._heal = client.register_script(_HEAL_ASSIGNED)
        self._unroute = client.register_script(_UNROUTE)
        self._sweep = client.register_script(_SWEEP_UNSENT)
        self._mark_unsent = client.register_script(_MARK_UNSENT)
        self._rescue = client.register_script(_RESCUE_UNCLAIMED)

    def claim(self, job: Job, worker: str) -> bool:
        now = time.time()
        drained = keys.drain_key(job.model, int(now // keys.DRAIN_BUCKET_SECONDS))
        keys_ = [
            keys.job_key(job.id),
            keys.worker_jobs_key(worker),
            keys.worker_assigned_key(worker),
            drained,
        ]
        return bool(self._claim(keys=keys_, args=[job.attempt, worker, now, job.id]))

    def finish(self, job: Job, worker: str, state: JobState, **result: str | int) -> bool:
        pairs: list[Any] = [v for item in result.items() for v in item]
        keys_ = [keys.job_key(job.id), keys.worker_jobs_key(worker)]
        args = [job.attempt, worker, job.id, state.value, self._retention_ms, *pairs]
        return bool(self._finish(keys=keys_, args=args))

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
        """Hand a dead worker's running job back to the queue as its next attempt, listed as unsent until
        ``sent`` (the caller sends it)."""
        keys_ = [keys.job_key(job_id), keys.worker_jobs_key(dead_worker), keys.JOBS_UNSENT]
        return self.next_attempt(self._requeue(keys=keys_, args=[dead_worker, job_id, 1]))

    def requeue_routed(self, job_id: str, dead_worker: str) -> Job | None:
        """Take back a job that waits in a dead worker's own queue, as its next attempt, listed as unsent
        until ``sent``."""
        keys_ = [keys.job_key(job_id), keys.JOBS_UNSENT]
        return self.next_attempt(self._requeue_routed(keys=keys_, args=[dead_worker, job_id]))

    def yield_slot(self, job: Job, worker: str) -> Job | None:
        """Queue a running job again as its next attempt, freeing this worker's slot (preemption), listed
        as unsent until ``sent`` (workers/tasks.py sends it)."""
        keys_ = [keys.job_key(job.id), keys.worker_jobs_key(worker), keys.JOBS_UNSENT]
        return self.next_attempt(self._requeue(keys=keys_, args=[worker, job.id, 1]))

    def rescue_unclaimed(self, delivered_before: float, limit: int = 1000) -> list[Job]:
        """Jobs whose message a consumer took before ``delivered_before`` (epoch seconds) and never claimed,
        each as its next attempt, listed as unsent until ``sent``."""
        keys_ = [keys.KOMBU_UNACKED_INDEX, keys.KOMBU_UNACKED, keys.JOBS_UNSENT]
        return _jobs(self._rescue(keys=keys_, args=[keys.JOB_PREFIX, delivered_before, limit]))

    def mark_unsent(self, job: Job) -> None:
        """List this attempt as unsent before a step that takes its message off the broker and sends it
        again (a worker handing back a job it cannot serve): dying in between leaves it to the sweep."""
        self._mark_unsent(keys=[keys.JOBS_UNSENT], args=[keys.unsent_member(job.id, job.attempt)])

    def sent(self, job: Job) -> None:
        """This attempt's message is on the broker: the sweep has nothing to re-send for it."""
        self._r.zrem(keys.JOBS_UNSENT, keys.unsent_member(job.id, job.attempt))

    def unsent_due(self, age: float, limit: int = 100) -> list[Job]:
        """Queued jobs listed as unsent for longer than ``age`` seconds, to send (then ``sent``) again."""
        return _jobs(self._sweep(keys=[keys.JOBS_UNSENT], args=[keys.JOB_PREFIX, int(age * 1000), limit]))

    @staticmethod
    def next_attempt(found: list[bytes] | None) -> Job | None:
        if not found:
            return None
        payload, attempt = found
        return Job.model_validate_json(payload).model_copy(update={"attempt": int(attempt)})


class AsyncJobStore:
    """API side (asyncio)."""

    def __init__(self, client: aredis.Redis, ttl: float = 4200.0, retention: float | None = None) -> None:
        self._r = client
        self._ttl = ttl
        self._retention_ms = _retention_ms(retention)
        self._cancel = client.register_script(_CANCEL)
        self._sweep = client.register_script(_SWEEP_UNSENT)

    async def create(self, job: Job, ttl: float | None = None, track_send: bool = False) -> None:
        """Write the record of a new job. With ``track_send`` the job is also listed as unsent, in the same
        transaction, until ``sent``: a process that dies before sending it leaves it to the sweep."""
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
            if track_send:
                pipe.eval(_MARK_UNSENT, 1, keys.JOBS_UNSENT, keys.unsent_member(job.id, job.attempt))
            await pipe.execute()

    async def sent(self, job: Job) -> None:
        await self._r.zrem(keys.JOBS_UNSENT, keys.unsent_member(job.id, job.attempt))

    async def unsent_due(self, age: float, limit: int = 100) -> list[Job]:
        """As JobStore.unsent_due."""
        found = await self._sweep(keys=[keys.JOBS_UNSENT], args=[keys.JOB_PREFIX, int(age * 1000), limit])
        return _jobs(found)

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
        return bool(await self._cancel(keys=[keys.job_key(job_id)], args=[self._retention_ms]))
