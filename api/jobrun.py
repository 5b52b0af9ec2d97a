"""Following one submitted job to its end: its events, live over pub/sub or from its log, and between them
a watchdog that reads the job record, so a dead worker, a lost event or a fleet with no worker for the model
ends the wait instead of hanging it."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis

from api import errors
from api.jobtimes import JobTimes
from api.redis_pool import NoConnectionFree
from api.streams import Subscription
from queueing import eventlog, events, registry
from queueing.eventlog import START, EventId
from queueing.jobs import Job, JobState
from queueing.jobstore import JobRecord

if TYPE_CHECKING:
    from api.jobs import Disconnected, Dispatcher, Limits

logger = logging.getLogger(__name__)

# How long a job's record may stay gone (Redis restarted empty) before a job that no live worker runs is
# submitted again: long enough for a worker that reconnects and finishes it to write the record back.
RECORD_LOST_GRACE = 2.0


@dataclass
class JobRun:
    dispatcher: Dispatcher
    job: Job
    sub: Subscription
    disconnected: Disconnected | None
    limits: Limits
    attempt: int = 1
    worker: str | None = None
    # The queue its job was sent to: its model's shared queue or, routed, one worker's own.
    queue: str = ""
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
    # The id of the last logged event taken (a stream's events are logged: queueing/eventlog.py).
    position: EventId = START
    # Logged events to take before the live ones: a resumed stream's past, or what pub/sub lost.
    backlog: deque[bytes] = field(default_factory=deque, repr=False)
    # Whether what pub/sub loses is read from the job's log (a stream followed from its first event).
    logged: bool = False
    # Whether consecutive deltas that are ready together are taken as one (RunOptions.merge_deltas).
    merge_deltas: bool = False
    # An event taken while merging deltas that was not one to merge: the next one to hand out.
    _ahead: tuple[events.Event | None, bool] | None = field(default=None, repr=False)
    # Its queue wait, time to first token, inter-token gaps and failovers, measured as its events come.
    times: JobTimes = field(default_factory=JobTimes)

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
            event, sent = await self._next(min(self.limits.poll, remaining))
            if event is None or event.attempt < self.attempt:
                continue
            if self._replayed and sent and isinstance(event, events.Delta):
                continue
            if event.attempt > self.attempt:
                # The job was re-queued (its worker died or was drained). Text already streamed cannot be
                # taken back: the stream goes on only if the new attempt continues exactly that text
                # (workers/migration.py), which its Started says.
                continues = event.continues if isinstance(event, events.Started) else -1
                if self._sent and continues != len(self.text_sent):
                    raise errors.worker_lost(self.worker or "?")
                self.attempt = event.attempt
            if isinstance(event, events.Failed):
                self.finished = True
                raise errors.from_failure(event.code, event.message, event.param)
            if isinstance(event, events.Started):
                self.worker, self.prompt_tokens = event.worker, event.prompt_tokens
            if isinstance(event, events.Finished):
                self.finished = True
            if isinstance(event, events.Delta) and self.merge_deltas and sent and not self._replayed:
                event = await self._merged(event)
            yield event

    async def _merged(self, delta: events.Delta) -> events.Delta:
        """``delta`` and the deltas of its attempt that are ready after it, as one: a client that reads
        slower than the worker sends gets what accumulated in one chunk, not one chunk per event."""
        parts, logprobs, tokens = [delta.text], list(delta.logprobs or []), delta.tokens
        while self.backlog or not self.sub.queue.empty():
            event, sent = await self._next(0)
            if event is None:
                continue  # taken already, or a gap that put the log's events in the backlog
            if not (isinstance(event, events.Delta) and sent and event.attempt == delta.attempt):
                self._ahead = (event, sent)
                break
            parts.append(event.text)
            logprobs += event.logprobs or []
            tokens += event.tokens
        if len(parts) == 1:
            return delta
        merged = delta.logprobs is not None or bool(logprobs)
        text = "".join(parts)
        return events.Delta(
            attempt=delta.attempt, text=text, logprobs=logprobs if merged else None, tokens=tokens
        )

    async def _next(self, wait: float) -> tuple[events.Event | None, bool]:
        """The next event: logged (a backlog's), live, or rebuilt by the watchdog when none came within
        ``wait``; None when there is none yet. And whether a worker sent it (rather than the watchdog)."""
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            return ahead
        live = not self.backlog
        if not live:
            raw = self.backlog.popleft()
        else:
            got = await self.sub.get(wait)
            if got is None:
                return await self._look(), False
            raw = got
        at, body = eventlog.split(raw)
        if at is not None and live and await self._lost_before(at, raw):
            return None, False
        if at is not None:
            if at <= self.position:
                return None, True  # taken already: a replayed event's live copy
            self.position = at
        event = events.decode(body)
        if live:
            self.times.heard(self.job, event)
        return event, True

    async def _lost_before(self, at: EventId, raw: bytes) -> bool:
        """Whether pub/sub lost logged events before ``raw`` (id ``at``; ids run on, one by one, within an
        attempt, and a new attempt starts at 1). Then what the log holds from our position on goes to the
        backlog, ``raw`` included, and True: the caller takes it from there."""
        here = self.position
        if not self.logged or at <= here or (at.n == here.n + 1 and at.attempt == here.attempt):
            return False
        if at.n == 1 and at.attempt > here.attempt and not self._sent:
            return False  # a new attempt, and nothing of the old one reached the client: nothing to miss
        self.backlog.extend(await eventlog.read_after(self.dispatcher.client, self.job.id, here))
        if not self.backlog:
            self.backlog.append(raw)  # the log is gone (its TTL): go on with what came
        return True

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
        if state in (JobState.DONE, JobState.FAILED) and self.logged:
            # Whatever pub/sub lost of a stream is in its log, ids and all.
            missed = await eventlog.read_after(d.client, self.job.id, self.position)
            if missed:
                self.backlog.extend(missed)
                return None
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
            if self._sent and not d.migrates:
                raise errors.worker_lost(worker)
            # A live worker of the fleet re-queues the dead worker's job (a stream continues where it
            # stopped); if none is left, stop waiting.
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
        self.times.resubmitted(self.job, self.attempt + 1, self._lost_since)
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
