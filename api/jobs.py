"""Submitting a job: the fleet ready for its model, its record, its route and its message; then a ``JobRun``
(api/jobrun.py) follows it to its end, with every wait bounded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass

import redis
import redis.asyncio as aredis
from celery import Celery

from api import errors
from api.admission import QueueBound
from api.control import FleetControl
from api.fairness import FairShare, expected_tokens
from api.jobrun import JobRun
from api.jobtimes import JobTimes
from api.keystore import requested_key
from api.priority import queued_in
from api.queue_position import Positions
from api.ratelimit import Limiter
from api.reconnect import ReconnectGrace
from api.sessions import requested_session
from api.streams import StreamHub
from api.usage import UsageLedger, requested_account
from queueing import eventlog, keys, registry, tracing
from queueing.affinity import Balance, Prefix
from queueing.catalog import ROUTING_MODES, Catalog, Routing
from queueing.celery_app import enqueue
from queueing.eventlog import START
from queueing.jobs import Job, Priority
from queueing.jobstore import AsyncJobStore
from queueing.routing import Router
from queueing.settings import Settings

logger = logging.getLogger(__name__)

Disconnected = Callable[[], Awaitable[bool]]

ROUTING_HEADER = "x-inferq-routing"
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
    # Seconds a streamed job goes on after its client left, for the client to resume it (api/resume.py);
    # cancelled afterwards by whichever API process sweeps first. 0: cancelled at once.
    reconnect_grace: float = 0.0
    # A resumed stream: the job's logged events from the first on, then the live ones.
    replay: bool = False
    # Deltas that queued up while the client read slowly go out as one (one chunk instead of many). Not in a
    # resumable stream, whose frames must render again the same from its job's log (api/resume.py).
    merge_deltas: bool = True
    # A batch line: when its batch expires (epoch seconds); the sooner, the earlier it is served among lines.
    deadline: float | None = None


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
        # A model's queue holds at most this many waiting requests (api/admission.py).
        self.bound = QueueBound(client, settings.max_queued, settings.max_queued_per_class)
        # Resumable streams (api/resume.py): how long their log is kept, how long a left client is awaited.
        self.stream_log_ttl = settings.stream_log_ttl
        self.reconnect_grace = settings.stream_reconnect_grace
        # Whether a stream whose worker died after sending text waits for the next attempt to continue it.
        self.migrates = settings.stream_migration_limit > 0
        self.store = AsyncJobStore(client)
        # A managed key's limits (api/ratelimit.py); an in-flight count a dead process left behind expires
        # after the longest request.
        self.limiter = Limiter(client, settings.request_timeout + 60, settings.rate_limit_window)
        self.ledger = UsageLedger(client)
        self.share = FairShare(client, settings.fair_share_window, settings.request_timeout + 60)
        self.positions = Positions(client)
        # Streamed jobs whose client left, cancelled after the reconnect grace (api/reconnect.py).
        self.leaving = ReconnectGrace(client, self.store)
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
        # An interactive request queues in the class it asked for, at most its key's (api/priority.py).
        priority = queued_in(options.priority)
        update: dict[str, object] = {"priority": priority, "deadline": options.deadline}
        if job.session is None and (session := requested_session.get()) is not None:
            update["session"] = session
        if job.trace_context is None and tracing.enabled():
            # The request's span: the worker's spans of this job are its children.
            update["trace_context"] = tracing.inject() or None
            tracing.annotate({"gen_ai.request.model": job.model, "inferq.job_id": job.id})
        job = job.model_copy(update=update)
        # A resumed stream follows a job that exists (api/routes/streams.py), even with no worker left.
        workers = [] if options.replay else await self.candidates(job.model, limits)
        if options.resume or options.replay or priority == "batch":
            async with self._follow(job, workers, disconnected, options, limits) as jr:
                yield jr
            return
        held, account = expected_tokens(job), requested_account.get().id
        with tracing.current("admission", attributes={"inferq.priority": priority}) as span:
            # A full queue refuses a new request now, with when to come back (batch lines wait their turn).
            await self.bound.admit(job.model, priority)
            # A key over its share of the model waits behind the others of its class; what this request may
            # use counts to its key until it ends (api/fairness.py).
            slots = sum(max(1, w.concurrency) for w in workers)
            share = await self.share.admit(job.model, account, held, job.id, slots, priority)
            if span is not None:
                span.set_attribute("inferq.share", share)
        job = job.model_copy(update={"share": share})
        try:
            async with self._follow(job, workers, disconnected, options, limits) as jr:
                yield jr
        finally:
            try:
                await asyncio.shield(self.share.release(job.model, account, held, job.id, priority))
            except redis.RedisError as exc:
                logger.warning("job %s: the tokens it held not given back: %r", job.id, exc)

    @contextlib.asynccontextmanager
    async def _follow(
        self,
        job: Job,
        workers: list[registry.WorkerInfo],
        disconnected: Disconnected | None,
        options: RunOptions,
        limits: Limits,
    ) -> AsyncIterator[JobRun]:
        """Submit ``job`` (or find it running, for a resume) and follow its events."""
        async with self.hub.subscribe(job.id) as sub:
            live = False
            if options.resume:
                attempt, live = await self.store.resume_point(job.id)
                job = job.model_copy(update={"attempt": attempt})
            queue = keys.model_queue(job.model)
            times = JobTimes(attempt=job.attempt)
            if not live:
                times = JobTimes.submitted(job.attempt)
                target = await self._submit(
                    job, workers or await self.candidates(job.model, limits), options, limits
                )
                queue = keys.worker_queue(target) if target else queue
            backlog = await eventlog.read_after(self.client, job.id, START) if options.replay else []
            # Followed from the middle (a batch line or background response taken over): what it missed
            # before is its own business, not a gap to fill from the log.
            logged = job.stream and (options.replay or not options.resume)
            jr = JobRun(
                self,
                job,
                sub,
                disconnected,
                limits,
                job.attempt,
                backlog=deque(backlog),
                logged=logged,
                merge_deltas=options.merge_deltas,
                queue=queue,
                times=times,
            )
            try:
                yield jr
            finally:
                await jr.close()
                if not jr.finished and options.cancel_on_exit:
                    # The client left or the request failed: stop the worker spending time on it. Not while
                    # Redis is away (the worker's own polls stop it later): the error that ended the run is
                    # what the client must see, and a stream still owes it the error event and sentinel.
                    try:
                        if options.reconnect_grace > 0 and job.stream:
                            await asyncio.shield(self.leaving.left(job.id, options.reconnect_grace))
                        else:
                            await asyncio.shield(self.store.cancel(job.id))
                    except redis.RedisError as exc:
                        logger.warning("job %s: not cancelled, Redis unavailable: %r", job.id, exc)

    async def ended(
        self, model: str, prompt: int, cached: int, completion: int, ok: bool, shared: bool = True
    ) -> None:
        """A request ended: what it used counts against the key that asked for it (api/ratelimit.py) and
        goes into the usage ledger (api/usage.py). Never the request's failure: logged if Redis is away."""
        key = requested_key.get()
        try:
            if key is not None and ok:
                await asyncio.shield(self.limiter.spent(key, prompt + completion))
            account = requested_account.get()
            await asyncio.shield(self.ledger.record(account, model, prompt, cached, completion, ok))
            if shared:
                await asyncio.shield(self.share.spent(model, account.id, prompt + completion))
        except redis.RedisError as exc:
            logger.warning("usage of a %s request not counted: %r", model, exc)

    async def _submit(
        self, job: Job, workers: list[registry.WorkerInfo], options: RunOptions, limits: Limits
    ) -> str | None:
        """Record and send ``job``; the worker it was routed to, or None for its model's shared queue."""
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
        return target

    async def resubmit(self, job: Job, limits: Limits) -> None:
        """Submit a job whose record Redis lost again, as the attempt given."""
        workers = await self.candidates(job.model, limits)
        await self._submit(job, workers, RunOptions(priority=job.priority), limits)


def _expected_tokens(job: Job) -> int:
    # What fastest_response weighs a worker's decode speed by; a request without a limit counts as long.
    sampling = getattr(job, "sampling", None)
    return min(getattr(sampling, "max_tokens", 1) or 1, 1024)
