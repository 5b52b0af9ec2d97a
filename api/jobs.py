"""Submitting a job and following it to its end, with every wait bounded.

Events arrive over pub/sub; between events a watchdog reads the job record, so a dead worker, a lost event
or a fleet with no worker for the model ends the wait instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

import redis
import redis.asyncio as aredis
from celery import Celery

from api import errors
from api.control import FleetControl
from api.redis_pool import NoConnectionFree
from api.sessions import requested_session
from api.streams import StreamHub, Subscription
from queueing import events, registry
from queueing.affinity import Balance, Prefix
from queueing.catalog import ROUTING_MODES, Catalog, Routing
from queueing.celery_app import enqueue
from queueing.jobs import Job, JobState, Priority
from queueing.jobstore import AsyncJobStore, JobRecord
from queueing.routing import Router
from queueing.settings import Settings

logger = logging.getLogger(__name__)

Disconnected = Callable[[], Awaitable[bool]]

ROUTING_HEADER = "x-inferq-routing"
# How long a job's record may stay gone (Redis restarted empty) before a job that no live worker runs is
# submitted again: long enough for a worker that reconnects and finishes it to write the record back.
RECORD_LOST_GRACE = 2.0
# The routing mode a request asked for in its header; set by the app-wide dependency in api/app.py so that
# every endpoint that enqueues honours it without each one reading the header.
requested_routing: ContextVar[Routing | None] = ContextVar("requested_routing", default=None)


def parse_routing(value: str | None) -> Routing | None:
    if value is None:
        return None
    if value not in ROUTING_MODES:
        raise errors.invalid_request(
            f"Unknown routing mode {value!r} in the {ROUTING_HEADER} header; "
            f"one of: {', '.join(ROUTING_MODES)}.",
            ROUTING_HEADER,
            "invalid_routing",
        )
    return value


@dataclass
class Limits:
    request_timeout: float
    no_worker_timeout: float
    poll: float

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(s.request_timeout, s.no_worker_timeout, min(s.heartbeat_interval, 0.5))


@dataclass(frozen=True)
class RunOptions:
    """How one job is run; the defaults are an interactive request's. Batch lines (api/batches) differ."""

    priority: Priority = "interactive"
    # None: the request's header, the catalog's mode, then the default.
    routing: Routing | None = None
    # None: the dispatcher's limits.
    limits: Limits | None = None
    # Follow the job if its record exists (a batch line that a restarted API process takes over) instead of
    # submitting it again.
    resume: bool = False
    # Cancel the job when the run ends unfinished (the client left). A batch line's job outlives its API
    # process: the next process follows it.
    cancel_on_exit: bool = True


INTERACTIVE = RunOptions()


