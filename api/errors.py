"""The OpenAI error envelope, and the one place where exceptions become HTTP errors."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)


class OpenAIError(Exception):
    def __init__(
        self, status: int, message: str, type: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404, f"The model `{model}` does not exist.", "invalid_request_error", "model", "model_not_found"
    )


def file_not_found(file_id: str) -> OpenAIError:
    return OpenAIError(
        404, f"No such File object: {file_id}", "invalid_request_error", "file_id", "file_not_found"
    )


def file_too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"The file is larger than the {limit} bytes this server accepts.",
        "invalid_request_error",
        "file",
        "file_too_large",
    )


def no_worker(model: str, waited: float) -> OpenAIError:
    return OpenAIError(
        503,
        f"No live worker serves the model `{model}` (waited {waited:g}s). Start one with "
        f"`inferq worker --models {model}`.",
        "service_unavailable_error",
        "model",
        "no_worker_available",
    )


def model_load_failed(model: str, reason: str) -> OpenAIError:
    return OpenAIError(
        503,
        f"The model `{model}` is not loaded on any worker and could not be loaded on demand: {reason}",
        "service_unavailable_error",
        "model",
        "model_not_loaded",
    )


def worker_not_found(worker: str) -> OpenAIError:
    return OpenAIError(
        404, f"No live worker is named `{worker}`.", "invalid_request_error", "worker", "worker_not_found"
    )


def worker_lost(worker: str) -> OpenAIError:
    return OpenAIError(
        502,
        f"The worker {worker} stopped while streaming this response; the partial output cannot be resumed.",
        "server_error",
        None,
        "worker_lost",
    )


def timed_out(seconds: float) -> OpenAIError:
    return OpenAIError(
        504, f"The request did not finish within {seconds:g}s.", "server_error", None, "timeout"
    )


def client_closed() -> OpenAIError:
    # 499 as nginx logs it: nobody reads this response, but the request ends cleanly.
    return OpenAIError(499, "The client closed the request.", "invalid_request_error", None, "client_closed")


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


async def _openai_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    return JSONResponse(exc.body(), status_code=exc.status)


def invalid_body(problems: Sequence[Any]) -> OpenAIError:
    """The 400 for a request body that fails validation (pydantic's error list), naming the first field."""
    first = problems[0]
    if first.get("type") == "json_invalid":
        return invalid_request(f"The body is not valid JSON: {first.get('msg')}", None, "invalid_json")
    param = _param(tuple(first.get("loc", ())))
    where = f" at `{param}`" if param else ""
    return invalid_request(f"{first.get('msg')}{where}", param, "invalid_value")


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    err = invalid_body(exc.errors())
    return JSONResponse(err.body(), status_code=400)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    err = OpenAIError(exc.status_code, str(exc.detail), kind)
    return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)


async def _redis_error(_: Request, exc: Exception) -> JSONResponse:
    logger.error("redis unavailable: %s", exc)
    err = OpenAIError(
        503, "The queue (Redis) is unavailable.", "service_unavailable_error", None, "redis_unavailable"
    )
    return JSONResponse(err.body(), status_code=503)


def install(app: FastAPI) -> None:
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(redis.RedisError, _redis_error)
