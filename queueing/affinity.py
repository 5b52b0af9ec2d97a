"""Affinity routing: a job goes to the worker whose engine most likely still holds its prompt's prefix.

Workers record what they served (``Recorder``): the block hashes of each job's text and reply
(queueing/prefixes.py) in a sorted set of their own, scored by the Redis time, trimmed to a bound and
expiring; and, for a job with an explicit session, which worker served that session last.

The API's pick is one Lua script over the fresh candidates. Per worker: its jobs in flight, the longest
chain prefix it holds (a binary search: a worker that holds block *k* of a chain served the blocks before
it too), and the expected cost there: the prefill of the prompt's uncached part at the worker's measured
prefill speed, plus the wait for one of its slots (the jobs ahead, at its measured service time). The
cheapest worker wins, unless the fleet is imbalanced: then the least loaded one does. With
nothing cached anywhere the job goes to the least loaded worker with a free slot or, when every slot is
busy, to the model's shared queue for whichever worker frees first: a worker never queues work that
another could start, for a cache it does not have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis
import redis.asyncio as aredis

from queueing import keys, prefixes
from queueing._codec import text
from queueing.jobs import Job
from queueing.registry import WorkerInfo, expected_seconds

# A worker's prefix set keeps at most this many block hashes (the newest): 64 conversations of 2k tokens.
MAX_BLOCKS_HELD = 8192
# Prefill tokens/s assumed for a worker not measured yet while no other worker is either.
DEFAULT_PREFILL_TPS = 100.0

# KEYS: the worker's prefix set, then the session key when the job has a session.
# ARGV: ttl ms, most block hashes kept, worker name, then the block hashes.
_RECORD = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl, keep = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 4, #ARGV do redis.call('ZADD', KEYS[1], now, ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
local n = redis.call('ZCARD', KEYS[1])
if n > keep then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - keep - 1) end
redis.call('PEXPIRE', KEYS[1], ttl)
if #KEYS > 1 then redis.call('SET', KEYS[2], ARGV[3], 'PX', ttl) end
return n
"""

# KEYS: job record, seen zset, rotation cursor, then the session key when the job has a session.
# ARGV: job id, freshness ms, worker key prefix, ttl ms, imbalance: absolute and ratio, the prompt's
# estimated tokens, tokens per block, candidate count; per candidate (name, slots, prefill tokens/s, seconds
# one job takes there, 0 while unmeasured); then the prompt's block hashes.
# Returns {worker, matched tokens, 'cache' | 'spill' | 'cold'}, or nil: the model's shared queue.
_PICK = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local job, fresh, prefix, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local abs, ratio = tonumber(ARGV[5]), tonumber(ARGV[6])
local prompt, per_block, n = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local first_hash = 10 + 4 * n
local chain = #ARGV - first_hash + 1
local session_worker = false
if #KEYS > 3 then session_worker = redis.call('GET', KEYS[4]) end
local names, loads, slots, matched, costs = {}, {}, {}, {}, {}
for c = 0, n - 1 do
  local name = ARGV[10 + 4 * c]
  local seen = redis.call('ZSCORE', KEYS[2], name)
  if seen and tonumber(seen) >= now - fresh then
    local held = prefix .. name .. ':prefixes'
    local lo, hi = 0, chain
    while lo < hi do
      local mid = math.floor((lo + hi + 1) / 2)
      local at = redis.call('ZSCORE', held, ARGV[first_hash + mid - 1])
      if at and tonumber(at) >= now - ttl then lo = mid else hi = mid - 1 end
    end
    local m = math.min(lo * per_block, prompt)
    if session_worker == name then m = prompt end
    local load = redis.call('SCARD', prefix .. name .. ':jobs')
      + redis.call('SCARD', prefix .. name .. ':assigned')
    local slot = tonumber(ARGV[11 + 4 * c])
    -- The uncached part's prefill, plus the wait for a free slot behind the jobs ahead of this one.
    local wait = math.max(0, load - slot + 1) * tonumber(ARGV[13 + 4 * c]) / slot
    table.insert(names, name)
    table.insert(loads, load)
    table.insert(slots, slot)
    table.insert(matched, m)
    table.insert(costs, (prompt - m) / tonumber(ARGV[12 + 4 * c]) + wait)
  end
