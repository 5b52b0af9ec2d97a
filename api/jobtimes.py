"""What following a job measures, from the live events of its workers: its queue wait (submitted to claimed,
the claim's time from its Started), its time to first token and the gaps between its tokens, observed in the
histograms of api/metrics.py; and its spans in the request's trace that only the API sees: the queue wait,
and each failover (the job re-queued after its worker died or was drained, or submitted again after Redis
lost its record)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from api.metrics import INTER_TOKEN, QUEUE_WAIT, TTFT
from queueing import events, tracing
from queueing.jobs import Job

if TYPE_CHECKING:
    from prometheus_client import Histogram


@dataclass
class JobTimes:
    # When this process submitted the job (epoch seconds and this process' monotonic clock); None for a run
    # that follows a job submitted before (a resumed stream, a batch line taken over): its waits are unknown.
    submitted_at: float | None = None
    submitted_mono: float = 0.0
    # The attempt whose events are followed, and when the last of them came (wall clock, ns).
    attempt: int = 1
    heard_ns: int = field(default_factory=time.time_ns)
    worker: str | None = None
    claimed: bool = False
    # When the last token event came (monotonic), and of which attempt; None before the first.
    token_at: float | None = None
    token_attempt: int = 0
    # The job's inter-token histogram, looked up once (a lookup costs about what an observation does).
    _gaps: Histogram | None = field(default=None, repr=False)

    @classmethod
    def submitted(cls, attempt: int) -> JobTimes:
        return cls(time.time(), time.monotonic(), attempt)

    def heard(self, job: Job, event: events.Event) -> None:
        """A live event of the job, as it came."""
        if event.attempt < self.attempt:
            return  # a stale attempt's
        if event.attempt > self.attempt:
            self._failover(job, event)
        if isinstance(event, events.Delta):
            self._token(job, event)
        elif isinstance(event, events.Started):
            self._started(job, event)
        self.heard_ns = time.time_ns()

    def resubmitted(self, job: Job, attempt: int, since: float) -> None:
        """The API submitted the job again as ``attempt`` (its record was lost ``since``, monotonic)."""
        lost_ns = time.time_ns() - int((time.monotonic() - since) * 1e9)
        self._failover_span(job, attempt, lost_ns, "record lost", 0)
        self.attempt = attempt

    def _started(self, job: Job, started: events.Started) -> None:
        self.worker = started.worker
        if self.claimed or self.submitted_at is None or started.claimed_at is None:
            return
        self.claimed = True
        if started.attempt != job.attempt:
            return  # the first attempt was lost: its wait is not this one's
        # Two machines' clocks: a claim that reads as earlier than its submission waited no time.
        waited = max(0.0, started.claimed_at - self.submitted_at)
        QUEUE_WAIT.labels(job.model, job.priority).observe(waited)
        attributes = {"gen_ai.request.model": job.model, "inferq.priority": job.priority}
        start = int(self.submitted_at * 1e9)
        tracing.record("queue wait", start, start + int(waited * 1e9), job.trace_context, attributes)

    def _token(self, job: Job, delta: events.Delta) -> None:
        now = time.monotonic()
        if self.token_at is None:
            if self.submitted_at is not None:
                TTFT.labels(job.model, job.priority).observe(now - self.submitted_mono)
            self._gaps = INTER_TOKEN.labels(job.model)
        elif delta.attempt == self.token_attempt and self._gaps is not None:
            tokens = max(1, delta.tokens)
            gap = (now - self.token_at) / tokens
            for _ in range(tokens):
                self._gaps.observe(gap)
        self.token_at, self.token_attempt = now, delta.attempt

    def _failover(self, job: Job, event: events.Event) -> None:
        continues = event.continues if isinstance(event, events.Started) else 0
        self._failover_span(job, event.attempt, self.heard_ns, "re-queued", continues)
        self.attempt = event.attempt

    def _failover_span(self, job: Job, attempt: int, since_ns: int, reason: str, continues: int) -> None:
        """From the last thing heard of the attempt that failed to the first of the next."""
        attributes: tracing.Attributes = {
            "inferq.job_id": job.id,
            "inferq.reason": reason,
            "inferq.attempt": attempt,
            "inferq.worker.lost": self.worker or "",
            # Characters of a stream the new attempt continues (a stream that migrated); 0: from the start.
            "inferq.continues": continues,
        }
        tracing.record("failover", since_ns, time.time_ns(), job.trace_context, attributes)
