"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``): request, response and
error models. The stream events are in ``messages_stream``.

inferq serves text and client tools only: a content block other than ``text``, ``tool_use`` and
``tool_result``, or a server tool (``web_search_…``, ``bash_…``, …), fails validation with a message that
names what is supported, at the block's or the tool's location.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from api.protocol.base import MAX_ITEMS, MAX_STOP_SEQUENCES, OpenAIBaseModel


class AnthropicBaseModel(OpenAIBaseModel):
    """Unknown fields accepted and logged once: Claude Code and the SDK send ``thinking``,
    ``service_tier``, ``context_management``, ``cache_control`` … which inferq does not act on."""


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


# --- content blocks, as requests send them ---


class TextBlockParam(AnthropicBaseModel):
    type: Literal["text"]
    text: str
    citations: list[dict[str, Any]] | None = Field(None, description="Accepted and ignored.")
    cache_control: dict[str, Any] | None = Field(None, description="Accepted and ignored.")


class ToolUseBlockParam(AnthropicBaseModel):
    """A tool call of an earlier assistant turn, sent back in the history."""

    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


def _only(kinds: tuple[str, ...]) -> BeforeValidator:
    """Refuses a block whose ``type`` is not one of ``kinds`` with a message that lists them, at the
    block's own location (a discriminated union alone would say less)."""
    names = ", ".join(repr(k) for k in kinds)

    def check(value: Any) -> Any:
        # Anything but a dict (a model built in code, a stray string) is left to the union to judge.
        if isinstance(value, dict) and value.get("type") not in kinds:
            if "type" not in value:
                raise PydanticCustomError(
                    "missing_block_type",
                    "a content block needs a `type`; supported types: {names}",
                    {"names": names},
                )
            raise PydanticCustomError(
                "unsupported_content_block",
                "content block type {kind} is not supported here; supported types: {names}",
                {"kind": repr(value["type"]), "names": names},
            )
        return value

    return BeforeValidator(check)


def _as_blocks(value: Any) -> Any:
    # A string is shorthand for one text block; one shape keeps the serving layer's conversion simple.
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if isinstance(value, list | tuple):
        return list(value)
    raise PydanticCustomError("content_type", "must be a string or a list of content blocks")


TextOnly = Annotated[TextBlockParam, _only(("text",))]
TextBlocks = Annotated[list[TextOnly], BeforeValidator(_as_blocks)]


class ToolResultBlockParam(AnthropicBaseModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: TextBlocks = Field(default_factory=list, description="A string or text blocks.")
    is_error: bool = False
    cache_control: dict[str, Any] | None = None

    def text(self) -> str:
        return text_of(self.content)


BLOCK_TYPES = ("text", "tool_use", "tool_result")
ContentBlockParam = Annotated[
    Annotated[TextBlockParam | ToolUseBlockParam | ToolResultBlockParam, Field(discriminator="type")],
    _only(BLOCK_TYPES),
]
# Which blocks each role may hold, as Anthropic's API enforces it.
_ROLE_BLOCKS = {"user": ("text", "tool_result"), "assistant": ("text", "tool_use"), "system": ("text",)}


def text_of(blocks: Sequence[BaseModel], sep: str = "\n") -> str:
    """The text of the text blocks in ``blocks``; other blocks are skipped. Blocks are separate parts (a
    system reminder, then the prompt), so they are joined with a newline rather than glued together."""
    return sep.join(b.text for b in blocks if isinstance(b, TextBlockParam))


class MessageParam(AnthropicBaseModel):
    role: Literal["user", "assistant", "system"] = Field(
        description="`system` is a mid-conversation system message (newer models, SDK `SystemMessageParam`)."
    )
    content: Annotated[list[ContentBlockParam], BeforeValidator(_as_blocks)] = Field(
        description="A string (one text block) or a list of content blocks."
    )

    @model_validator(mode="after")
    def _blocks_fit_role(self) -> MessageParam:
        allowed = _ROLE_BLOCKS[self.role]
        for i, block in enumerate(self.content):
            if block.type not in allowed:
                raise ValueError(f"a {self.role} message cannot hold a {block.type} block (content[{i}])")
        return self

    def text(self) -> str:
        return text_of(self.content)

    def tool_uses(self) -> list[ToolUseBlockParam]:
        return [b for b in self.content if isinstance(b, ToolUseBlockParam)]

    def tool_results(self) -> list[ToolResultBlockParam]:
        return [b for b in self.content if isinstance(b, ToolResultBlockParam)]


# --- tools ---


def _custom_tool(value: Any) -> Any:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in (None, "custom"):
        raise PydanticCustomError(
            "unsupported_tool",
            "tool type {kind} is not supported: inferq runs client tools only "
            "(name, description, input_schema; type 'custom' or none), not server tools",
            {"kind": repr(kind)},
        )
    return value


class ToolParam(AnthropicBaseModel):
    type: Literal["custom"] | None = None
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    input_schema: dict[str, Any] = Field(description="JSON schema of the tool's `input`.")
    cache_control: dict[str, Any] | None = None


class ToolChoice(AnthropicBaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, description="The tool to call; with `type: tool` only.")
    disable_parallel_tool_use: bool | None = Field(None, description="Accepted; at most one call is made.")

    @model_validator(mode="after")
    def _name_with_tool(self) -> ToolChoice:
        if self.type == "tool" and not self.name:
            raise ValueError("`name` is required with tool_choice type 'tool'")
        return self


class Metadata(AnthropicBaseModel):
    user_id: str | None = None


# --- requests ---


class ConversationRequest(AnthropicBaseModel):
    """What ``/v1/messages`` and ``/v1/messages/count_tokens`` share: the prompt and the tools."""

    model: str = Field(description="A model id from GET /v1/models.")
    messages: list[MessageParam] = Field(
        min_length=1, max_length=MAX_ITEMS, description="The conversation so far."
    )
    system: TextBlocks | None = Field(None, description="A string or text blocks.")
    tools: list[Annotated[ToolParam, BeforeValidator(_custom_tool)]] | None = Field(
        None, max_length=128, description="Client tools the model may call."
    )
    tool_choice: ToolChoice | None = Field(
        None, description="`auto` (default with tools), `any`, `tool`, `none`."
    )

    def system_text(self) -> str:
        return text_of(self.system or [])

    def tool_mode(self) -> Literal["none", "auto", "required"]:
        """Whether the model may (``auto``) or must (``required``, a ``tool_choice`` of ``any`` or ``tool``)
        call a tool, in OpenAI's terms; ``tool_choice.name`` names the forced tool."""
        if not self.tools or (self.tool_choice is not None and self.tool_choice.type == "none"):
            return "none"
        if self.tool_choice is not None and self.tool_choice.type in ("any", "tool"):
            return "required"
        return "auto"


class MessagesRequest(ConversationRequest):
    max_tokens: int = Field(ge=1, description="Upper bound on generated tokens.")
    metadata: Metadata | None = None
    stop_sequences: list[str] | None = Field(
        None, max_length=MAX_STOP_SEQUENCES, description="Sequences where generation stops."
    )
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="Sample from the k most likely tokens.")
    top_p: float | None = Field(None, ge=0.0, le=1.0)

    @field_validator("stop_sequences")
    @classmethod
    def _no_empty_stop(cls, value: list[str] | None) -> list[str] | None:
        if value and any(not s for s in value):
            raise ValueError("stop sequences must not be empty")
        return value