end
if #names == 0 then return false end
-- Ties rotate, so that cold conversations spread over idle workers.
local start = redis.call('INCR', KEYS[3])
local best, least, cached = nil, nil, false
for k = 0, #names - 1 do
  local i = (start + k) % #names + 1
  if least == nil or loads[i] < loads[least] then least = i end
  if best == nil or costs[i] < costs[best] or (costs[i] == costs[best] and loads[i] < loads[best]) then
    best = i
  end
  cached = cached or matched[i] > 0
end
local pick, why = best, 'cache'
if cached then
  if loads[best] - loads[least] > abs and loads[best] > ratio * loads[least] then
    pick, why = least, 'spill'
  end
elseif loads[least] < slots[least] then
  pick, why = least, 'cold'
else
  pick = nil
end
if pick == nil then return false end
redis.call('SADD', prefix .. names[pick] .. ':assigned', job)
redis.call('HSET', KEYS[1], 'routed_to', names[pick])
return {names[pick], matched[pick], why}
"""


@dataclass(frozen=True)
class Prefix:
    """What the pick matches a job by: its text's block hashes, its estimated length, its session."""

    hashes: list[str]
    tokens: int
    session: str | None = None

    @classmethod
    def of(cls, job: Job) -> Prefix:
        text = prefixes.job_text(job)
        return cls(prefixes.block_hashes(text), prefixes.estimated_tokens(text), job.session)


@dataclass(frozen=True)
class Balance:
    """When the fleet counts as imbalanced: the cache's worker has more than ``absolute`` jobs in flight
    beyond the least loaded worker's, and more than ``ratio`` times as many."""

    absolute: int = 2
    ratio: float = 2.0


@dataclass(frozen=True)
class Choice:
    worker: str
    matched_tokens: int
    # cache: the worker holding the longest prefix; spill: the least loaded, the fleet being imbalanced;
    # cold: nothing cached anywhere, the least loaded worker with a free slot.
    reason: str


def prefill_speeds(workers: Sequence[WorkerInfo]) -> list[float]:
    """Each worker's measured prefill tokens/s; an unmeasured one is taken to be as fast as the mean of the
    measured ones (so that it is neither favoured nor avoided while it is measured)."""
    measured = [w.ewma_prefill_tps for w in workers if w.ewma_prefill_tps]
    default = sum(measured) / len(measured) if measured else DEFAULT_PREFILL_TPS
    return [w.ewma_prefill_tps or default for w in workers]


class AffinityPicker:
    """The API side: one script call per pick."""

    def __init__(self, client: aredis.Redis, fresh_ms: int, ttl: float, balance: Balance) -> None:
        self._script = client.register_script(_PICK)
        self._fresh_ms = fresh_ms
        self._ttl_ms = int(ttl * 1000)
        self._balance = balance

    async def pick(
        self, model: str, job_id: str, candidates: Sequence[WorkerInfo], prefix: Prefix, max_tokens: int = 1
    ) -> Choice | None:
        argv: list[str | int | float] = [
            job_id,
            self._fresh_ms,
            keys.WORKER_PREFIX,
            self._ttl_ms,
            self._balance.absolute,
            self._balance.ratio,
            max(prefix.tokens, 1),
            prefixes.tokens_per_block(),
            len(candidates),
        ]
        for w, speed in zip(candidates, prefill_speeds(candidates), strict=True):
            service = expected_seconds(w, 0, max_tokens) or 0.0
            argv += [w.name, max(1, w.concurrency), speed, service]
        argv += prefix.hashes
        script_keys = [keys.job_key(job_id), keys.WORKERS_SEEN, keys.route_rr_key(model)]
        if prefix.session is not None:
            script_keys.append(keys.session_key(model, prefix.session))
        chosen = await self._script(keys=script_keys, args=argv)
        if not chosen:
            return None
        name, matched, reason = chosen
        return Choice(text(name), int(matched), text(reason))


class Recorder:
    """The worker side: after a job ran, its engine holds that job's text and reply."""

    def __init__(self, client: redis.Redis, worker: str, ttl: float, keep: int = MAX_BLOCKS_HELD) -> None:
        self._script = client.register_script(_RECORD)
        self._worker = worker
        self._ttl_ms = int(ttl * 1000)
        self._keep = keep

    def record(self, job: Job, reply: str | None) -> None:
        hashes = prefixes.block_hashes(prefixes.job_text(job, reply))
        if not hashes and job.session is None:
            return
        script_keys = [keys.worker_prefixes_key(self._worker)]
        if job.session is not None:
            script_keys.append(keys.session_key(job.model, job.session))
        self._script(keys=script_keys, args=[self._ttl_ms, self._keep, self._worker, *hashes])
