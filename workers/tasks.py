"""Celery tasks: decode the job, hand it to the runner. All the work is in runner.py."""

from __future__ import annotations

import logging
from typing import Any

from queueing import keys
from queueing.celery_app import enqueue
from queueing.faults import fault
from queueing.jobs import Job
from workers.app import app
from workers.runtime import get_runtime

logger = logging.getLogger(__name__)


@app.task(name=keys.GENERATE_TASK)
def generate(job: dict[str, Any]) -> None:
    rt = get_runtime()
    parsed = Job.model_validate(job)
    fault("before_claim")
    if parsed.model not in rt.serving():
        # The model was unloaded or stalled here since the job was routed (or this worker is still leaving
        # the model's queue): back to the shared queue, same attempt, rather than failing it. Only a job
        # still waiting for this attempt goes back, so a stale delivery is dropped here as at claim. Listed
        # as unsent first: a worker killed before the send would leave the job queued behind a message that
        # the broker redelivers only after its visibility timeout (hours).
        rt.store.mark_unsent(parsed)
        if rt.store.unroute(parsed, rt.name) or rt.store.is_waiting(parsed):
            logger.info("model %s not loaded here; job %s goes to the shared queue", parsed.model, parsed.id)
            enqueue(app, parsed)
        rt.store.sent(parsed)
        return
    # Marks the model busy, so that neither the idle sweep nor an eviction unloads it under this job.
    with rt.models.using(parsed.model):
        again = rt.runner.run(parsed)
    if again is not None:
        # A batch line gave its slot to an interactive request, or this worker stops (drain): back to its
        # model's shared queue as its next attempt (listed as unsent by yield_slot until now).
        enqueue(app, again)
        rt.store.sent(again)
