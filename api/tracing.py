"""The API's request spans: one per HTTP request, the child of the client's ``traceparent`` when it sent one,
and the current span while the request is served, so that the jobs it submits carry its context to the
workers (api/jobs.py). Installed only when this process traces (queueing/tracing.py)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from queueing import tracing

_PROPAGATED = (b"traceparent", b"tracestate")


class TracingMiddleware:
    """Pure ASGI, like api/metrics.py: a stream's chunks pass straight through, and the span ends with the
    response's last byte."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in _PROPAGATED}
        method = scope["method"]
        attributes = {"http.request.method": method, "url.path": scope["path"]}
        # Renamed for its route once the router matched it: ids in paths would make every name unique.
        with tracing.current(f"{method} {scope['path']}", carrier, attributes, kind="server") as span:
            assert span is not None  # installed only when tracing

            async def traced(message: Message) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                    if message["status"] >= 500:
                        tracing.failed(span, f"HTTP {message['status']}")
                await send(message)

            try:
                await self.app(scope, receive, traced)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route is not None:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
