"""What one worker process holds once it started: its name, Redis, loaded models, runner and heartbeat, and
the glue that turns a model becoming ready (or going away) into consuming (or leaving) its queue."""

from __future__ import annotations

import logging
import os
import platform
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from queueing import keys
from queueing.catalog import Catalog
from queueing.celery_app import enqueue
from queueing.jobstore import JobStore
from queueing.registry import LoadFailure, ModelState, WorkerInfo
from queueing.settings import Settings
from workers.heartbeat import Heartbeat
from workers.models import ModelManager
from workers.preempt import Preemption
from workers.runner import JobRunner
from workers.stats import WorkerStats

logger = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    name: str
    node: str
    settings: Settings
    client: redis.Redis
    models: ModelManager
    runner: JobRunner
    stats: WorkerStats
    store: JobStore
    concurrency: int = 1
    heartbeat: Heartbeat | None = None
    # Celery's consumer, once the worker consumes; queue changes are handed to its event loop.
    consumer: Any = None
    started_at: float = field(default_factory=time.time)

    def queues(self) -> list[str]:
        return [keys.worker_queue(self.name), *(keys.model_queue(m) for m in self.models.loaded())]

    def info(self) -> WorkerInfo:
        s = self.stats.snapshot()
        return WorkerInfo(
            name=self.name,
            node=self.node,
            host=socket.gethostname(),
            pid=os.getpid(),
            platform=f"{platform.system().lower()}-{platform.machine().lower()}",
            engine=",".join(self.models.engine_names()) or (self.settings.worker_engine or ""),
            models=self.models.loaded(),
            model_states=self.models.statuses(),
            capable=self.models.capable(),
            load_errors=dict(self.models.load_errors),
            concurrency=self.concurrency,
            weight=self.settings.worker_weight,
            max_models=self.models.max_models,
            memory_budget=self.models.memory_budget,
            in_flight=s.in_flight,
            completed=s.completed,
            failed=s.failed,
            tokens_generated=s.tokens,
            ewma_ttft=s.ewma_ttft,
            ewma_tpot=s.ewma_tpot,
            started_at=self.started_at,
        )

    # -- run-time model changes (from remote-control commands and the idle sweep) ----------------------

    def load_model(self, model: str, pinned: bool = False, keep_alive: float | None = None) -> None:
        self.models.load_errors.pop(model, None)
        try:
            self.models.load(model, pinned=pinned, keep_alive=keep_alive)
        except Exception as exc:
            logger.error("cannot load %s: %s", model, exc)
            self.models.load_errors[model] = LoadFailure(message=str(exc))
            self._beat()

    def on_model_change(self, model: str, state: ModelState | None) -> None:
        queue = keys.model_queue(model)
        if self.consumer is not None:
            # Queue changes run on the consumer's event loop, never on this thread.
            if state == "ready":
                self.consumer.call_soon(self.consumer.add_task_queue, queue)
            elif state == "unloading":
                self.consumer.call_soon(self.consumer.cancel_task_queue, queue)
        self._beat()

    def _beat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat_soon()


_runtime: WorkerRuntime | None = None


def concurrency(settings: Settings, catalog: Catalog) -> int:
    if settings.worker_concurrency:
        return settings.worker_concurrency
    return ModelManager(catalog, settings.worker_engine).concurrency_for(settings.model_list())


def start_runtime(settings: Settings, catalog: Catalog, nodename: str) -> WorkerRuntime:
    """Load this worker's models; called once per worker process before it consumes."""
    global _runtime
    name = settings.worker_name or nodename
    client = redis.Redis.from_url(settings.redis_url)
    models = ModelManager(
        catalog,
        settings.worker_engine,
        settings.llamacpp_threads,
        max_models=settings.worker_max_models,
        memory_budget=settings.worker_memory_budget,
        default_keep_alive=settings.keep_alive if settings.keep_alive >= 0 else None,
    )
    pinned = set(settings.pinned_list())
    for model in settings.model_list():
        models.load(model, pinned=model in pinned)
    stats = WorkerStats()
    slots = concurrency(settings, catalog)
    preemption = Preemption(client, name, slots) if settings.batch_preempt else None
    rt = WorkerRuntime(
        name=name,
        node=nodename,
        settings=settings,
        client=client,
        models=models,
        runner=JobRunner(name, client, models, stats=stats, preemption=preemption),
        stats=stats,
        store=JobStore(client),
        concurrency=slots,
    )
    models.on_change = rt.on_model_change
    _runtime = rt
    return rt


def start_heartbeat(app: Celery, runtime: WorkerRuntime, consumer: Any) -> None:
    """Advertise the worker; called once it consumes, so it is never listed before it can serve."""
    s = runtime.settings
    runtime.consumer = consumer
    runtime.heartbeat = Heartbeat(
        runtime.client,
        runtime.name,
        runtime.info,
        s.heartbeat_interval,
        s.heartbeat_ttl,
        lambda job: enqueue(app, job),
        on_beat=runtime.models.expire_idle,
    )
    runtime.heartbeat.recover_previous_life()
    runtime.heartbeat.beat()
    runtime.heartbeat.start()
    logger.info("worker %s serving %s", runtime.name, ", ".join(runtime.models.loaded()))


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
