"""Runs one queued job on a loaded engine and publishes its events. No Celery here: tasks.py is the glue."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import redis

from engines.base import (
    ContextLengthExceeded,
    Embedder,
    Engine,
    GenerationRequest,
    Output,
    TokenCounter,
    UnsupportedRequest,
)
from queueing import events
from queueing.affinity import Recorder
from queueing.bands import keeps_slot_once_started, yields_below
from queueing.eventlog import Channel
from queueing.events import ErrorCode
from queueing.jobs import Job, JobState
from queueing.jobstore import JobStore
from workers import migration
from workers.coalesce import Coalescer
from workers.engine_io import close_outputs, to_generation_request, wire_logprobs
from workers.liveness import Liveness
from workers.models import ModelManager, ModelNotLoaded
from workers.outbox import Outbox
from workers.preempt import Preemption
from workers.spans import JobSpans
from workers.stats import WorkerStats

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Watch:
    yielded: bool = False
    # The job's record vanished (Redis restarted without its data): nobody can be given the result.
    lost: bool = False


@dataclass
class _Generated:
    """What the engine loop of one job produced."""

    first: Output
    last: Output
    parts: list[str]
    logprobs: list[events.TokenLogprob] | None
    first_token_at: float | None
    watch: _Watch


class Yielded(Exception):
    """A job gave its slot up (a batch line to an interactive request, any job to a worker's drain);
    ``again`` is its next attempt."""

    def __init__(self, again: Job | None) -> None:
        super().__init__("yielded")
        self.again = again


class RecordLost(Exception):
    """The job's record vanished while it ran (Redis restarted without its data): there is nothing to
    finish, and no API process could deliver the result."""


class JobRunner:
    def __init__(
        self,
        worker: str,
        client: redis.Redis,
        models: ModelManager,
        cancel_poll_seconds: float = 0.25,
        stats: WorkerStats | None = None,
        preemption: Preemption | None = None,
        preempt_poll_seconds: float = 0.05,
        liveness: Liveness | None = None,
        record_retry_seconds: float = 600.0,
        prefixes: Recorder | None = None,
        coalesce_window: float = 0.0,
        coalesce_tokens: int = 1,
        log_ttl: float = 600.0,
        migration_limit: int = 3,
    ) -> None:
        self.worker = worker
        self.stats = stats or WorkerStats()
        self.liveness = liveness or Liveness(stall_seconds=30.0)
        self._r = client
        self._store = JobStore(client)
        self._models = models
        self._cancel_poll = cancel_poll_seconds
        self._preemption = preemption
        self._preempt_poll = preempt_poll_seconds
        self._out = Outbox(client, record_retry_seconds, log_ttl, most_tokens=coalesce_tokens)
        self._prefixes = prefixes
        self._coalesce_window = coalesce_window
        self._coalesce_tokens = coalesce_tokens
        self._migration_limit = migration_limit
        # When a stopping worker's running jobs give their slots up (drain).
        self._drain_at: float | None = None
        # Ids of the jobs this process runs now: tells our own claim, applied before its reply was lost,
        # from a duplicate delivery of a job that runs here already.
        self._active: set[str] = set()
        self._active_lock = threading.Lock()

    def run(self, job: Job) -> Job | None:
        """Run ``job``; returns the job to queue again when it gave its slot up (a batch line yielding to
        an interactive request), else None."""
        received = time.time_ns()
        if self._preemption is not None:
            # A slot took a message: a yield that freed one stands no longer (workers/preempt.py).
            self._out.maybe(self._preemption.refilled, None)
        if not self._claim(job):
            # Finished, cancelled, or re-queued as a later attempt: this delivery is stale.
            logger.info("skipping stale delivery of %s attempt %d", job.id, job.attempt)
            return None
        spans = JobSpans.claimed(received)
        try:
            return self._run_claimed(job, spans)
        finally:
            with self._active_lock:
                self._active.discard(job.id)
            spans.send(job, self.worker)

    def _claim(self, job: Job) -> bool:
        with self._active_lock:
            if job.id in self._active:
                return False
            self._active.add(job.id)
        try:
            if self._out.durably(f"claim {job.id}", lambda: self._store.claim(job, self.worker)):
                return True
            # A claim applied by Redis whose reply was lost (and retried) reads as refused; the record says
            # whether it is ours, and no thread of this process runs the job.
            ours = self._out.durably(f"read {job.id}", lambda: self._store.runs_on(job, self.worker))
        except BaseException:
            with self._active_lock:
                self._active.discard(job.id)
            raise
        if not ours:
            with self._active_lock:
                self._active.discard(job.id)
        return ours

    def _run_claimed(self, job: Job, spans: JobSpans) -> Job | None:
        # A stream's events are kept too, so that its client can resume it (queueing/eventlog.py).
        channel = Channel(job.id, job.attempt, logged=job.stream)
        self.stats.job_started()
        # What the job counts for in this worker's stats, reported once whichever way it ends.
        ok, yielded, tokens, decode_seconds = False, False, 0, 0.0
        try:
            if job.kind == "embedding":
                self._embed(job, channel, spans)
            elif job.kind == "count":
                self._count(job, channel, spans)
            else:
                tokens, decode_seconds = self._generate(job, channel, spans)
            ok = True
        except Yielded as exc:
            # Neither done nor failed: it runs again, here or elsewhere.
            yielded = True
            logger.info("%s job %s attempt %d yielded its slot", job.priority, job.id, job.attempt)
            return exc.again
        except ContextLengthExceeded as exc:
            param = {"completion": "prompt", "embedding": "input"}.get(job.kind, "messages")
            self._fail(job, channel, ErrorCode.CONTEXT_LENGTH_EXCEEDED, str(exc), param)
        except UnsupportedRequest as exc:
            self._fail(job, channel, ErrorCode.UNSUPPORTED_VALUE, str(exc), exc.param)
        except ModelNotLoaded as exc:
            self._fail(job, channel, ErrorCode.MODEL_NOT_LOADED, str(exc), "model")
        except RecordLost:
            # Stopped; a client still listening hears why its stream ends here.
            message = "The job's record was lost (Redis restarted without its data); it was stopped."
            lost = events.Failed(attempt=job.attempt, code=ErrorCode.INTERNAL, message=message)
            self._out.publish(channel, lost)
        except Exception as exc:
            # Whatever broke, the waiting client must hear of it rather than wait for its timeout.
            logger.exception("job %s failed", job.id)
            self._fail(job, channel, ErrorCode.INTERNAL, f"generation failed: {exc}", None)
        finally:
            spans.outcome = "yielded" if yielded else "done" if ok else "failed"
            if yielded:
                self.stats.job_yielded()
            else:
                self.stats.job_finished(ok, tokens, decode_seconds)
        return None

    def _generate(self, job: Job, channel: Channel, spans: JobSpans) -> tuple[int, float]:
        """Runs the generation; returns the tokens generated and the seconds spent decoding them."""
        engine = self._models.get(job.model)
        spans.engine = engine.name
        started = time.monotonic()
        request, before = self._continuation(job, engine)
        progress = self.liveness.started(job.model)
        outputs = engine.generate(request)
        try:
            g = self._decode(job, channel, engine, outputs, progress.tick, started, before, spans)
        finally:
            # On every way out (the end, an engine error, a cancel, a preemption, Redis failing under a
            # publish or a poll), before anything else can wait: the engine is free for the next job.
            close_outputs(outputs)
            self.liveness.ended(progress)
        first, last = g.first, g.last
        if g.watch.lost:
            raise RecordLost(job.id)
        if g.watch.yielded and last.finish_reason == "cancelled":
            # (A line that ended on its own before the abort took effect is finished below as usual.)
            again = self._out.durably(f"yield {job.id}", lambda: self._store.yield_slot(job, self.worker))
            self._settled(job)
            raise Yielded(again)
        if g.watch.yielded:
            self._settled(job)
        reason = last.finish_reason or "stop"
        # Only a stop string ends a job with one; a record field cannot hold None, so it is left out.
        stop = {"stop_sequence": last.stop_sequence} if last.stop_sequence is not None else {}
        # The whole answer, and its usage as the request sees it: a continued one's earlier text is its own
        # output, not part of its prompt.
        text = before.text + "".join(g.parts)
        prompt_tokens = first.prompt_tokens - before.tokens
        completion_tokens = before.tokens + last.completion_tokens
        decode = time.monotonic() - g.first_token_at if g.first_token_at is not None else 0.0
        spans.prompt_tokens, spans.completion_tokens = prompt_tokens, completion_tokens
        spans.finish_reason = reason
        self._finish(
            job,
            JobState.CANCELLED if reason == "cancelled" else JobState.DONE,
            text=text,
            finish_reason=reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=last.cached_tokens,
            **stop,
        )
        self._out.publish(
            channel,
            events.Finished(
                attempt=job.attempt,
                finish_reason=reason,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cached_tokens=last.cached_tokens,
                stop_sequence=last.stop_sequence,
                text=None if job.stream else text,
                logprobs=None if job.stream else g.logprobs,
            ),
        )
        # After the client has its answer: its next turn cannot be routed before this ran anyway.
        self._record_prefix(job, text)
        return last.completion_tokens, decode

    def _continuation(self, job: Job, engine: Engine) -> tuple[GenerationRequest, migration.Continued]:
        """The job's engine request; a stream that moved here continues what its earlier attempts sent."""
        request = to_generation_request(job)
        if not job.stream or job.attempt == 1:
            return request, migration.NOTHING
        before, moves = self._out.durably(f"read {job.id}'s log", lambda: migration.sent_before(self._r, job))
        return migration.continuing(request, engine, before, moves, self._migration_limit)

    def drain(self, grace: float) -> None:
        """Stop taking time for the running jobs: ``grace`` seconds from now, each still running gives its
        slot up and goes back to its model's queue as its next attempt (a stream continues on the next
        worker where it stopped here). For a worker asked to stop (SIGTERM)."""
        self._drain_at = time.monotonic() + grace

    def _record_prefix(self, job: Job, reply: str) -> None:
        """Tell affinity routing that this worker's engine holds the job's prompt and reply now. Routing
        works without it (a worse guess), so a Redis error here is logged, never the job's failure."""
        if self._prefixes is None or self._out.away():
            return
        try:
            self._prefixes.record(job, reply)
        except redis.RedisError as exc:
            self._out.found_away()
            logger.warning("job %s: prefix not recorded for affinity routing: %r", job.id, exc)

    def _decode(
        self,
        job: Job,
        channel: Channel,
        engine: Engine,
        outputs: Iterator[Output],
        tick: Callable[[], None],
        started: float,
        before: migration.Continued,
        spans: JobSpans,
    ) -> _Generated:
        """The engine loop: every output becomes progress, a delta for a stream, and text for the record."""
        first_token_at: float | None = None
        first = next(outputs)
        tick()
        accepted = events.Started(
            attempt=job.attempt,
            worker=self.worker,
            prompt_tokens=first.prompt_tokens - before.tokens,
            continues=len(before.text),
            claimed_at=spans.claimed_at,
        )
        # Not waited for: the first token's decode starts now, and the sender keeps the order.
        self._out.publish(channel, accepted, wait=False)
        parts: list[str] = []
        logprobs: list[events.TokenLogprob] | None = [] if job.sampling.logprobs is not None else None
        last = first
        watch = _Watch()
        coalesce = Coalescer(self._coalesce_window, self._coalesce_tokens)
        for out in self._watch(job, engine.abort, outputs, watch):
            tick()
            last = out
            step_logprobs = wire_logprobs(out.logprobs) if out.logprobs else None
            if out.text:
                if first_token_at is None:
                    first_token_at = time.monotonic()
                    spans.first_token()
                    self.stats.first_token(first_token_at - started)
                    cached = max(first.cached_tokens, out.cached_tokens)
                    self.stats.prompt_evaluated(first.prompt_tokens, cached, first_token_at - started)
                parts.append(out.text)
            if logprobs is not None and step_logprobs:
                logprobs.extend(step_logprobs)
            if job.stream and (out.text or step_logprobs):
                ready = coalesce.add(out.text, step_logprobs, time.monotonic())
                if ready is not None:
                    self._publish_delta(channel, job, *ready)
        if job.stream and (rest := coalesce.flush()) is not None:
            self._publish_delta(channel, job, *rest)
        # Deltas were handed to the sender: they are in the log before the record says the job ended or
        # gave its slot up (the next attempt of a moved stream reads the log).
        self._out.settle(channel)
        return _Generated(first, last, parts, logprobs, first_token_at, watch)

    def _publish_delta(
        self, channel: Channel, job: Job, text: str, logprobs: list[events.TokenLogprob] | None, tokens: int
    ) -> None:
        delta = events.Delta(attempt=job.attempt, text=text, logprobs=logprobs, tokens=max(1, tokens))
        self._out.publish(channel, delta, droppable=True, tokens=tokens)

    def _embed(self, job: Job, channel: Channel, spans: JobSpans) -> None:
        engine: Engine = self._models.get(job.model)
        spans.engine = engine.name
        if not isinstance(engine, Embedder):
            raise UnsupportedRequest(f"The {engine.name} engine of `{job.model}` cannot embed.", "model")
        # No tokens are generated: nothing to add to the speed averages that routing reads.
        result = engine.embed(job.inputs)
        spans.prompt_tokens = result.prompt_tokens
        started = events.Started(
            attempt=job.attempt,
            worker=self.worker,
            prompt_tokens=result.prompt_tokens,
            claimed_at=spans.claimed_at,
        )
        self._out.publish(channel, started)
        # In the record too: the API rebuilds a lost Finished event from it (pub/sub is at-most-once).
        self._finish(
            job,
            JobState.DONE,
            embeddings=json.dumps(result.vectors),
            finish_reason="stop",
            prompt_tokens=result.prompt_tokens,
            completion_tokens=0,
        )
        self._out.publish(
            channel,
            events.Finished(
                attempt=job.attempt,
                finish_reason="stop",
                prompt_tokens=result.prompt_tokens,
                completion_tokens=0,
                embeddings=result.vectors,
            ),
        )

    def _count(self, job: Job, channel: Channel, spans: JobSpans) -> None:
        engine = self._models.get(job.model)
        spans.engine = engine.name
        if isinstance(engine, TokenCounter):
            tokens = engine.count_tokens(to_generation_request(job))
        else:
            # The first output of every generation reports the prompt's tokens; closing the stream right
            # there ends it before anything is decoded.
            outputs = engine.generate(to_generation_request(job))
            try:
                tokens = next(outputs).prompt_tokens
            finally:
                close_outputs(outputs)
        spans.prompt_tokens = tokens
        started = events.Started(
            attempt=job.attempt, worker=self.worker, prompt_tokens=tokens, claimed_at=spans.claimed_at
        )
        self._out.publish(channel, started)
        self._finish(job, JobState.DONE, finish_reason="stop", prompt_tokens=tokens, completion_tokens=0)
        self._out.publish(
            channel,
            events.Finished(
                attempt=job.attempt, finish_reason="stop", prompt_tokens=tokens, completion_tokens=0
            ),
        )

    def _watch(
        self, job: Job, abort: Callable[[str], None], outputs: Iterator[Output], watch: _Watch
    ) -> Iterator[Output]:
        """Pass outputs through, asking the engine to stop once the job was cancelled (client gone) or, for
        a job of a class that yields (workers/preempt.py), once a request of a higher class waits for this
        worker's slot (``watch.yielded``)."""
        now = time.monotonic()
        next_poll = now + self._cancel_poll
        # Batch lines and low-class jobs yield at any point, a normal one until its first token, a high one
        # only to its class's keys within their share (queueing/bands.py, workers/preempt.py).
        may_yield = self._preemption is not None and yields_below(job) > 0
        keeps_slot = keeps_slot_once_started(job)
        next_yield_poll = now + self._preempt_poll
        for out in outputs:
            yield out
            if out.text and keeps_slot:
                may_yield = False
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + self._cancel_poll
                # While Redis is away the job is taken to be still wanted.
                assumed: JobState | None = JobState.RUNNING
                state = self._out.maybe(partial(self._store.state, job.id), assumed)
                if state is None and not watch.lost:
                    logger.warning("job %s lost its record (Redis lost its data); stopping it", job.id)
                    watch.lost = True
                if state in (None, JobState.CANCELLED):
                    abort(job.id)
            if self._drain_at is not None and now >= self._drain_at and not watch.yielded:
                logger.info("job %s: this worker stops; the job moves to another", job.id)
                watch.yielded = True
                abort(job.id)
            if may_yield and not watch.yielded and now >= next_yield_poll:
                next_yield_poll = now + self._preempt_poll
                busy, loaded = self.stats.snapshot().in_flight, self._models.loaded()
                wanted = self._preemption and partial(self._preemption.wanted, job, loaded, busy)
                if wanted and self._out.maybe(wanted, False):
                    watch.yielded = True
                    abort(job.id)

    def _settled(self, job: Job) -> None:
        # The slot it was asked for is free (or the job ended on its own): once it took its next message,
        # the next waiting request may have another job yield for it at once.
        if self._preemption is not None:
            self._out.maybe(partial(self._preemption.settled, job), None)

    def _fail(self, job: Job, channel: Channel, code: ErrorCode, message: str, param: str | None) -> None:
        self._finish(job, JobState.FAILED, error=message, error_code=code.value)
        self._out.publish(
            channel, events.Failed(attempt=job.attempt, code=code, message=message, param=param)
        )

    def _finish(self, job: Job, state: JobState, **result: str | int) -> None:
        """Write the job's end into its record. The record is what the API delivers from (a lost Finished
        event is rebuilt from it), so a job that ended while Redis was away waits for Redis, bounded."""
        self._out.durably(f"finish {job.id}", lambda: self._store.finish(job, self.worker, state, **result))
