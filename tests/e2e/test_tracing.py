"""Tracing across the queue (queueing/tracing.py): an API and two workers as real processes export their spans
over OTLP/HTTP to a receiver in this process. A request carrying a client's ``traceparent`` is one trace, in
that client's trace id, whose spans come from both the API and the worker, each under its right parent; a job
whose worker is killed mid-generation shows its failover as a span of the same trace."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import redis
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from ops.redis_server import RedisServer
from queueing import keys
from tests.fleet import Fleet, write_catalog

pytestmark = pytest.mark.e2e

WORKERS = ("tr-1", "tr-2")
REQUEST = "POST /v1/chat/completions"


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, object]


def _value(v: AnyValue) -> object:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Receiver:
    """An OTLP/HTTP trace receiver: decodes each export (protobuf) and keeps its spans."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.add(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, request: ExportTraceServiceRequest) -> None:
        got = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attributes = {a.key: _value(a.value) for a in s.attributes}
                    ids = s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex()
                    got.append(Span(str(resource.get("service.name")), s.name, *ids, attributes))
        with self._lock:
            self.spans += got

    def trace(self, trace_id: str, until: set[str], timeout: float = 15.0) -> list[Span]:
        """The spans of ``trace_id`` once those named ``until`` all arrived."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = [s for s in self.spans if s.trace_id == trace_id]
            if until <= {s.name for s in spans} or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def fleet(receiver: Receiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    server = RedisServer()
    tmp = tmp_path_factory.mktemp("tracing")
    f = Fleet(
        server.url,
        tmp,
        INFERQ_MODELS_FILE=str(write_catalog(tmp / "models.yaml")),
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        # Spans go out within 0.2 s of their end, not the default 5 s.
        OTEL_BSP_SCHEDULE_DELAY="200",
    )
    try:
        f.start_api()
        speed = {"INFERQ_SCRIPTED_TOKENS_PER_SECOND": "50"}
        for name in WORKERS:
            f.start_worker(name, "scripted", args=["--engine", "scripted"], env=speed)
        yield f
    finally:
        f.close()
        server.stop()


def _traceparent(trace_id: str, span_id: str) -> dict[str, str]:
    return {"traceparent": f"00-{trace_id}-{span_id}-01"}


def _chat(stream: bool, max_tokens: int) -> dict[str, object]:
    return {
        "model": "scripted",
        "messages": [{"role": "user", "content": "Say many words."}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


def _show(spans: list[Span]) -> str:
    """The trace as a tree, for the test's output."""
    children: dict[str, list[Span]] = {}
    for s in spans:
        children.setdefault(s.parent_id, []).append(s)
    ids = {s.span_id for s in spans}
    lines: list[str] = []

    def walk(s: Span, depth: int) -> None:
        lines.append(f"{'  ' * depth}{s.name} [{s.service}]")
        for c in children.get(s.span_id, []):
            walk(c, depth + 1)

    for root in [s for s in spans if s.parent_id not in ids]:
        walk(root, 0)
    return "\n".join(lines)


def test_a_request_is_one_trace_across_the_api_and_the_worker_in_the_clients_trace(
    fleet: Fleet, receiver: Receiver
) -> None:
    trace_id, client_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    url = f"{fleet.base_url}/v1/chat/completions"
    headers = _traceparent(trace_id, client_span)
    with httpx.stream("POST", url, json=_chat(True, 8), headers=headers, timeout=30) as r:
        assert r.status_code == 200
        body = "".join(r.iter_text())
    assert body.rstrip().endswith("[DONE]")
    wanted = {REQUEST, "admission", "queue wait", "job", "claim", "prefill", "decode"}
    spans = receiver.trace(trace_id, wanted)
    print(f"trace {trace_id}:\n{_show(spans)}")  # noqa: T201
    by_name = {s.name: s for s in spans}
    assert wanted <= set(by_name), sorted(by_name)
    assert {s.service for s in spans} == {"inferq-api", "inferq-worker"}
    request, job = by_name[REQUEST], by_name["job"]
    assert request.parent_id == client_span and request.service == "inferq-api"
    assert request.attributes["http.route"] == "/v1/chat/completions"
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["gen_ai.request.model"] == "scripted"
    for name in ("admission", "queue wait", "job"):
        assert by_name[name].parent_id == request.span_id, name
    for name in ("claim", "prefill", "decode"):
        assert by_name[name].parent_id == job.span_id and by_name[name].service == "inferq-worker", name
    assert job.attributes["inferq.worker"] in WORKERS and job.attributes["inferq.engine"] == "scripted"
    assert job.attributes["gen_ai.request.model"] == "scripted"
    assert job.attributes["gen_ai.usage.output_tokens"] == 8
    assert int(str(job.attributes["gen_ai.usage.input_tokens"])) > 0
    # The histograms the API observes while following the job got their samples.
    metrics = httpx.get(f"{fleet.base_url}/metrics").text
    for family in ("inferq_queue_wait_seconds", "inferq_request_ttft_seconds"):
        assert f'{family}_count{{model="scripted",priority="interactive"}}' in metrics, family
    assert 'inferq_request_inter_token_seconds_count{model="scripted"}' in metrics


def _busy_worker(r: redis.Redis, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in WORKERS:
            if r.scard(keys.worker_jobs_key(name)):
                return name
        time.sleep(0.02)
    raise TimeoutError("no worker started the job")


def test_a_job_whose_worker_dies_shows_its_failover_in_the_trace(fleet: Fleet, receiver: Receiver) -> None:
    # Last in this module: it kills one of the fleet's workers.
    trace_id, client_span = "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174"
    result: dict[str, httpx.Response] = {}

    def ask() -> None:
        url = f"{fleet.base_url}/v1/chat/completions"
        headers = _traceparent(trace_id, client_span)
        result["response"] = httpx.post(url, json=_chat(False, 100), headers=headers, timeout=60)

    asker = threading.Thread(target=ask)
    asker.start()
    r = redis.Redis.from_url(fleet.redis_url)
    try:
        victim = _busy_worker(r)
    finally:
        r.close()
    time.sleep(0.3)  # mid-generation (100 tokens at 50 a second)
    fleet.kill_worker(victim)
    asker.join(timeout=60)
    response = result["response"]
    assert response.status_code == 200, response.text
    survivor = response.headers["x-inferq-worker"]
    assert survivor != victim
    spans = receiver.trace(trace_id, {REQUEST, "failover", "job"})
    print(f"trace {trace_id}:\n{_show(spans)}")  # noqa: T201
    request = next(s for s in spans if s.name == REQUEST)
    failovers = [s for s in spans if s.name == "failover"]
    assert failovers, sorted(s.name for s in spans)
    for f in failovers:
        assert f.parent_id == request.span_id and f.attributes["inferq.attempt"] == 2
    # The API saw the job's next attempt start, and the worker that re-queued it says whose job it was.
    api = [f for f in failovers if f.service == "inferq-api"]
    assert api and api[0].attributes["inferq.worker.lost"] == victim
    reaper = [f for f in failovers if f.service == "inferq-worker"]
    assert reaper and reaper[0].attributes["inferq.worker.lost"] == victim
    # The killed worker never ended its job span; the survivor's is the second attempt's.
    (job,) = [s for s in spans if s.name == "job"]
    assert (job.attributes["inferq.worker"], job.attributes["inferq.attempt"]) == (survivor, 2)
