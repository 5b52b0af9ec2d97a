"""Celery tasks: decode the job, hand it to the runner. All the work is in runner.py."""

from __future__ import annotations

import logging
from typing import Any

from queueing import keys
from queueing.celery_app import enqueue
from queueing.jobs import Job
from workers.app import app
from workers.runtime import get_runtime

logger = logging.getLogger(__name__)


@app.task(name=keys.GENERATE_TASK)
def generate(job: dict[str, Any]) -> None:
    rt = get_runtime()
    parsed = Job.model_validate(job)
    if parsed.model not in rt.models.loaded() and rt.store.unroute(parsed, rt.name):
        # Routed here, but the model was unloaded since: back to the model's shared queue, same attempt.
        logger.info("model %s not loaded here; job %s goes to the shared queue", parsed.model, parsed.id)
        enqueue(app, parsed)
        return
    # Marks the model busy, so that neither the idle sweep nor an eviction unloads it under this job.
    with rt.models.using(parsed.model):
        rt.runner.run(parsed)
