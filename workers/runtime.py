"""What one worker process holds once it started: its name, Redis, loaded models, runner and heartbeat."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import redis
from celery import Celery

from queueing import keys
from queueing.catalog import Catalog
from queueing.celery_app import enqueue
from queueing.registry import WorkerInfo
from queueing.settings import Settings
from workers.heartbeat import Heartbeat
from workers.models import ModelManager
from workers.runner import JobRunner

logger = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    name: str
    client: redis.Redis
    models: ModelManager
    runner: JobRunner
    heartbeat: Heartbeat | None = None

    def queues(self) -> list[str]:
        return [keys.model_queue(m) for m in self.models.loaded()]


_runtime: WorkerRuntime | None = None


def start_runtime(settings: Settings, catalog: Catalog, nodename: str) -> WorkerRuntime:
    """Load this worker's models; called once per worker process before it consumes."""
    global _runtime
    name = settings.worker_name or nodename
    client = redis.Redis.from_url(settings.redis_url)
    models = ModelManager(catalog, settings.worker_engine, settings.llamacpp_threads)
    for model in settings.model_list():
        models.load(model)
    _runtime = WorkerRuntime(name=name, client=client, models=models, runner=JobRunner(name, client, models))
    return _runtime


def start_heartbeat(app: Celery, settings: Settings, runtime: WorkerRuntime) -> None:
    """Advertise the worker; called once it consumes, so it is never listed before it can serve."""
    info = WorkerInfo(
        name=runtime.name,
        host=socket.gethostname(),
        pid=os.getpid(),
        engine=",".join(runtime.models.engine_names()),
        models=runtime.models.loaded(),
        concurrency=settings.worker_concurrency,
    )
    runtime.heartbeat = Heartbeat(
        runtime.client,
        info,
        settings.heartbeat_interval,
        settings.heartbeat_ttl,
        lambda job: enqueue(app, job),
    )
    runtime.heartbeat.recover_previous_life()
    runtime.heartbeat.beat()
    runtime.heartbeat.start()
    logger.info("worker %s serving %s", runtime.name, ", ".join(info.models))


def stop_runtime() -> None:
    global _runtime
    if _runtime is None:
        return
    if _runtime.heartbeat is not None:
        _runtime.heartbeat.stop()
    _runtime.models.close()
    _runtime.client.close()
    _runtime = None


def get_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("worker runtime not started: run this task inside an inferq worker")
    return _runtime
