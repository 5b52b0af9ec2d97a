"""The request id and the access log.

Every HTTP request gets an id: the client's ``x-request-id`` when it sent a sensible one, else a new one. It
goes back in the ``x-request-id`` response header (OpenAI's name for it; Anthropic routes use the same id for
their ``request-id``, api/errors.py).

With ``INFERQ_ACCESS_LOG`` on (the default), each request then writes one line to the ``inferq.access``
logger when it ends, a stream when its last event went out: uvicorn's access format extended with what it
does not know, e.g.

    127.0.0.1:5000 - "POST /v1/chat/completions HTTP/1.1" 200 OK id=req_8f0c… model=smollm2-135m
    duration=0.412s worker=gpu-1

The model and workers are noted by the code that already knows them (api/deps.py resolves the model, the
serving core names the workers for the ``x-inferq-worker`` header) into this request's record, so no body is
read twice. uvicorn's own access log is off (ops/cli.py): it would repeat every line without those fields.
"""

from __future__ import annotations

import http
import logging
import re
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "x-request-id"
logger = logging.getLogger("inferq.access")

# What a client may choose as its id: enough for UUIDs and tracing ids, nothing that could forge a log line.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


@dataclass
class RequestRecord:
    """What one request's log line says beyond its HTTP fields. Mutable and shared: code that runs in a
    copied context (a thread, a task) still writes into the same record."""

    id: str
    model: str | None = None
    workers: str | None = None


current: ContextVar[RequestRecord | None] = ContextVar("inferq_request", default=None)


def request_id() -> str | None:
    """The id of the request being served, None outside one (a batch line, a background task)."""
    record = current.get()
    return None if record is None else record.id


def note_model(model: str) -> None:
    if (record := current.get()) is not None:
        # Noted before the catalog checked it: a client's newline must not start a forged log line.
        record.model = model if model.isprintable() else repr(model)


def note_workers(workers: str) -> None:
    if (record := current.get()) is not None:
        record.workers = workers


def _id_from(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER.encode():
            text: str = value.decode("latin-1")
            if _CLIENT_ID.fullmatch(text):
                return text
    return f"req_{uuid.uuid4().hex}"


def _status(code: int) -> str:
    try:
        return f"{code} {http.HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)


def line(scope: Scope, status: int, record: RequestRecord, seconds: float) -> str:
    client = scope.get("client")
    where = f"{client[0]}:{client[1]}" if client else "-"
    path = scope.get("root_path", "") + scope["path"]
    if query := scope.get("query_string", b""):
        path += "?" + query.decode("latin-1")
    version = scope.get("http_version", "1.1")
    return (
        f'{where} - "{scope["method"]} {path} HTTP/{version}" {_status(status)} id={record.id} '
        f"model={record.model or '-'} duration={seconds:.3f}s worker={record.workers or '-'}"
    )


class AccessLogMiddleware:
    """Pure ASGI, outermost: it times the whole request, the key check's refusals included, and lets a
    stream's chunks pass straight through."""

    def __init__(self, app: ASGIApp, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        record = RequestRecord(_id_from(scope))
        token = current.set(record)
        # An exception that no response answered is answered 500 by starlette's outermost layer.
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                if all(name.lower() != REQUEST_ID_HEADER.encode() for name, _ in headers):
                    headers.append((REQUEST_ID_HEADER.encode(), record.id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current.reset(token)
            if self.enabled:
                logger.info("%s", line(scope, status, record, time.perf_counter() - started))
