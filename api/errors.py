"""Errors: the domain error every layer raises, and the one place where it becomes each protocol's envelope.

An ``ApiError`` carries an HTTP status, a message, the field at fault and a code. OpenAI's protocols answer
``{"error": {"message", "type", "param", "code"}}``; Anthropic's (the ``/v1/messages`` routes) answer
``{"type": "error", "error": {"type", "message"}, "request_id"}`` with its own statuses (mapped in
``api.protocol.messages``) and a ``request-id`` header. Which one a request gets depends on its path alone,
so a route, the key check and the validation handler need not know.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from api import access_log
from api.metrics import REQUEST_ERRORS
from api.protocol.messages import ErrorResponse
from queueing.events import ErrorCode

logger = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        # Sent with the error when it is the answer (Retry-After of a full queue).
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# A worker's domain codes (queueing.events.ErrorCode) as HTTP statuses and OpenAI error types.
_FAILURES: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: (400, "invalid_request_error"),
    ErrorCode.UNSUPPORTED_VALUE: (400, "invalid_request_error"),
    ErrorCode.MODEL_NOT_LOADED: (503, "service_unavailable_error"),
    ErrorCode.INTERNAL: (500, "server_error"),
}


def from_failure(code: ErrorCode, message: str, param: str | None = None) -> ApiError:
    """The error a worker reported for a job (its domain code), as the API answers it."""
    status, kind = _FAILURES[code]
    return ApiError(status, message, kind, param, None if code is ErrorCode.INTERNAL else code.value)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404, f"The model `{model}` does not exist.", "invalid_request_error", "model", "model_not_found"
    )


def file_not_found(file_id: str) -> ApiError:
    return ApiError(
        404, f"No such File object: {file_id}", "invalid_request_error", "file_id", "file_not_found"
    )


def file_too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The file is larger than the {limit} bytes this server accepts.",
        "invalid_request_error",
        "file",
        "file_too_large",
    )


def no_worker(model: str, waited: float) -> ApiError:
    return ApiError(
        503,
        f"No live worker serves the model `{model}` (waited {waited:g}s). Start one with "
        f"`inferq worker --models {model}`.",
        "service_unavailable_error",
        "model",
        "no_worker_available",
    )


def model_load_failed(model: str, reason: str) -> ApiError:
    return ApiError(
        503,
        f"The model `{model}` is not loaded on any worker and could not be loaded on demand: {reason}",
        "service_unavailable_error",
        "model",
        "model_not_loaded",
    )


def worker_not_found(worker: str) -> ApiError:
    return ApiError(
        404, f"No live worker is named `{worker}`.", "invalid_request_error", "worker", "worker_not_found"
    )


def worker_lost(worker: str) -> ApiError:
    return ApiError(
        502,
        f"The worker {worker} stopped while streaming this response; the partial output cannot be resumed.",
        "server_error",
        None,
        "worker_lost",
    )


def timed_out(seconds: float) -> ApiError:
    return ApiError(504, f"The request did not finish within {seconds:g}s.", "server_error", None, "timeout")


def client_closed() -> ApiError:
    # 499 as nginx logs it: nobody reads this response, but the request ends cleanly.
    return ApiError(499, "The client closed the request.", "invalid_request_error", None, "client_closed")


# Pydantic names the union branch it tried in an error's location ("str", "list[TextPart]", …).
_BRANCH_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
_SOURCES = {"body", "query", "path", "header", "cookie"}


def _is_field(part: int | str) -> bool:
    return isinstance(part, int) or (part.isidentifier() and part not in _BRANCH_TAGS)


def _param(loc: tuple[int | str, ...]) -> str | None:
    # The first part says where the field came from (body, query, …); OpenAI names only the field.
    if loc and loc[0] in _SOURCES:
        loc = loc[1:]
    parts = [p for p in loc if _is_field(p)]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def invalid_body(problems: Sequence[Any]) -> ApiError:
    """The 400 for a request body that fails validation (pydantic's error list), naming the first field."""
    first = problems[0]
    if first.get("type") == "json_invalid":
        return invalid_request(f"The body is not valid JSON: {first.get('msg')}", None, "invalid_json")
    param = _param(tuple(first.get("loc", ())))
    where = f" at `{param}`" if param else ""
    return invalid_request(f"{first.get('msg')}{where}", param, "invalid_value")


ANTHROPIC_PATHS = "/v1/messages"
# Anthropic answers every request with a `request-id` header (errors name it in their body too).
REQUEST_ID_HEADER = "request-id"


def is_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PATHS or path.startswith(ANTHROPIC_PATHS + "/")


def anthropic_request_id() -> str:
    # The request's own id (api/access_log.py): its body, both headers and its access log line agree.
    return access_log.request_id() or f"req_{uuid.uuid4().hex[:24]}"


def anthropic_body(err: ApiError, request_id: str | None = None) -> tuple[int, dict[str, Any]]:
    """Anthropic's status and envelope for ``err`` (the mapping of statuses is the protocol module's)."""
    status, body = ErrorResponse.for_status(err.status, err.message, request_id)
    return status, body.model_dump(mode="json", exclude_none=True)


def envelope(path: str, err: ApiError, request_id: str | None = None) -> tuple[int, dict[str, Any]]:
    """The status and body that a request to ``path`` gets for ``err``, in its protocol's envelope."""
    if is_anthropic(path):
        return anthropic_body(err, request_id)
    return err.status, err.body()


def counted(err: ApiError) -> ApiError:
    """``err``, counted as answered (inferq_request_errors_total): by its code, or its type when it has none
    (a route not found, an internal failure), and by its status in inferq's terms (an Anthropic request may be
    answered another; an error in a stream came after a 200). Each error counts once, where it takes its wire
    shape: ``respond`` (an error response), the SSE layer (an error event), a Responses stream's events
    (api/adapters/responses_stream.py, also in WebSocket mode and in the background) and the WebSocket mode's
    error message."""
    REQUEST_ERRORS.labels(err.code or err.type, str(err.status)).inc()
    return err


def respond(path: str, err: ApiError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    counted(err)
    request_id = anthropic_request_id() if is_anthropic(path) else None
    status, body = envelope(path, err, request_id)
    if request_id is not None:
        headers = {**(headers or {}), REQUEST_ID_HEADER: request_id}
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return respond(request.url.path, exc, exc.headers or None)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return respond(request.url.path, invalid_body(exc.errors()))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return respond(request.url.path, ApiError(exc.status_code, str(exc.detail), kind), exc.headers)


def redis_unavailable() -> ApiError:
    return ApiError(
        503, "The queue (Redis) is unavailable.", "service_unavailable_error", None, "redis_unavailable"
    )


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("redis unavailable: %s", exc)
    return respond(request.url.path, redis_unavailable())


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(redis.RedisError, _redis_error)
