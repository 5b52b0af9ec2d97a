"""Tracing (queueing/tracing.py): on only when the OTEL_* variables ask for it, nothing imported otherwise; a
client's trace context carried in a job and continued by the spans recorded from it."""

from __future__ import annotations

import contextvars
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from queueing import tracing
from queueing.jobs import Job
from tests.fleet import ROOT

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = {"traceparent": f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01", "tracestate": "vendor=x"}


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
    ],
)
def test_on_only_when_the_environment_asks(env: dict[str, str], on: bool) -> None:
    assert tracing.wanted(env) is on


def test_off_by_default_the_api_and_worker_import_no_opentelemetry() -> None:
    code = (
        "import sys\n"
        "from api.app import create_app\n"
        "from queueing import tracing\n"
        "import workers.runner, queueing.recovery\n"
        "app = create_app()\n"
        "assert not tracing.enabled() and tracing.inject() == {}\n"
        "tracing.record('x', 0, 1)\n"
        "with tracing.current('y') as span:\n"
        "    assert span is None\n"
        "ours = ('opentelemetry.sdk.trace', 'opentelemetry.exporter')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(ours))\n"
        "assert not loaded, loaded\n"
    )
    # Not all of opentelemetry: redis-py (8.x) imports the SDK's metrics on its own wherever it is installed.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.setup("inferq-test", exporter)
    yield exporter
    tracing.shutdown()
    assert not tracing.enabled()


def test_a_client_context_is_carried_in_a_job_and_continued(exported: InMemorySpanExporter) -> None:
    with tracing.current("POST /v1/chat/completions", CLIENT_PARENT, kind="server") as request:
        assert request is not None
        carrier = tracing.inject()
    request_id = request.get_span_context().span_id
    assert carrier["traceparent"] == f"00-{CLIENT_TRACE}-{request_id:016x}-01"
    assert carrier["tracestate"] == "vendor=x"
    # Through the queue: the job as JSON, then its next attempt after a failover.
    job = Job.model_validate_json(Job(model="m", trace_context=carrier).model_dump_json())
    job = job.model_copy(update={"attempt": 2})
    tracing.record("failover", 10, 20, job.trace_context, {"inferq.attempt": job.attempt})
    tracing.flush()
    spans = {s.name: s for s in exported.get_finished_spans()}
    assert set(spans) == {"POST /v1/chat/completions", "failover"}
    failover = spans["failover"]
    assert failover.context is not None and failover.parent is not None
    assert f"{failover.context.trace_id:032x}" == CLIENT_TRACE
    assert failover.parent.span_id == request_id
    assert (failover.start_time, failover.end_time) == (10, 20)
    assert dict(failover.attributes or {}) == {"inferq.attempt": 2}
    assert spans["POST /v1/chat/completions"].resource.attributes["service.name"] == "inferq-test"


def test_spans_begun_and_ended_at_measured_times_nest(exported: InMemorySpanExporter) -> None:
    root = tracing.start("job", CLIENT_PARENT, {"inferq.worker": "w"}, start_ns=100, kind="consumer")
    tracing.record("claim", 100, 150, root)
    tracing.end(root, 300, error="the job failed")
    tracing.flush()
    claim, job = exported.get_finished_spans()
    assert claim.parent is not None and job.context is not None
    assert claim.parent.span_id == job.context.span_id
    assert (job.start_time, job.end_time, job.status.description) == (100, 300, "the job failed")


def test_attributes_go_to_the_current_span_only_while_it_records(
    exported: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    with tracing.current("POST /v1/responses", kind="server"):
        tracing.annotate({"gen_ai.request.model": "m"})
        # A background response's task: created in the request, it runs on after the request's span ended.
        later = contextvars.copy_context()
    with caplog.at_level(logging.WARNING):
        later.run(tracing.annotate, {"inferq.job_id": "late"})
    assert not caplog.records, caplog.records
    tracing.flush()
    (request,) = exported.get_finished_spans()
    assert dict(request.attributes or {}) == {"gen_ai.request.model": "m"}
