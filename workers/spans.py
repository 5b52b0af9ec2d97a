"""One job's steps on this worker, timed as it runs, and sent as its spans once it ends: ``job`` (a child of
the API's request span, through the job's trace context), and within it ``claim``, ``prefill`` (claimed to
first token) and ``decode`` (first token to end). The claim time also goes out in the job's Started event,
tracing or not: the API measures the job's queue wait with it."""

from __future__ import annotations

import time
from dataclasses import dataclass

from queueing import tracing
from queueing.jobs import Job


@dataclass
class JobSpans:
    # Wall clock, ns: when the delivery was taken, when its claim was applied.
    received_ns: int
    claimed_ns: int
    engine: str = ""
    first_token_ns: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # done, failed or yielded (its slot given up: the job runs again as its next attempt).
    outcome: str = "done"
    finish_reason: str | None = None

    @classmethod
    def claimed(cls, received_ns: int) -> JobSpans:
        return cls(received_ns, time.time_ns())

    @property
    def claimed_at(self) -> float:
        """The claim's time in epoch seconds, as Started carries it."""
        return self.claimed_ns / 1e9

    def first_token(self) -> None:
        self.first_token_ns = time.time_ns()

    def send(self, job: Job, worker: str) -> None:
        if not tracing.enabled():
            return
        ended = time.time_ns()
        attributes: dict[str, str | int] = {
            "gen_ai.request.model": job.model,
            "inferq.job_id": job.id,
            "inferq.job_kind": job.kind,
            "inferq.attempt": job.attempt,
            "inferq.priority": job.priority,
            "inferq.worker": worker,
            "inferq.engine": self.engine,
            "inferq.outcome": self.outcome,
            "gen_ai.usage.input_tokens": self.prompt_tokens,
            "gen_ai.usage.output_tokens": self.completion_tokens,
        }
        if self.finish_reason is not None:
            attributes["gen_ai.response.finish_reasons"] = self.finish_reason
        error = "the job failed" if self.outcome == "failed" else None
        root = tracing.start("job", job.trace_context, attributes, self.received_ns, kind="consumer")
        tracing.record("claim", self.received_ns, self.claimed_ns, root, {"inferq.worker": worker})
        if job.kind in ("chat", "completion"):
            first = self.first_token_ns or ended
            prefill: tracing.Attributes = {
                "gen_ai.usage.input_tokens": self.prompt_tokens,
                "inferq.engine": self.engine,
            }
            tracing.record("prefill", self.claimed_ns, first, root, prefill)
            if self.first_token_ns is not None:
                decode: tracing.Attributes = {
                    "gen_ai.usage.output_tokens": self.completion_tokens,
                    "inferq.engine": self.engine,
                }
                tracing.record("decode", self.first_token_ns, ended, root, decode)
        tracing.end(root, ended, error)
