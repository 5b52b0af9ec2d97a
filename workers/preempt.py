"""When a running batch line gives its slot to an interactive request.

A worker takes the next message only when a slot frees, so without this an interactive request that
arrives while every slot runs a batch line waits for one of those lines to finish. Instead, a batch line
looks every few tens of milliseconds for interactive messages waiting on the queues this worker consumes
(only their priority-0 lists: batch lines sit in the lowest one), and if there is one it stops and goes back
to the queue as its next attempt; the freed slot then pops the interactive message first.
"""

from __future__ import annotations

import redis

from queueing import keys
from queueing.jobs import Job

# KEYS: this worker's own queue, then per model its shared queue and its preempt counter. ARGV: ms a yield
# counts against a model's waiting requests. A request in the worker's own queue can only be served here;
# one in a shared queue is yielded for by as many workers as there are such requests, not by all of them.
_WANTED = """
if redis.call('LLEN', KEYS[1]) > 0 then return 1 end
for i = 2, #KEYS, 2 do
  local waiting = redis.call('LLEN', KEYS[i])
  if waiting > 0 then
    local yielded = tonumber(redis.call('GET', KEYS[i + 1]) or '0')
    if yielded < waiting then
      redis.call('INCR', KEYS[i + 1])
      redis.call('PEXPIRE', KEYS[i + 1], ARGV[1])
      return 1
    end
  end
end
return 0
"""


class Preemption:
    def __init__(
        self, client: redis.Redis, worker: str, slots: int, max_yields: int = 3, hold_ms: int = 300
    ) -> None:
        self.worker = worker
        self.slots = slots
        # A line that yielded this often runs to its end: a steady stream of requests must not starve it.
        self.max_yields = max_yields
        self.hold_ms = hold_ms
        self._wanted = client.register_script(_WANTED)

    def wanted(self, job: Job, models: list[str], busy: int) -> bool:
        """Should ``job`` give its slot up now? ``busy`` is how many jobs this worker runs."""
        if job.priority != "batch" or busy < self.slots or job.attempt > self.max_yields:
            return False
        queues = [k for m in models for k in (keys.model_queue(m), keys.preempt_key(m))]
        return bool(self._wanted(keys=[keys.worker_queue(self.worker), *queues], args=[self.hold_ms]))
