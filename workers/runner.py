"""Runs one queued job on a loaded engine and publishes its events. No Celery here: tasks.py is the glue."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

import redis

from engines.base import (
    ContextLengthExceeded,
    Embedder,
    Engine,
    GenerationRequest,
    Output,
    TokenCounter,
    TokenLogprob,
    UnsupportedRequest,
)
from queueing import events, keys
from queueing.events import ErrorCode
from queueing.jobs import Job, JobState
from queueing.jobstore import JobStore
from workers.models import ModelManager, ModelNotLoaded
from workers.preempt import Preemption
from workers.stats import WorkerStats

logger = logging.getLogger(__name__)


def to_generation_request(job: Job) -> GenerationRequest:
    s = job.sampling
    return GenerationRequest(
        request_id=job.id,
        messages=[m.model_dump() for m in job.messages],
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        stop=s.stop,
        seed=s.seed,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        ignore_eos=s.ignore_eos,
        prompt=job.prompt if job.kind == "completion" else None,
        json_schema=s.json_schema,
        logprobs=s.logprobs,
    )


def _wire_logprobs(items: list[TokenLogprob]) -> list[events.TokenLogprob]:
    return [
        events.TokenLogprob(
            token=t.token,
            logprob=t.logprob,
            top=[events.TopLogprob(token=tok, logprob=lp) for tok, lp in t.top],
        )
        for t in items
    ]


@dataclass
class _Watch:
    yielded: bool = False


class Yielded(Exception):
    """A batch line stopped to give its slot to an interactive request; ``again`` is its next attempt."""

    def __init__(self, again: Job | None) -> None:
        super().__init__("yielded")
        self.again = again


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
    ) -> None:
        self.worker = worker
        self.stats = stats or WorkerStats()
        self._r = client
        self._store = JobStore(client)
        self._models = models
        self._cancel_poll = cancel_poll_seconds
        self._preemption = preemption
        self._preempt_poll = preempt_poll_seconds

    def run(self, job: Job) -> Job | None:
        """Run ``job``; returns the job to queue again when it gave its slot up (a batch line yielding to
        an interactive request), else None."""
        if not self._store.claim(job, self.worker):
            # Finished, cancelled, or re-queued as a later attempt: this delivery is stale.
            logger.info("skipping stale delivery of %s attempt %d", job.id, job.attempt)
            return None
        channel = keys.stream_channel(job.id)
        self.stats.job_started()
        # What the job counts for in this worker's stats, reported once whichever way it ends.
        ok, yielded, tokens, decode_seconds = False, False, 0, 0.0
        try:
            if job.kind == "embedding":
                self._embed(job, channel)
            elif job.kind == "count":
                self._count(job, channel)
            else:
                tokens, decode_seconds = self._generate(job, channel)
            ok = True
        except Yielded as exc:
            # Neither done nor failed: it runs again, here or elsewhere.
            yielded = True
            logger.info("batch job %s attempt %d yielded its slot", job.id, job.attempt)
            return exc.again
        except ContextLengthExceeded as exc:
            param = {"completion": "prompt", "embedding": "input"}.get(job.kind, "messages")
            self._fail(job, channel, ErrorCode.CONTEXT_LENGTH_EXCEEDED, str(exc), param)
        except UnsupportedRequest as exc:
            self._fail(job, channel, ErrorCode.UNSUPPORTED_VALUE, str(exc), exc.param)
        except ModelNotLoaded as exc:
            self._fail(job, channel, ErrorCode.MODEL_NOT_LOADED, str(exc), "model")
        except Exception as exc:
            # Whatever broke, the waiting client must hear of it rather than wait for its timeout.
            logger.exception("job %s failed", job.id)
            self._fail(job, channel, ErrorCode.INTERNAL, f"generation failed: {exc}", None)
        finally:
            if yielded:
                self.stats.job_yielded()
            else:
                self.stats.job_finished(ok, tokens, decode_seconds)
        return None

    def _generate(self, job: Job, channel: str) -> tuple[int, float]:
        """Runs the generation; returns the tokens generated and the seconds spent decoding them."""
        engine = self._models.get(job.model)
        started = time.monotonic()
        first_token_at: float | None = None
        outputs = engine.generate(to_generation_request(job))
        first = next(outputs)
        self._publish(
            channel,
            events.Started(attempt=job.attempt, worker=self.worker, prompt_tokens=first.prompt_tokens),
        )
        parts: list[str] = []
        logprobs: list[events.TokenLogprob] | None = [] if job.sampling.logprobs is not None else None
        last = first
        watch = _Watch()
        for out in self._watch(job, engine.abort, outputs, watch):
            last = out
            step_logprobs = _wire_logprobs(out.logprobs) if out.logprobs else None
            if out.text:
                if first_token_at is None:
                    first_token_at = time.monotonic()
                    self.stats.first_token(first_token_at - started)
                parts.append(out.text)
            if logprobs is not None and step_logprobs:
                logprobs.extend(step_logprobs)
            if job.stream and (out.text or step_logprobs):
                self._publish(
                    channel, events.Delta(attempt=job.attempt, text=out.text, logprobs=step_logprobs)
                )
        if watch.yielded and last.finish_reason == "cancelled":
            # (A line that ended on its own before the abort took effect is finished below as usual.)
            raise Yielded(self._store.yield_slot(job, self.worker))
        reason = last.finish_reason or "stop"
        # Only a stop string ends a job with one; a record field cannot hold None, so it is left out.
        stop = {"stop_sequence": last.stop_sequence} if last.stop_sequence is not None else {}
        text = "".join(parts)
        decode = time.monotonic() - first_token_at if first_token_at is not None else 0.0
        self._store.finish(
            job,
            self.worker,
            JobState.CANCELLED if reason == "cancelled" else JobState.DONE,
            text=text,
            finish_reason=reason,
            prompt_tokens=first.prompt_tokens,
            completion_tokens=last.completion_tokens,
            **stop,
        )
        self._publish(
            channel,
            events.Finished(
                attempt=job.attempt,
                finish_reason=reason,
                prompt_tokens=first.prompt_tokens,
                completion_tokens=last.completion_tokens,
                stop_sequence=last.stop_sequence,
                text=None if job.stream else text,
                logprobs=None if job.stream else logprobs,
            ),
        )
        return last.completion_tokens, decode

    def _embed(self, job: Job, channel: str) -> None:
        engine: Engine = self._models.get(job.model)
        if not isinstance(engine, Embedder):
            raise UnsupportedRequest(f"The {engine.name} engine of `{job.model}` cannot embed.", "model")
        # No tokens are generated: nothing to add to the speed averages that routing reads.
        result = engine.embed(job.inputs)
        self._publish(
            channel,
            events.Started(attempt=job.attempt, worker=self.worker, prompt_tokens=result.prompt_tokens),
        )
        # In the record too: the API rebuilds a lost Finished event from it (pub/sub is at-most-once).
        self._store.finish(
            job,
            self.worker,
            JobState.DONE,
            embeddings=json.dumps(result.vectors),
            finish_reason="stop",
            prompt_tokens=result.prompt_tokens,
            completion_tokens=0,
        )
        self._publish(
            channel,
            events.Finished(
                attempt=job.attempt,
                finish_reason="stop",
                prompt_tokens=result.prompt_tokens,
                completion_tokens=0,
                embeddings=result.vectors,
            ),
        )

    def _count(self, job: Job, channel: str) -> None:
        engine = self._models.get(job.model)
        if isinstance(engine, TokenCounter):
            tokens = engine.count_tokens(to_generation_request(job))
        else:
            # The first output of every generation reports the prompt's tokens; closing the stream right
            # there ends it before anything is decoded.
            outputs = engine.generate(to_generation_request(job))
            try:
                tokens = next(outputs).prompt_tokens
            finally:
                if isinstance(outputs, Generator):
                    outputs.close()
        self._publish(channel, events.Started(attempt=job.attempt, worker=self.worker, prompt_tokens=tokens))
        self._store.finish(
            job, self.worker, JobState.DONE, finish_reason="stop", prompt_tokens=tokens, completion_tokens=0
        )
        self._publish(
            channel,
            events.Finished(
                attempt=job.attempt, finish_reason="stop", prompt_tokens=tokens, completion_tokens=0
            ),
        )

    def _watch(
        self, job: Job, abort: Callable[[str], None], outputs: Iterator[Output], watch: _Watch
    ) -> Iterator[Output]:
        """Pass outputs through, asking the engine to stop once the job was cancelled (client gone) or, for
        a batch line, once an interactive request waits for this worker's slot (``watch.yielded``)."""
        now = time.monotonic()
        next_poll = now + self._cancel_poll
        may_yield = self._preemption is not None and job.priority == "batch"
        next_yield_poll = now + self._preempt_poll
        for out in outputs:
            yield out
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + self._cancel_poll
                if self._store.state(job.id) == JobState.CANCELLED:
                    abort(job.id)
            if may_yield and not watch.yielded and now >= next_yield_poll:
                next_yield_poll = now + self._preempt_poll
                busy = self.stats.snapshot().in_flight
                if self._preemption is not None and self._preemption.wanted(job, self._models.loaded(), busy):
                    watch.yielded = True
                    abort(job.id)

    def _fail(self, job: Job, channel: str, code: ErrorCode, message: str, param: str | None) -> None:
        self._store.finish(job, self.worker, JobState.FAILED, error=message, error_code=code.value)
        self._publish(channel, events.Failed(attempt=job.attempt, code=code, message=message, param=param))

    def _publish(self, channel: str, event: events.AnyEvent) -> None:
        self._r.publish(channel, events.encode(event))
