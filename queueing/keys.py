"""Every Redis key, pub/sub channel, Celery queue and task name that inferq uses, in one place."""

from __future__ import annotations

PREFIX = "inferq"

# Celery task names: the API enqueues by name so it never imports worker code.
GENERATE_TASK = "inferq.generate"

# One shared queue per model; workers consume the queues of the models they have loaded.
MODEL_QUEUE_PREFIX = f"{PREFIX}.model."

# Worker registry: a heartbeat key with a TTL per worker, plus the set of names ever announced, so a worker
# that vanished without deregistering can still be found and its jobs recovered.
WORKERS_SET = f"{PREFIX}:workers"
WORKER_PREFIX = f"{PREFIX}:worker:"

# Job records: one hash per request, and per worker the set of jobs it is running.
JOB_PREFIX = f"{PREFIX}:job:"
STREAM_PREFIX = f"{PREFIX}:stream:"
REAP_LOCK_PREFIX = f"{PREFIX}:lock:reap:"


def model_queue(model: str) -> str:
    return f"{MODEL_QUEUE_PREFIX}{model}"


def worker_key(name: str) -> str:
    return f"{WORKER_PREFIX}{name}"


def worker_jobs_key(name: str) -> str:
    return f"{WORKER_PREFIX}{name}:jobs"


def job_key(request_id: str) -> str:
    return f"{JOB_PREFIX}{request_id}"


def stream_channel(request_id: str) -> str:
    return f"{STREAM_PREFIX}{request_id}"


def reap_lock_key(worker: str) -> str:
    return f"{REAP_LOCK_PREFIX}{worker}"
