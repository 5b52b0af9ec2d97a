"""The Batch API's wire shapes: the batch object, its create request, the input and output lines."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from api.protocol.base import OpenAIBaseModel

BatchEndpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]
BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
# Statuses after which nothing changes any more.
TERMINAL: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})

_WINDOW = re.compile(r"^(\d+)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def window_seconds(window: str) -> int:
    """Seconds in a completion window such as ``24h`` (OpenAI's only value; shorter ones are accepted)."""
    match = _WINDOW.match(window)
    if match is None:
        raise ValueError(f"completion_window {window!r} is not a duration such as '24h'")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


class BatchCreateRequest(OpenAIBaseModel):
    input_file_id: str = Field(description="A file uploaded with purpose `batch`: one request per line.")
    endpoint: BatchEndpoint = Field(description="The endpoint every line is for.")
    completion_window: str = Field("24h", description="Lines not done this long after creation expire.")
    metadata: dict[str, str] | None = Field(None, description="Up to 16 key-value pairs, kept as given.")

    @field_validator("completion_window")
    @classmethod
    def _window(cls, value: str) -> str:
        if window_seconds(value) <= 0:
            raise ValueError("completion_window must be positive")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and len(value) > 16:
            raise ValueError("metadata holds at most 16 pairs")
        return value


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int = 0


class BatchError(BaseModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError] = []


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    usage: BatchUsage = Field(default_factory=BatchUsage)
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class RequestLine(BaseModel):
    """One line of a batch input file."""

    custom_id: str = Field(min_length=1, max_length=512)
    method: Literal["POST"] = "POST"
    url: str
    body: dict[str, Any]


class LineResponse(BaseModel):
    status_code: int
    request_id: str
    body: dict[str, Any]


class LineError(BaseModel):
    code: str
    message: str


class ResultLine(BaseModel):
    """One line of a batch's output or error file: the response the endpoint gave (error statuses go to the
    error file), or an error when the line never ran (the batch was cancelled or expired first)."""

    id: str
    custom_id: str
    response: LineResponse | None = None
    error: LineError | None = None

    @property
    def ok(self) -> bool:
        return self.response is not None and self.response.status_code == 200

    @property
    def error_code(self) -> str | None:
        if self.error is not None:
            return self.error.code
        if self.response is None or self.ok:
            return None
        error = self.response.body.get("error")
        return str(error.get("code")) if isinstance(error, dict) else None
