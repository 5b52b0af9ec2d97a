"""Where a job waits in its queue: the kombu priority step its message is sent with.

kombu's Redis transport keeps one list per step of a queue (0 to 9, 0 popped first), so a step is a place in
line that every worker honours without any scheduler of ours in between. Each class has a band of steps:

- ``high`` 0-1, ``interactive`` (the normal class) 2-3, ``low`` 4-5: the first step of a band for a key
  within its fair share of the model, the second for a key over it or with more requests than its split of
  the slots (api/fairness.py), so a key that sends ten times the others' load waits behind them, not they
  behind it;
- ``batch`` 6-9: by the time left before the line's batch expires (its ``completion_window``), so a batch
  about to expire gets idle capacity before one that has a day left.

A re-queued job (its worker died, or it gave its slot up) is sent with its step computed again: a batch
line's deadline comes closer.
"""

from __future__ import annotations

import time

from queueing.jobs import Job, Priority

BANDS: dict[Priority, tuple[int, ...]] = {
    "high": (0, 1),
    "interactive": (2, 3),
    "low": (4, 5),
    "batch": (6, 7, 8, 9),
}
# A batch line with less than this many seconds left goes to the step beside it; more than the last: step 9.
BATCH_TIME_LEFT = ((3600.0, 6), (6 * 3600.0, 7), (24 * 3600.0, 8))


def message_priority(job: Job, now: float | None = None) -> int:
    """The step ``job``'s message is sent with."""
    if job.priority == "batch":
        if job.deadline is None:
            return BANDS["batch"][-1]
        left = job.deadline - (time.time() if now is None else now)
        return next((step for most, step in BATCH_TIME_LEFT if left < most), BANDS["batch"][-1])
    fair, over = BANDS[job.priority]
    return fair if job.share == "within" else over


def keeps_slot_once_started(job: Job) -> bool:
    """Whether ``job`` stops yielding once it sent text: a normal or high one does, except a stream of a key
    over its share of the tokens, which continues where it stopped when it runs again
    (workers/migration.py), where other output would start again."""
    return job.priority in ("interactive", "high") and not (job.share == "over" and job.stream)


def yields_below(job: Job) -> int:
    """Work waiting on a step below this one takes ``job``'s slot (workers/preempt.py): any higher class, and
    within its class a key within its share when ``job``'s key is over it. Batch lines never yield to other
    batch lines (one with less time left gets the next free slot): a line that restarts loses its work."""
    if job.priority == "batch":
        return BANDS["batch"][0]
    return message_priority(job)
