"""A job's spans on its worker (workers/spans.py): job, then claim, prefill and decode within it, at the times
measured, in the trace the job carries."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from queueing import tracing
from queueing.jobs import Job
from workers.spans import JobSpans

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
REQUEST_SPAN = 0x00F067AA0BA902B7


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.setup("inferq-worker", exporter)
    yield exporter
    tracing.shutdown()


def test_a_generation_is_a_job_span_with_claim_prefill_and_decode(exported: InMemorySpanExporter) -> None:
    job = Job(model="m", trace_context={"traceparent": f"00-{TRACE}-{REQUEST_SPAN:016x}-01"})
    spans = JobSpans.claimed(received_ns=1)
    spans.engine, spans.prompt_tokens, spans.completion_tokens = "scripted", 7, 5
    spans.first_token()
    spans.send(job, "w1")
    tracing.flush()
    by_name = {s.name: s for s in exported.get_finished_spans()}
    assert set(by_name) == {"job", "claim", "prefill", "decode"}
    root = by_name["job"]
    assert root.context is not None and root.parent is not None
    assert f"{root.context.trace_id:032x}" == TRACE and root.parent.span_id == REQUEST_SPAN
    for name in ("claim", "prefill", "decode"):
        parent = by_name[name].parent
        assert parent is not None and parent.span_id == root.context.span_id, name
    assert by_name["claim"].end_time == by_name["prefill"].start_time == spans.claimed_ns
    assert by_name["prefill"].end_time == by_name["decode"].start_time == spans.first_token_ns
    attributes = dict(root.attributes or {})
    assert attributes["inferq.worker"] == "w1" and attributes["inferq.engine"] == "scripted"
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (7, 5)
