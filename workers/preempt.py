"""When a running job gives its slot to a request of a higher class.

A worker takes the next message only when a slot frees, so without this a request that arrives while every
slot runs lower-class work waits for one of those jobs to finish. Instead, a batch line or a low-class job
(and a normal one until its first token) looks every few tens of milliseconds for messages of a higher class
waiting on the queues this worker consumes (only the priority lists above its own), and if there is one it
stops and goes back to the queue as its next attempt; the freed slot then pops the higher-class message
first. A job of a key over its fair share (queueing/bands.py, api/fairness.py) yields the same way to a key
of its class within its share: a stream of a key over its share of the tokens at any point, other jobs until
their first token. A stream that gave its slot up
after sending text continues where it stopped when it runs again (workers/migration.py).
"""

from __future__ import annotations

from collections import deque

import redis

from queueing import keys
from queueing.bands import yields_below
from queueing.jobs import Job

# KEYS: this worker's own queue's lists above the job's class, then per model its preempt counter and its
# shared queue's lists above the job's class. ARGV: ms a yield counts against a model's waiting requests at
# most, how many lists a queue has above the job's class. Returns 0, 1 (the worker's own queue) or the
# counter raised. A request in the worker's own queue can only be served here; one in a shared queue is
# yielded for by as many workers as there are such requests, not by all of them. A yield counts until the
# slot it freed took its next message (``refilled``; the request it yielded for is still in its list until
# then, and another job must not yield for it too), at most ARGV[1] ms: a request that comes after that has
# a slot yielded for it at once.
_WANTED = """
local n = tonumber(ARGV[2])
for i = 1, n do
  if redis.call('LLEN', KEYS[i]) > 0 then return 1 end
end
for base = n + 1, #KEYS, n + 1 do
  local waiting = 0
  for j = 1, n do waiting = waiting + redis.call('LLEN', KEYS[base + j]) end
  if waiting > 0 then
    local yielded = tonumber(redis.call('GET', KEYS[base]) or '0')
    if yielded < waiting then
      redis.call('INCR', KEYS[base])
      redis.call('PEXPIRE', KEYS[base], ARGV[1])
      return KEYS[base]
    end
  end
end
return 0
"""


# KEYS: a model's preempt counter. One yield fewer in progress (never below 0).
_SETTLE = """
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then redis.call('DECR', KEYS[1]) end
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
        self._settle = client.register_script(_SETTLE)
        # The counter each yielding job raised, until its slot is free (job id -> counter key).
        self._raised: dict[str, str] = {}
        # Then until the free slot takes its next message (job threads add, the next delivery takes).
        self._freed: deque[str] = deque()

    def wanted(self, job: Job, models: list[str], busy: int) -> bool:
        """Should ``job`` give its slot up now? ``busy`` is how many jobs this worker runs."""
        own = yields_below(job)
        if own == 0 or busy < self.slots or job.attempt > self.max_yields:
            return False
        above = keys.queue_list_keys(keys.worker_queue(self.worker), below=own)
        for m in models:
            above += [keys.preempt_key(m), *keys.queue_list_keys(keys.model_queue(m), below=own)]
        n = len(keys.queue_list_keys(keys.worker_queue(self.worker), below=own))
        found = self._wanted(keys=above, args=[self.hold_ms, n])
        if isinstance(found, bytes | str):
            self._raised[job.id] = found.decode() if isinstance(found, bytes) else found
        return bool(found)

    def settled(self, job: Job) -> None:
        """``job`` gave its slot up (or ended first): its yield stands until the slot takes its next message
        (``refilled``)."""
        raised = self._raised.pop(job.id, None)
        if raised is not None:
            self._freed.append(raised)

    def refilled(self) -> None:
        """A slot of this worker took a message: a yield whose slot was free no longer stands for a waiting
        request (the one it yielded for has left its list, in all likelihood for this slot)."""
        try:
            raised = self._freed.popleft()
        except IndexError:
            return
        self._settle(keys=[raised])
