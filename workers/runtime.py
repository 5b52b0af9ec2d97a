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
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from engines.base import PrefixCacheHolder
from queueing import keys
from queueing.affinity import Recorder
from queueing.catalog import Catalog
from queueing.celery_app import enqueue
from queueing.jobstore import JobStore
from queueing.registry import LoadFailure, ModelState, PromptCacheInfo, WorkerInfo
from queueing.sentinel import pool_kwargs
from queueing.settings import Settings
from workers.heartbeat import Heartbeat
from workers.liveness import Liveness
from workers.models import ModelManager, ModelNotLoaded
from workers.preempt import Preemption
from workers.runner import JobRunner
from workers.stats import StatsSnapshot, WorkerStats

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
    # Models whose running generations stopped moving (workers/liveness.py): their queues are not consumed
    # and the worker is unhealthy, out of routing, until they move again.
    stalled: frozenset[str] = frozenset()
    _loading: set[str] = field(default_factory=set)

    @property
    def liveness(self) -> Liveness:
        return self.runner.liveness

    def queues(self) -> list[str]:
        return [keys.worker_queue(self.name), *(keys.model_queue(m) for m in self.serving())]

    def serving(self) -> list[str]:
        """The loaded models this worker takes work for now."""
        return [m for m in self.models.loaded() if m not in self.stalled]

    def info(self) -> WorkerInfo:
        s = self.stats.snapshot()
        return WorkerInfo(
            name=self.name,
            node=self.node,
            host=socket.gethostname(),
            pid=os.getpid(),
            platform=f"{platform.system().lower()}-{platform.machine().lower()}",
            engine=",".join(self.models.engine_names()) or (self.settings.worker_engine or ""),
            models=self.serving(),
            healthy=not self.stalled,
            stalled=sorted(self.stalled),
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
            ewma_prefill_tps=s.ewma_prefill_tps,
            prompt_cache=self._prompt_cache(s),
            started_at=self.started_at,
        )

    def _prompt_cache(self, s: StatsSnapshot) -> PromptCacheInfo:
        entries = size = 0
        for model in self.models.loaded():
            try:
                engine = self.models.get(model)
            except ModelNotLoaded:
                continue  # unloaded since
            if isinstance(engine, PrefixCacheHolder):
                held = engine.cache_stats()
                entries, size = entries + held.entries, size + held.bytes
        return PromptCacheInfo(
            entries=entries,
            bytes=size,
            hits=s.cache_hits,
            misses=s.cache_misses,
            prompt_tokens=s.prompt_tokens,
            cached_tokens=s.cached_tokens,
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
        if state == "loading":
            self._loading.add(model)
            self.liveness.load_started()
        elif model in self._loading:
            self._loading.discard(model)
            self.liveness.load_ended()
        if state == "ready" and model not in self.stalled:
            self._consume(model, True)
        elif state == "unloading":
            self._consume(model, False)
        self._beat()

    def check_liveness(self) -> None:
        """Take stalled models out of this worker's service and put recovered ones back (every beat)."""
        now = frozenset(self.liveness.stalled())
        for model in sorted(now - self.stalled):
            logger.warning(
                "%s stalled: its running jobs got no output for %gs; %s is unhealthy and stops taking "
                "its work until they move again",
                model,
                self.liveness.stall_seconds,
                self.name,
            )
            self._consume(model, False)
        for model in sorted(self.stalled - now):
            logger.warning("%s moves again; %s takes its work again", model, self.name)
            if model in self.models.loaded():
                self._consume(model, True)
        self.stalled = now

    def _consume(self, model: str, on: bool) -> None:
        if self.consumer is None:
            return
        # Queue changes run on the consumer's event loop, never on this thread.
        change = self.consumer.add_task_queue if on else self.consumer.cancel_task_queue
        self.consumer.call_soon(change, keys.model_queue(model))

    def on_beat(self) -> None:
        self.check_liveness()
        self.models.expire_idle()

    def _beat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat_soon()


_runtime: WorkerRuntime | None = None


def concurrency(settings: Settings, catalog: Catalog) -> int:
    if settings.worker_concurrency:
        return settings.worker_concurrency
    return ModelManager(catalog, settings.worker_engine).concurrency_for(settings.model_list())


def worker_redis(settings: Settings, slots: int) -> redis.Redis:
    """The worker's Redis client. A connection per job slot, plus the heartbeat's, the stream sender's and
    a spare; a thread that finds them all busy waits for one (bounded) rather than failing at once. Short
    timeouts and quick retries: a Redis that restarts costs a moment, a frozen one a bounded wait, never a
    thread stuck."""
    timeout = settings.worker_redis_timeout
    pool = redis.BlockingConnectionPool(  # type: ignore[no-untyped-call]
        # A plain URL, or a sentinel one whose connections find the master (queueing/sentinel.py).
        **pool_kwargs(settings.redis_url, sentinel_timeout=timeout),
        max_connections=slots + 3,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # A pooled connection idle this long is checked before use: after a Redis restart every one of
        # them is dead, and a job's first command should not be the one that finds out.
        health_check_interval=5,
        # Retried: a connection a restart closed (the next one reconnects). Not retried: a timeout, which a
        # frozen Redis gives every command (three tries made each publish of a generation wait 6 s).
        retry=Retry(
            ExponentialBackoff(cap=0.5, base=0.05), retries=2, supported_errors=(redis.ConnectionError,)
        ),
    )
    return redis.Redis(connection_pool=pool)


def start_runtime(settings: Settings, catalog: Catalog, nodename: str) -> WorkerRuntime:
    """Load this worker's models; called once per worker process before it consumes."""
    global _runtime
    name = settings.worker_name or nodename
    slots = concurrency(settings, catalog)
    client = worker_redis(settings, slots)
    models = ModelManager(
        catalog,
        settings.worker_engine,
        settings.llamacpp_threads,
        max_models=settings.worker_max_models,
        memory_budget=settings.worker_memory_budget,
        default_keep_alive=settings.keep_alive if settings.keep_alive >= 0 else None,
        llamacpp_cache_mib=settings.llamacpp_cache_mib,
    )
    pinned = set(settings.pinned_list())
    for model in settings.model_list():
        models.load(model, pinned=model in pinned)
    stats = WorkerStats()
    preemption = Preemption(client, name, slots) if settings.batch_preempt else None
    runner = JobRunner(
        name,
        client,
        models,
        stats=stats,
        preemption=preemption,
        preempt_poll_seconds=settings.preempt_poll,
        liveness=Liveness(settings.worker_stall_timeout),
        # A job that ended while Redis was away delivers its result when Redis returns, as long as its
        # request can still be waiting for it.
        record_retry_seconds=settings.request_timeout,
        prefixes=Recorder(client, name, settings.affinity_ttl),
        coalesce_window=settings.stream_coalesce_ms / 1000,
        coalesce_tokens=settings.stream_coalesce_tokens,
        log_ttl=settings.stream_log_ttl,
        migration_limit=settings.stream_migration_limit,
    )
    rt = WorkerRuntime(
        name=name,
        node=nodename,
        settings=settings,
        client=client,
        models=models,
        runner=runner,
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
        on_beat=runtime.on_beat,
    )
    runtime.heartbeat.recover_previous_life()
    runtime.heartbeat.beat()
    runtime.heartbeat.start()
    logger.info("worker %s serving %s", runtime.name, ", ".join(runtime.models.loaded()))


def drain_runtime(grace: float) -> None:
    """The worker was asked to stop: its running jobs move to other workers after ``grace`` seconds."""
    if _runtime is not None:
        _runtime.runner.drain(grace)


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
