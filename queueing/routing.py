"""Routing: which worker's own queue a job goes to, for every strategy beside plain ``queue``
(``affinity``'s pick is in queueing/affinity.py).

The choice and its bookkeeping are one Lua script, so several API processes share one round-robin cursor,
one set of smooth-weighted counters and one view of each worker's in-flight jobs. A worker's in-flight
count is the jobs it claimed (``:jobs``) plus those routed to its queue and not claimed yet (``:assigned``);
claims, finishes and the reaper keep both sets true, so the count heals itself when a worker dies.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import redis.asyncio as aredis

from queueing import keys
from queueing.affinity import AffinityPicker, Balance, Prefix
from queueing.catalog import Routing
from queueing.registry import WorkerInfo, expected_seconds

# KEYS: job record, seen zset, round-robin cursor, weighted counters.
# ARGV: strategy, job id, freshness ms, worker key prefix, then (name, weight, limit) per candidate.
# Returns the chosen worker, or nil when no candidate is fresh (or, for least_connections, none has room).
_PICK = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local strategy, job, fresh, prefix = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local names, weights, limits = {}, {}, {}
for i = 5, #ARGV, 3 do
  local seen = redis.call('ZSCORE', KEYS[2], ARGV[i])
  if seen and tonumber(seen) >= now - fresh then
    table.insert(names, ARGV[i])
    table.insert(weights, tonumber(ARGV[i + 1]))
    table.insert(limits, tonumber(ARGV[i + 2]))
  end
end
if #names == 0 then return false end
local pick = nil
if strategy == 'round_robin' then
  pick = (redis.call('INCR', KEYS[3]) - 1) % #names + 1
elseif strategy == 'weighted' then
  -- Smooth weighted round-robin (nginx): every pick raises each counter by its weight and lowers the
  -- winner's by the total, which interleaves picks instead of sending runs to the heaviest worker.
  local total, best = 0, nil
  for i, name in ipairs(names) do
    local v = tonumber(redis.call('HINCRBYFLOAT', KEYS[4], name, weights[i]))
    total = total + weights[i]
    if best == nil or v > best[2] then best = {i, v} end
  end
  redis.call('HINCRBYFLOAT', KEYS[4], names[best[1]], -total)
  pick = best[1]
elseif strategy == 'least_connections' then
  -- Among workers below their limit, the fewest in flight; ties rotate so idle workers share evenly.
  local start = redis.call('INCR', KEYS[3])
  local least = nil
  for k = 0, #names - 1 do
    local i = (start + k) % #names + 1
    local load = redis.call('SCARD', prefix .. names[i] .. ':jobs')
      + redis.call('SCARD', prefix .. names[i] .. ':assigned')
    if load < limits[i] and (least == nil or load < least) then pick, least = i, load end
  end
else
  -- 'ordered': the caller ranked the candidates; take the first one that is fresh.
  pick = 1
end
if pick == nil then return false end
redis.call('SADD', prefix .. names[pick] .. ':assigned', job)
redis.call('HSET', KEYS[1], 'routed_to', names[pick])
return names[pick]
"""

# Strategies decided in the script; the others rank candidates in Python and pass them 'ordered'.
_IN_SCRIPT = ("round_robin", "weighted", "least_connections")


def rank_fastest(
    workers: Sequence[WorkerInfo], loads: Sequence[int], max_tokens: int, explore: float, rng: random.Random
) -> list[WorkerInfo]:
    """Best expected completion first. Unmeasured workers come first (least loaded first) so that a new or
    recovered worker gets measured, and a share ``explore`` of picks goes to a random worker so that a
    measurement never goes stale."""
    if rng.random() < explore:
        return rng.sample(list(workers), len(workers))
    scored = [
        (expected_seconds(w, load, max_tokens), load, w) for w, load in zip(workers, loads, strict=True)
    ]
    unmeasured = sorted((s for s in scored if s[0] is None), key=lambda s: s[1])
    measured = sorted((s for s in scored if s[0] is not None), key=lambda s: (s[0], s[1]))
    return [s[2] for s in [*unmeasured, *measured]]


class Router:
    """Picks a fresh worker for a job and records the assignment (API side)."""

    def __init__(
        self,
        client: aredis.Redis,
        fresh_seconds: float,
        explore: float,
        rng: random.Random | None = None,
        affinity_ttl: float = 600.0,
        balance: Balance | None = None,
    ) -> None:
        self._r = client
        self._fresh_ms = int(fresh_seconds * 1000)
        self._explore = explore
        self._rng = rng or random.Random()
        self._pick = client.register_script(_PICK)
        self.affinity = AffinityPicker(client, self._fresh_ms, affinity_ttl, balance or Balance())

    async def loads(self, names: Sequence[str]) -> list[int]:
        async with self._r.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.scard(keys.worker_jobs_key(name))
                pipe.scard(keys.worker_assigned_key(name))
            counts = await pipe.execute()
        return [int(a) + int(b) for a, b in zip(counts[::2], counts[1::2], strict=True)]

    async def pick(
        self,
        strategy: Routing,
        model: str,
        job_id: str,
        candidates: Sequence[WorkerInfo],
        max_tokens: int,
        prefix: Prefix | None = None,
    ) -> str | None:
        """The worker chosen for ``job_id``, or None to fall back to the model's shared queue. ``affinity``
        matches ``prefix`` (none: no prefix, nothing to match)."""
        if strategy == "queue" or not candidates:
            return None
        if strategy == "affinity":
            choice = await self.affinity.pick(model, job_id, candidates, prefix or Prefix([], 0), max_tokens)
            return None if choice is None else choice.worker
        ranked = sorted(candidates, key=lambda w: w.name)
        script_strategy: str = strategy
        if strategy == "random":
            ranked, script_strategy = self._rng.sample(ranked, len(ranked)), "ordered"
        elif strategy == "fastest_response":
            loads = await self.loads([w.name for w in ranked])
            ranked = rank_fastest(ranked, loads, max_tokens, self._explore, self._rng)
            script_strategy = "ordered"
        argv: list[str | int | float] = [script_strategy, job_id, self._fresh_ms, keys.WORKER_PREFIX]
        for w in ranked:
            argv += [w.name, w.weight, max(1, w.concurrency)]
        chosen = await self._pick(
            keys=[
                keys.job_key(job_id),
                keys.WORKERS_SEEN,
                keys.route_rr_key(model),
                keys.route_weighted_key(model),
            ],
            args=argv,
        )
        return None if chosen is None else chosen.decode() if isinstance(chosen, bytes) else str(chosen)