class CountTokensRequest(ConversationRequest):
    pass


class CountTokensResponse(BaseModel):
    input_tokens: int


# --- the response ---


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str
    citations: None = None


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str = Field(default_factory=tool_use_id)
    name: str
    input: dict[str, Any]


ContentBlock = Annotated[TextBlock | ToolUseBlock, Field(discriminator="type")]
StopReason = Literal[
    "end_turn",
    "max_tokens",
    "stop_sequence",
    "tool_use",
    "pause_turn",
    "refusal",
    "model_context_window_exceeded",
]


class Usage(BaseModel):
    # The real API answers 0 (not null) for the cache counts when nothing was cached, and clients add them up.
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int | None = 0
    cache_read_input_tokens: int | None = 0
    service_tier: Literal["standard", "priority", "batch"] | None = "standard"


class Message(BaseModel):
    id: str = Field(default_factory=message_id)
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[ContentBlock]
    model: str
    stop_reason: StopReason | None = Field(None, description="None only in the stream's `message_start`.")
    stop_sequence: str | None = None
    usage: Usage


# --- errors ---

ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "timeout_error",
    "overloaded_error",
]
_ERROR_TYPES: dict[int, tuple[int, ErrorType]] = {
    400: (400, "invalid_request_error"),
    401: (401, "authentication_error"),
    403: (403, "permission_error"),
    404: (404, "not_found_error"),
    413: (413, "request_too_large"),
    429: (429, "rate_limit_error"),
    # Anthropic documents 504 as `timeout_error` (the SDK's GatewayTimeoutError), not `api_error`.
    504: (504, "timeout_error"),
    # What inferq answers 503 (no worker for the model, the queue down) is Anthropic's "overloaded": it
    # documents that as 529 `overloaded_error`, and the SDK raises OverloadedError and retries on 529.
    503: (529, "overloaded_error"),
}


def anthropic_error_type(status: int) -> tuple[int, ErrorType]:
    """The status and error type Anthropic's API would answer for an error inferq answers with ``status``
    in OpenAI's protocols. Other 4xx (422, 499, …) keep their status as ``invalid_request_error`` and other
    5xx as ``api_error``, as Anthropic's error reference says."""
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    if 400 <= status < 500:
        return status, "invalid_request_error"
    if 500 <= status < 600:
        return status, "api_error"
    # Not an error status: whatever raised it is a bug of ours.
    return 500, "api_error"


class ErrorObject(BaseModel):
    type: ErrorType
    message: str


class ErrorResponse(BaseModel):
    """Anthropic's error envelope; also the stream's ``error`` event (the same shape, after a 200)."""

    type: Literal["error"] = "error"
    error: ErrorObject
    # The SDK's exceptions take their request_id from the `request-id` header, not from here.
    request_id: str | None = None

    @classmethod
    def for_status(
        cls, status: int, message: str, request_id: str | None = None
    ) -> tuple[int, ErrorResponse]:
        """The status to answer and the envelope for an error inferq would answer with ``status``."""
        answer, kind = anthropic_error_type(status)
        return answer, cls(error=ErrorObject(type=kind, message=message), request_id=request_id)
