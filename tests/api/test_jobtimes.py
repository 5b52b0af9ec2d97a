"""What following a job measures (api/jobtimes.py): its queue wait, time to first token and inter-token gaps
in the histograms of api/metrics.py, and its queue wait and failovers as spans of the request's trace."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from api.jobtimes import JobTimes
from api.metrics import REGISTRY
from queueing import events, tracing
from queueing.jobs import ChatMessage, Job
from tests.api._runs import followed

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
REQUEST_SPAN = 0x00F067AA0BA902B7


def follow(job: Job, queued: list[events.AnyEvent], times: JobTimes) -> list[events.Event]:
    return followed(job, queued, times=times)


def samples(metric: str, model: str, priority: str | None = "interactive") -> float:
    labels = {"model": model} if priority is None else {"model": model, "priority": priority}
    return REGISTRY.get_sample_value(f"{metric}_count", labels) or 0.0


def test_a_streamed_job_observes_its_queue_wait_time_to_first_token_and_each_tokens_gap() -> None:
    job = Job(model="times-m", messages=[ChatMessage(role="user", content="hi")], stream=True)
    times = JobTimes.submitted(1)
    claimed = time.time() + 0.25
    follow(
        job,
        [
            events.Started(attempt=1, worker="w", prompt_tokens=2, claimed_at=claimed),
            events.Delta(attempt=1, text="a"),
            events.Delta(attempt=1, text="bcd", tokens=3),
            events.Delta(attempt=1, text="e"),
            events.Finished(attempt=1, finish_reason="length", prompt_tokens=2, completion_tokens=5),
        ],
        times,
    )
    wait_sum = REGISTRY.get_sample_value(
        "inferq_queue_wait_seconds_sum", {"model": "times-m", "priority": "interactive"}
    )
    print(f"queue wait observed {wait_sum:.3f} s")  # noqa: T201
    assert wait_sum is not None and 0.2 < wait_sum < 0.3
    assert samples("inferq_queue_wait_seconds", "times-m") == 1
    assert samples("inferq_request_ttft_seconds", "times-m") == 1
    # One per token after the first event's: 3 + 1.
    assert samples("inferq_request_inter_token_seconds", "times-m", None) == 4


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.setup("inferq-api", exporter)
    yield exporter
    tracing.shutdown()


def test_a_job_requeued_after_its_worker_died_records_a_failover_span(exported: InMemorySpanExporter) -> None:
    context = {"traceparent": f"00-{TRACE}-{REQUEST_SPAN:016x}-01"}
    job = Job(model="failover-m", messages=[ChatMessage(role="user", content="hi")], trace_context=context)
    follow(
        job,
        [
            events.Started(attempt=1, worker="dead", prompt_tokens=2, claimed_at=time.time()),
            events.Started(attempt=2, worker="alive", prompt_tokens=2, claimed_at=time.time()),
            events.Finished(attempt=2, finish_reason="stop", prompt_tokens=2, completion_tokens=1, text="x"),
        ],
        JobTimes.submitted(1),
    )
    tracing.flush()
    spans = {s.name: s for s in exported.get_finished_spans()}
    assert set(spans) == {"queue wait", "failover"}
    failover = spans["failover"]
    assert failover.parent is not None and failover.parent.span_id == REQUEST_SPAN
    attributes = dict(failover.attributes or {})
    assert (attributes["inferq.worker.lost"], attributes["inferq.attempt"]) == ("dead", 2)
    # The second attempt's wait is not the job's: observed once, for the attempt submitted.
    assert samples("inferq_queue_wait_seconds", "failover-m") == 1
