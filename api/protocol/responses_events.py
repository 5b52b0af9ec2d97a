"""Responses streaming events (SSE and WebSocket mode), with exactly the Open Responses schema's fields.

Every event carries ``sequence_number``, counting from 0 within one response's stream."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from api.protocol.responses import LogProb, OutputItem, OutputText, ResponseObject


class _Event(BaseModel):
    sequence_number: int


# --- lifecycle: each carries a snapshot of the whole response ---


class ResponseCreatedEvent(_Event):
    type: Literal["response.created"] = "response.created"
    response: ResponseObject


class ResponseQueuedEvent(_Event):
    type: Literal["response.queued"] = "response.queued"
    response: ResponseObject


class ResponseInProgressEvent(_Event):
    type: Literal["response.in_progress"] = "response.in_progress"
    response: ResponseObject


class ResponseCompletedEvent(_Event):
    type: Literal["response.completed"] = "response.completed"
    response: ResponseObject


class ResponseIncompleteEvent(_Event):
    type: Literal["response.incomplete"] = "response.incomplete"
    response: ResponseObject


class ResponseFailedEvent(_Event):
    type: Literal["response.failed"] = "response.failed"
    response: ResponseObject


# --- output items and their content parts ---


class OutputItemAddedEvent(_Event):
    type: Literal["response.output_item.added"] = "response.output_item.added"
    output_index: int
    item: OutputItem


class OutputItemDoneEvent(_Event):
    type: Literal["response.output_item.done"] = "response.output_item.done"
    output_index: int
    item: OutputItem


class ContentPartAddedEvent(_Event):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class ContentPartDoneEvent(_Event):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class OutputTextDeltaEvent(_Event):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str
    # An array when present, never null (the OpenAI SDK types it as a required list).
    logprobs: list[LogProb] = []


class OutputTextDoneEvent(_Event):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[LogProb] = []


class FunctionCallArgumentsDeltaEvent(_Event):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDoneEvent(_Event):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    arguments: str


# --- errors ---


class ErrorPayload(BaseModel):
    type: str = Field(description="e.g. `server_error`, `invalid_request_error`.")
    code: str | None = None
    message: str
    param: str | None = None


class ErrorEvent(_Event):
    """An error after the stream started. The payload is nested under ``error`` (the OpenAI SDK raises
    ``APIError`` with its message)."""

    type: Literal["error"] = "error"
    error: ErrorPayload


class WebSocketErrorBody(BaseModel):
    type: str = Field(description="e.g. `invalid_request_error`; a string when present, never null.")
    code: str
    message: str
    param: str | None = None


class WebSocketErrorEvent(BaseModel):
    """A WebSocket-mode failure: an HTTP-style status and the error, no sequence number."""

    type: Literal["error"] = "error"
    status: int
    error: WebSocketErrorBody


ResponseStreamEvent = (
    ResponseCreatedEvent
    | ResponseQueuedEvent
    | ResponseInProgressEvent
    | ResponseCompletedEvent
    | ResponseIncompleteEvent
    | ResponseFailedEvent
    | OutputItemAddedEvent
    | OutputItemDoneEvent
    | ContentPartAddedEvent
    | ContentPartDoneEvent
    | OutputTextDeltaEvent
    | OutputTextDoneEvent
    | FunctionCallArgumentsDeltaEvent
    | FunctionCallArgumentsDoneEvent
    | ErrorEvent
)