class Dispatcher:
    """Puts jobs on their model's queue and hands back a ``JobRun`` to follow each one."""

    def __init__(
        self,
        client: aredis.Redis,
        hub: StreamHub,
        celery: Celery,
        limits: Limits,
        catalog: Catalog,
        settings: Settings,
    ) -> None:
        self.client = client
        self.hub = hub
        self.celery = celery
        self.limits = limits
        self.catalog = catalog
        self.default_routing = parse_routing(settings.routing) or "queue"
        self.store = AsyncJobStore(client)
        # Routing only picks workers that beat within two intervals; a stale one may be dead.
        fresh = 2 * settings.heartbeat_interval
        self.router = Router(
            client,
            fresh,
            settings.route_explore,
            affinity_ttl=settings.affinity_ttl,
            balance=Balance(settings.affinity_balance_abs, settings.affinity_balance_ratio),
        )
        self.fleet = FleetControl(client, celery, fresh, settings.load_timeout, limits.poll)
        # Watchdog looks in flight at once, at most a quarter of the Redis pool: a thousand quiet streams
        # (a loaded machine delays their events past the poll) would otherwise take every connection and
        # new requests would time out waiting for one (measured: 300+ of 1,000 streams failed that way).
        self.looks = asyncio.Semaphore(max(1, settings.api_redis_max_connections // 4))

    async def serves(self, model: str) -> list[str]:
        return [w.name for w in await registry.live_workers(self.client) if model in w.models]

    def routing_for(self, model: str) -> Routing:
        spec = self.catalog.get(model)
        return requested_routing.get() or (spec.routing if spec else None) or self.default_routing

    async def candidates(self, model: str, limits: Limits | None = None) -> list[registry.WorkerInfo]:
        """Fresh workers ready for ``model``: loaded on demand if need be, waited for (bounded) if none
        could serve it yet; a 503 when none appears."""
        limits = limits or self.limits
        ready = await self.fleet.ensure_ready(model)
        if ready:
            return ready
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.no_worker_timeout
        while loop.time() < deadline:
            await asyncio.sleep(limits.poll)
            ready = await self.fleet.ensure_ready(model)
            if ready:
                return ready
        raise errors.no_worker(model, limits.no_worker_timeout)

    @contextlib.asynccontextmanager
    async def run(
        self, job: Job, disconnected: Disconnected | None = None, options: RunOptions = INTERACTIVE
    ) -> AsyncIterator[JobRun]:
        limits = options.limits or self.limits
        update: dict[str, object] = {"priority": options.priority}
        if job.session is None and (session := requested_session.get()) is not None:
            update["session"] = session
        job = job.model_copy(update=update)
        workers = await self.candidates(job.model, limits)
        async with self.hub.subscribe(job.id) as sub:
            live = False
            if options.resume:
                attempt, live = await self.store.resume_point(job.id)
                job = job.model_copy(update={"attempt": attempt})
            if not live:
                await self._submit(job, workers, options, limits)
            jr = JobRun(self, job, sub, disconnected, limits, attempt=job.attempt)
            try:
                yield jr
            finally:
                await jr.close()
                if not jr.finished and options.cancel_on_exit:
                    # The client left or the request failed: stop the worker spending time on it. Not while
                    # Redis is away (the worker's own polls stop it later): the error that ended the run is
                    # what the client must see, and a stream still owes it the error event and sentinel.
                    try:
                        await asyncio.shield(self.store.cancel(job.id))
                    except redis.RedisError as exc:
                        logger.warning("job %s: not cancelled, Redis unavailable: %r", job.id, exc)

    async def _submit(
        self, job: Job, workers: list[registry.WorkerInfo], options: RunOptions, limits: Limits
    ) -> None:
        strategy = options.routing or self.routing_for(job.model)
        # The record outlives the longest wait for it by an hour, so a late worker still finds it. Listed as
        # unsent in the same transaction until the message is out: an API process that dies in between
        # leaves the job to the sweep of the others (queueing/recovery.py), not stranded.
        await self.store.create(job, ttl=limits.request_timeout + 3600, track_send=True)
        prefix = Prefix.of(job) if strategy == "affinity" else None
        target = await self.router.pick(strategy, job.model, job.id, workers, _expected_tokens(job), prefix)
        # kombu's producer is synchronous, but one LPUSH on a pooled connection costs less than a hop to a
        # thread would (which also shows in time to first token on a busy machine). No target: the
        # model's shared queue, where every worker with the model pulls.
        enqueue(self.celery, job, worker=target)
        await self.store.sent(job)

    async def resubmit(self, job: Job, limits: Limits) -> None:
        """Submit a job whose record Redis lost again, as the attempt given."""
        workers = await self.candidates(job.model, limits)
        await self._submit(job, workers, RunOptions(priority=job.priority), limits)


def _expected_tokens(job: Job) -> int:
    # What fastest_response weighs a worker's decode speed by; a request without a limit counts as long.
    sampling = getattr(job, "sampling", None)
    return min(getattr(sampling, "max_tokens", 1) or 1, 1024)


@dataclass
class JobRun:
    dispatcher: Dispatcher
    job: Job
    sub: Subscription
    disconnected: Disconnected | None
    limits: Limits
    attempt: int = 1
    worker: str | None = None
    # The prompt's length as the worker's Started reported it: known before any output is (message_start).
    prompt_tokens: int = 0
    finished: bool = False
    _sent: list[str] = field(default_factory=list, repr=False)
    _no_worker_since: float | None = field(default=None, repr=False)
    _redis_away: bool = field(default=False, repr=False)
    _lost_since: float | None = field(default=None, repr=False)
    # The text's tail was replayed from the finished record: deltas still arriving over pub/sub (published
    # before the record was read, delivered after) are that same text and must not be sent twice.
    _replayed: bool = field(default=False, repr=False)
    # One event stream per run, shared by start() and rest(), so one deadline covers the whole request.
    _stream: AsyncGenerator[events.Event] | None = field(default=None, repr=False)

    @property
    def text_sent(self) -> str:
        return "".join(self._sent)

    def _event_stream(self) -> AsyncGenerator[events.Event]:
        stream = self._stream or self._events()
        self._stream = stream
        return stream

    async def start(self) -> events.Started:
        """Wait until a worker accepted the prompt; errors before that are plain HTTP errors."""
        async for event in self._event_stream():
            if isinstance(event, events.Started):
                return event
        raise AssertionError("event stream ended before it started")  # _events always raises or starts

    async def rest(self) -> AsyncIterator[events.Delta | events.Finished]:
        async for event in self._event_stream():
            if isinstance(event, events.Delta):
                self._sent.append(event.text)
            if isinstance(event, events.Delta | events.Finished):
                yield event
            if isinstance(event, events.Finished):
                return

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()

    async def _events(self) -> AsyncGenerator[events.Event]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.request_timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise errors.timed_out(self.limits.request_timeout)
            raw = await self.sub.get(min(self.limits.poll, remaining))
            event = events.decode(raw) if raw is not None else await self._look()
            if event is None or event.attempt < self.attempt:
                continue
            if self._replayed and raw is not None and isinstance(event, events.Delta):
                continue
            if event.attempt > self.attempt:
                # The job was re-queued after its worker died. Text already streamed cannot be taken back.
                if self._sent:
                    raise errors.worker_lost(self.worker or "?")
                self.attempt = event.attempt
            if isinstance(event, events.Failed):
                self.finished = True
                raise errors.from_failure(event.code, event.message, event.param)
            if isinstance(event, events.Started):
                self.worker, self.prompt_tokens = event.worker, event.prompt_tokens
            if isinstance(event, events.Finished):
                self.finished = True
            yield event

    async def _look(self) -> events.Event | None:
        """The watchdog, and what a Redis error in it means. A stream ends: its client is shown an error
        now rather than a stream silent for as long as Redis is away. A non-streamed job was accepted and its
        worker finishes it (and retries writing its result until Redis is back): it waits, bounded by the
        request's deadline, and gets the result from the record once Redis answers again."""
        looks = self.dispatcher.looks
        if looks.locked():
            # Enough looks in flight: this run looks again after its next quiet poll.
            return None
        try:
            async with looks:
                return await self._watchdog()
        except NoConnectionFree:
            # This process is overloaded, Redis is not away: look again after the next quiet poll.
            return None
        except redis.RedisError as exc:
            if self.job.stream:
                raise
            if not self._redis_away:
                logger.warning("job %s: Redis unavailable (%r); waiting for it to return", self.job.id, exc)
            self._redis_away = True
            return None

    async def _watchdog(self) -> events.Event | None:
        """Look at the job record when no event came for a while; returns an event the stream missed."""
        d = self.dispatcher
        if self.disconnected is not None and await self.disconnected():
            raise errors.client_closed()
        record = await d.store.get(self.job.id)
        if record is None:
            await self._record_lost()
            return None
        self._lost_since = None
        state, attempt = record.state, record.attempt
        if state == JobState.DONE:
            if self.worker is None:
                # Started was lost too; its fields are in the record.
                return events.Started(
                    attempt=attempt, worker=record.worker or "", prompt_tokens=record.prompt_tokens
                )
            return self._replay_finished(record)
        if state == JobState.FAILED:
            return events.Failed(attempt=attempt, code=record.error_code, message=record.error or "failed")
        if state == JobState.RUNNING:
            worker = record.worker or ""
            if await registry.is_alive_async(d.client, worker):
                self._no_worker_since = None
                return None
            if self._sent:
                raise errors.worker_lost(worker)
            # A live worker of the fleet re-queues the dead worker's job; if none is left, stop waiting.
            await self._check_fleet()
        elif state == JobState.QUEUED:
            await self._check_fleet()
        return None

    async def _record_lost(self) -> None:
        """The record is gone: Redis restarted empty, and the job's message went with it. A worker still
        running the job writes the record anew when it finishes (queueing/jobstore.py), so a run whose
        worker lives waits for that. A job that never reached a worker (or whose worker died) would wait for
        ever: unless its text reached the client already, it is submitted again as its next attempt, once
        the record has stayed away for a moment."""
        d = self.dispatcher
        if self.worker and await registry.is_alive_async(d.client, self.worker):
            return  # it runs the job: its finish brings the record back
        if self._sent:
            # Text already streamed cannot be taken back, and its worker is gone.
            raise errors.worker_lost(self.worker or "?")
        now = asyncio.get_running_loop().time()
        if self._lost_since is None:
            self._lost_since = now
            return
        if now - self._lost_since < RECORD_LOST_GRACE:
            return
        self._lost_since = None
        self.attempt += 1
        logger.warning(
            "job %s: its record is gone (Redis lost it); submitted again as attempt %d",
            self.job.id,
            self.attempt,
        )
        await d.resubmit(self.job.model_copy(update={"attempt": self.attempt}), self.limits)

    async def _check_fleet(self) -> None:
        loop = asyncio.get_running_loop()
        if await self.dispatcher.serves(self.job.model):
            self._no_worker_since = None
            return
        self._no_worker_since = self._no_worker_since or loop.time()
        if loop.time() - self._no_worker_since >= self.limits.no_worker_timeout:
            raise errors.no_worker(self.job.model, self.limits.no_worker_timeout)

    def _replay_finished(self, record: JobRecord) -> events.Event:
        """The Finished event was lost (pub/sub is at-most-once): rebuild it from the job record."""
        text, sent = record.text, self.text_sent
        if self.job.stream and text.startswith(sent) and len(text) > len(sent):
            # Emit the missing tail first; the next watchdog pass (or the Finished event itself) ends it.
            self._replayed = True
            return events.Delta(attempt=record.attempt, text=text[len(sent) :])
        return events.Finished(
            attempt=record.attempt,
            finish_reason=record.finish_reason,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            cached_tokens=record.cached_tokens,
            stop_sequence=record.stop_sequence,
            text=None if self.job.stream else text,
            embeddings=None if record.embeddings is None else json.loads(record.embeddings),
        )
