"""OpenTelemetry tracing, shared by the API and the workers; off unless the standard ``OTEL_*`` variables ask
for it (an OTLP endpoint, or ``OTEL_TRACES_EXPORTER``).

opentelemetry is imported only by ``setup``: a process that does not trace never imports it, and each call
here costs it one ``None`` check. A request's trace crosses the queue in its job (``Job.trace_context``, the
W3C ``traceparent``/``tracestate`` of the API's request span), so the worker's spans join the client's trace.

Most spans are recorded after the fact, from times measured as the job went (``record``): a worker knows when
its prefill ended only at the first token, and the API learns when its job was claimed from the worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal, TypeAlias

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, SpanKind, Tracer

logger = logging.getLogger(__name__)

Attributes = Mapping[str, str | int | float | bool]
# W3C trace context headers (traceparent, tracestate), as a job carries them.
Carrier = Mapping[str, str]
# What a span is the child of: a carrier (another process' span), a span of this process, or None for the
# current span of this context (the API's request span).
Parent: TypeAlias = "Carrier | Span | None"
Kind = Literal["internal", "server", "consumer"]

_provider: TracerProvider | None = None
_tracer: Tracer | None = None


def wanted(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces: ``OTEL_TRACES_EXPORTER`` otlp or console, or an OTLP
    endpoint; never with ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = _exporter_names(env)
    if "none" in exporters:
        return False
    if exporters & {"otlp", "console"}:
        return True
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _exporter_names(env: Mapping[str, str]) -> set[str]:
    return {n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()}


def setup(service: str, exporter: SpanExporter | None = None) -> bool:
    """Start tracing in this process if the environment asks for it (or ``exporter`` is given: tests);
    returns whether it traces. ``service`` is the service name unless ``OTEL_SERVICE_NAME`` names one. Once
    per process: a second call keeps the first one's setup."""
    global _provider, _tracer
    if _tracer is not None:
        return True
    if exporter is None and not wanted():
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or service
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    # Batched, on the processor's own thread: a span ended on the serving path is only queued.
    for each in [exporter] if exporter is not None else _exporters():
        provider.add_span_processor(BatchSpanProcessor(each))
    _provider, _tracer = provider, provider.get_tracer("inferq")
    logger.info("tracing on: service %s", name)
    return True


def _exporters() -> list[SpanExporter]:
    names = _exporter_names(os.environ) or {"otlp"}
    out: list[SpanExporter] = []
    if "console" in names:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        out.append(ConsoleSpanExporter())
    if "otlp" in names:
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
        )
        if protocol != "http/protobuf":
            logger.warning("OTLP protocol %s is not installed; traces go out as http/protobuf", protocol)
        # Endpoint, headers, timeout and compression from the OTEL_EXPORTER_OTLP_* variables.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        out.append(OTLPSpanExporter())
    return out


def enabled() -> bool:
    return _tracer is not None


def flush(timeout_ms: int = 5000) -> None:
    """Send the spans queued so far (an API process whose lifespan ends)."""
    if _provider is not None:
        _provider.force_flush(timeout_ms)


def shutdown() -> None:
    """Send what is queued and stop tracing in this process (a worker leaving)."""
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider, _tracer = None, None


def now_ns() -> int:
    return time.time_ns()


def inject() -> dict[str, str]:
    """The current span's W3C trace context, for a job to carry; empty when there is none."""
    if _tracer is None:
        return {}
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier


def _context(parent: Parent) -> Context | None:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if parent is None:
        return None
    if isinstance(parent, Mapping):
        return TraceContextTextMapPropagator().extract(parent)
    return trace.set_span_in_context(parent)


def _kind(kind: Kind) -> SpanKind:
    from opentelemetry.trace import SpanKind

    return {"internal": SpanKind.INTERNAL, "server": SpanKind.SERVER, "consumer": SpanKind.CONSUMER}[kind]


def start(
    name: str,
    parent: Parent = None,
    attributes: Attributes | None = None,
    start_ns: int | None = None,
    kind: Kind = "internal",
) -> Span | None:
    """A span begun (at ``start_ns``, else now), to be ended by ``end``; None when not tracing."""
    if _tracer is None:
        return None
    return _tracer.start_span(
        name,
        context=_context(parent),
        kind=_kind(kind),
        attributes=attributes,
        start_time=start_ns,
    )


def end(span: Span | None, end_ns: int | None = None, error: str | None = None) -> None:
    if span is None:
        return
    if error is not None:
        failed(span, error)
    span.end(end_time=end_ns)


def failed(span: Span, error: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, error))


def record(
    name: str,
    start_ns: int,
    end_ns: int,
    parent: Parent = None,
    attributes: Attributes | None = None,
    error: str | None = None,
) -> None:
    """A span of something that happened already, from its measured times."""
    if _tracer is None:
        return
    end(start(name, parent, attributes, start_ns), max(start_ns, end_ns), error)


def current(
    name: str, parent: Parent = None, attributes: Attributes | None = None, kind: Kind = "internal"
) -> contextlib.AbstractContextManager[Span | None]:
    """A span around a block, the current span inside it (so that what the block starts or injects is its
    child): the API's request span, the admission of a request."""
    if _tracer is None:
        return contextlib.nullcontext()
    return _tracer.start_as_current_span(
        name,
        context=_context(parent),
        kind=_kind(kind),
        attributes=attributes,
    )


def annotate(attributes: Attributes) -> None:
    """Add attributes to the current span (the request span learns its model in the dispatcher)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    # A background response's job is submitted after its request's span ended: nothing to add to then.
    if span.is_recording():
        span.set_attributes(attributes)
