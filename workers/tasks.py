"""Celery tasks: decode the job, hand it to the runner. All the work is in runner.py."""

from __future__ import annotations

from typing import Any

from queueing import keys
from queueing.jobs import Job
from workers.app import app
from workers.runtime import get_runtime


@app.task(name=keys.GENERATE_TASK)
def generate(job: dict[str, Any]) -> None:
    rt = get_runtime()
    parsed = Job.model_validate(job)
    # Marks the model busy, so that neither the idle sweep nor an eviction unloads it under this job.
    with rt.models.using(parsed.model):
        rt.runner.run(parsed)
