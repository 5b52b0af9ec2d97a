"""Running one batch line: the same code path as the endpoint it names, at batch priority, answered as an
output-file line instead of an HTTP response."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from api import errors
from api.adapters import chat, completions, embeddings, responses
from api.deps import model_spec
from api.jobs import Dispatcher, RunOptions
from api.protocol.batches import LineError, LineResponse, RequestLine, ResultLine
from api.protocol.chat import ChatCompletionRequest
from api.protocol.completions import CompletionRequest
from api.protocol.embeddings import EmbeddingRequest
from api.protocol.responses import ResponsesRequest
from api.serving.core import Outcome, Serve
from api.serving.fanout import JobIds
from queueing.catalog import Catalog, ModelSpec

# An adapter's non-streamed path: (body, serve) -> (result, outcome).
Complete = Callable[..., Awaitable[tuple[BaseModel, Outcome]]]


@dataclass(frozen=True)
class Endpoint:
    request: type[ChatCompletionRequest | CompletionRequest | EmbeddingRequest | ResponsesRequest]
    complete: Complete
    # The prefix of the endpoint's own response ids, which name its jobs too.
    prefix: str


ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint(ChatCompletionRequest, chat.complete, "chatcmpl"),
    "/v1/completions": Endpoint(CompletionRequest, completions.complete, "cmpl"),
    "/v1/embeddings": Endpoint(EmbeddingRequest, embeddings.complete, "embd"),
    "/v1/responses": Endpoint(ResponsesRequest, responses.complete, "resp"),
}


def job_ids(endpoint: str, batch_id: str, index: int) -> JobIds:
    """A line's jobs are named after the batch and the line, so an API process that takes the batch over
    finds them (running, or finished in their records) instead of running them again."""
    prefix = ENDPOINTS[endpoint].prefix
    return lambda k: f"{prefix}-{batch_id}-{index}-{k}"


async def execute(
    line: RequestLine,
    endpoint: str,
    ids: JobIds,
    dispatcher: Dispatcher,
    catalog: Catalog,
    options: RunOptions,
) -> ResultLine:
    """The line's result; an error the endpoint would answer becomes the line's error response."""
    line_id = f"batch_req_{uuid.uuid4().hex}"
    try:
        if line.url != endpoint:
            raise errors.invalid_request(
                f"This line is for {line.url}, but the batch is for {endpoint}; a batch serves one endpoint.",
                "url",
                "invalid_url",
            )
        handler = ENDPOINTS[endpoint]
        body, spec = _request(handler, line.body, catalog)
        result, _ = await handler.complete(body, Serve(spec, dispatcher, None, options, ids))
        return ResultLine(
            id=line_id,
            custom_id=line.custom_id,
            response=LineResponse(
                status_code=200,
                request_id=str(getattr(result, "id", line_id)),
                body=result.model_dump(mode="json"),
            ),
        )
    except errors.ApiError as exc:
        response = LineResponse(status_code=exc.status, request_id=line_id, body=exc.body())
        return ResultLine(id=line_id, custom_id=line.custom_id, response=response)


def _request(
    handler: Endpoint, raw: dict[str, Any], catalog: Catalog
) -> tuple[ChatCompletionRequest | CompletionRequest | EmbeddingRequest | ResponsesRequest, ModelSpec]:
    try:
        body = handler.request.model_validate(raw)
    except ValidationError as exc:
        raise errors.invalid_body(exc.errors()) from None
    if getattr(body, "stream", False):
        raise errors.invalid_request(
            "Batch lines cannot stream; drop `stream`.", "stream", "unsupported_value"
        )
    return body, model_spec(catalog, body.model)


def unrun(line: RequestLine, code: str, message: str) -> ResultLine:
    """The error-file line of a request that never ran: the batch was cancelled or expired first."""
    return ResultLine(
        id=f"batch_req_{uuid.uuid4().hex}",
        custom_id=line.custom_id,
        error=LineError(code=code, message=message),
    )


def broken(line: RequestLine, message: str) -> ResultLine:
    """The error-file line of a request that could not be run for the server's own reasons."""
    line_id = f"batch_req_{uuid.uuid4().hex}"
    body = errors.ApiError(500, message, "server_error").body()
    return ResultLine(
        id=line_id,
        custom_id=line.custom_id,
        response=LineResponse(status_code=500, request_id=line_id, body=body),
    )
