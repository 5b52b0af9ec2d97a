"""The Responses API (``POST /v1/responses``): request, input items, the response object and its output
items, as the Open Responses schema (tests/conformance/schemas/openresponses.json) and the OpenAI reference
define them. Streaming events are in ``api.protocol.responses_events``."""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, model_validator

from api.protocol.base import MAX_ITEMS, OpenAIBaseModel

ToolName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]
CallId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
ItemStatus = Literal["in_progress", "completed", "incomplete"]
ResponseStatus = Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]


def response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def message_id(seed: str | None = None) -> str:
    """A new output message id; the same one for the same ``seed`` (a stream rendered again)."""
    return f"msg_{_hex(seed)}"


def function_call_id(seed: str | None = None) -> str:
    return f"fc_{_hex(seed)}"


def _hex(seed: str | None) -> str:
    return uuid.uuid4().hex if seed is None else hashlib.sha256(seed.encode()).hexdigest()[:32]


# --- content parts ---


class InputTextContent(OpenAIBaseModel):
    type: Literal["input_text"] = "input_text"
    text: str


class TopLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int] = []


class LogProb(TopLogProb):
    top_logprobs: list[TopLogProb] = []


class OutputText(OpenAIBaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    # Required by the schema even when empty; inferq never annotates.
    annotations: list[dict[str, Any]] = []
    # An array when present, never null.
    logprobs: list[LogProb] = []


ContentPart = Annotated[InputTextContent | OutputText, Field(discriminator="type")]


# --- input items ---


class InputMessage(OpenAIBaseModel):
    """A message item; ``type`` may be left out (the SDK's easy input message)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart] = Field(description="Text, or `input_text` / `output_text` parts.")
    id: str | None = None
    status: str | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def to_item(self) -> StoredMessage:
        parts: list[ContentPart]
        if self.role == "assistant":
            parts = [OutputText(text=self.text())]
        else:
            parts = [InputTextContent(text=self.text())]
        return StoredMessage(id=self.id or message_id(), role=self.role, content=parts)


class FunctionCallInput(OpenAIBaseModel):
    """A call an earlier turn made, sent back in the history."""

    type: Literal["function_call"] = "function_call"
    call_id: CallId
    name: ToolName
    arguments: str = Field(description="The arguments as a JSON text.")
    id: str | None = None
    status: ItemStatus | None = None

    def to_item(self) -> FunctionCallItem:
        return FunctionCallItem(
            id=self.id or function_call_id(), call_id=self.call_id, name=self.name, arguments=self.arguments
        )


class FunctionCallOutputInput(OpenAIBaseModel):
    """The result of a function call, as the client ran it."""

    type: Literal["function_call_output"] = "function_call_output"
    call_id: CallId
    output: str | list[InputTextContent] = Field(description="Text, or `input_text` parts.")
    id: str | None = None
    status: ItemStatus | None = None

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(part.text for part in self.output)

    def to_item(self) -> FunctionCallOutputItem:
        return FunctionCallOutputItem(
            id=self.id or f"fco_{uuid.uuid4().hex}", call_id=self.call_id, output=self.text()
        )


class CompactionInput(OpenAIBaseModel):
    """A compaction item that ``/v1/responses/compact`` returned, sent back in place of what it replaced."""

    type: Literal["compaction"] = "compaction"
    encrypted_content: str = Field(max_length=10 * 1024 * 1024)
    id: str | None = None

    def to_item(self) -> CompactionItem:
        return CompactionItem(
            id=self.id or f"cmp_{uuid.uuid4().hex}", encrypted_content=self.encrypted_content
        )


def _item_type(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("type", "message"))
    return str(getattr(value, "type", "message"))


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallInput, Tag("function_call")]
    | Annotated[FunctionCallOutputInput, Tag("function_call_output")]
    | Annotated[CompactionInput, Tag("compaction")],
    Discriminator(
        _item_type,
        custom_error_type="unsupported_item_type",
        custom_error_message=(
            "input item type must be 'message', 'function_call', 'function_call_output' or 'compaction'"
        ),
    ),
]
InputItems = Annotated[list[InputItem], Field(max_length=MAX_ITEMS)]


# --- tools and text format ---


class FunctionTool(OpenAIBaseModel):
    """A function tool; Responses tools are flat (no nested ``function`` object)."""

    type: Literal["function"] = Field(description="Only `function` tools are served.")
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments.")
    strict: bool | None = None


class FunctionToolChoice(OpenAIBaseModel):
    type: Literal["function"]
    name: str


class AllowedToolsChoice(OpenAIBaseModel):
    type: Literal["allowed_tools"]
    tools: list[FunctionToolChoice] = Field(min_length=1, max_length=128)
    mode: Literal["none", "auto", "required"] = "auto"


ToolChoice = (
    Literal["none", "auto", "required"]
    | Annotated[FunctionToolChoice | AllowedToolsChoice, Field(discriminator="type")]
)


class TextFormatText(OpenAIBaseModel):
    type: Literal["text"] = "text"


class TextFormatJsonObject(OpenAIBaseModel):
    type: Literal["json_object"] = "json_object"


class TextFormatJsonSchema(OpenAIBaseModel):
    # `schema` would shadow a BaseModel attribute; the wire name stays `schema`.
    model_config = ConfigDict(extra="allow", populate_by_name=True, serialize_by_alias=True)

    type: Literal["json_schema"] = "json_schema"
    name: ToolName
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON schema the output must match.")
    description: str | None = None
    strict: bool | None = None


TextFormat = Annotated[
    TextFormatText | TextFormatJsonObject | TextFormatJsonSchema, Field(discriminator="type")
]


class TextConfig(OpenAIBaseModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class Reasoning(OpenAIBaseModel):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponseStreamOptions(OpenAIBaseModel):
    include_obfuscation: bool = True


Metadata = Annotated[
    dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=512)]],
    Field(max_length=16, description="Up to 16 pairs; keys up to 64 characters, values up to 512."),
]


# --- requests ---


class ResponsesRequest(OpenAIBaseModel):
    """``POST /v1/responses``. Fields inferq cannot honour (reasoning, include, prompt, conversation, ...)
    parse here; the serving code refuses them."""

    background: bool = Field(False, description="Run in the background and return at once.")
    conversation: str | dict[str, Any] | None = Field(None, description="A conversation to add to.")
    include: list[str] | None = Field(None, description="Extra output to include.")
    input: str | InputItems = Field(
        default_factory=list, description="A user message as text, or a list of input items."
    )
    instructions: str | None = Field(None, description="A system message placed before the input.")
    max_output_tokens: int | None = Field(None, ge=1, description="Upper bound on generated tokens.")
    max_tool_calls: int | None = Field(None, ge=1, description="Upper bound on tool calls.")
    metadata: Metadata | None = None
    model: str = Field(description="A model id from GET /v1/models.")
    parallel_tool_calls: bool | None = Field(None, description="Whether calls may run in parallel.")
    previous_response_id: str | None = Field(None, description="A stored response to continue from.")
    prompt: dict[str, Any] | None = Field(None, description="A prompt template reference.")
    prompt_cache_key: str | None = Field(None, max_length=64, description="Groups requests sharing a prefix.")
    reasoning: Reasoning | None = Field(None, description="Reasoning options (reasoning models only).")
    safety_identifier: str | None = Field(None, max_length=64, description="A stable id of the end user.")
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    store: bool = Field(True, description="Store the response so it can be fetched and continued.")
    stream: bool = Field(False, description="Stream events as server-sent events.")
    stream_options: ResponseStreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Sampling temperature.")
    text: TextConfig | None = Field(None, description="Output format: text, `json_object` or `json_schema`.")
    tool_choice: ToolChoice | None = Field(None, description="`auto` (default with tools), `none`, ...")
    tools: list[FunctionTool] | None = Field(
        None, max_length=128, description="Functions the model may call."
    )
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Alternatives per token.")
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="Nucleus sampling mass.")
    truncation: Literal["auto", "disabled"] = Field("disabled", description="Drop old input that overflows.")
    user: str | None = Field(None, description="Deprecated: use safety_identifier / prompt_cache_key.")

    # Open Responses extensions the OpenAI reference does not list.
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)

    # --- inferq extensions (as chat completions and vLLM accept them) ---
    seed: int | None = Field(None, description="Same seed, same parameters: the same output.")
    top_k: int | None = Field(None, ge=0, description="Sample from the k most likely tokens; 0 disables.")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")


class ResponseCreateMessage(ResponsesRequest):
    """A WebSocket-mode client message: ``{"type": "response.create", ...request fields}``."""

    type: Literal["response.create"]

    @model_validator(mode="after")
    def _no_http_fields(self) -> ResponseCreateMessage:
        sent = sorted(self.model_fields_set & {"stream", "stream_options", "background"})
        if sent:
            raise ValueError(f"{', '.join(sent)} must not be sent in a WebSocket response.create message")
        return self


class CompactRequest(OpenAIBaseModel):
    """``POST /v1/responses/compact``."""

    model: str = Field(description="A model id from GET /v1/models.")
    input: str | InputItems | None = Field(None, description="Text, or a list of input items.")
    previous_response_id: str | None = None
    instructions: str | None = None
    prompt_cache_key: str | None = Field(None, max_length=64)


# --- output items and the response object ---


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str = Field(default_factory=message_id)
    status: ItemStatus = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = []


class FunctionCallItem(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str = Field(default_factory=function_call_id)
    call_id: str
    name: str
    arguments: str = Field(description="The arguments as a JSON text.")
    status: ItemStatus = "completed"


class StoredMessage(BaseModel):
    """A message of any role, as input items and compactions list it."""

    type: Literal["message"] = "message"
    id: str = Field(default_factory=message_id)
    status: ItemStatus = "completed"
    role: Literal["user", "system", "developer", "assistant"]
    content: list[ContentPart]


class FunctionCallOutputItem(BaseModel):
    type: Literal["function_call_output"] = "function_call_output"
    id: str
    call_id: str
    output: str
    status: ItemStatus = "completed"


class CompactionItem(BaseModel):
    type: Literal["compaction"] = "compaction"
    id: str = Field(default_factory=lambda: f"cmp_{uuid.uuid4().hex}")
    encrypted_content: str = Field(
        description="Opaque: what the compacted items said, for this server to read."
    )


OutputItem = Annotated[OutputMessage | FunctionCallItem, Field(discriminator="type")]
StoredItem = Annotated[
    StoredMessage | FunctionCallItem | FunctionCallOutputItem | CompactionItem, Field(discriminator="type")
]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    # Not in the pinned schema; the current OpenAI SDK types it as required.
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class ResponseError(BaseModel):
    code: str = Field(description="e.g. `server_error`, `context_length_exceeded`.")
    message: str


class IncompleteDetails(BaseModel):
    reason: str = Field(description="`max_output_tokens` or `content_filter`.")


class JsonSchemaFormatEcho(BaseModel):
    """``text.format`` of type ``json_schema`` as the response echoes it: the pinned schema requires
    ``schema`` to be null there, and ``strict`` a boolean."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    type: Literal["json_schema"] = "json_schema"
    name: str
    description: str | None = None
    schema_: None = Field(None, alias="schema")
    strict: bool = False


class TextField(BaseModel):
    format: Annotated[
        TextFormatText | TextFormatJsonObject | JsonSchemaFormatEcho, Field(discriminator="type")
    ] = TextFormatText()
    verbosity: Literal["low", "medium", "high"] = "medium"


def _echo_text(text: TextConfig | None) -> TextField:
    fmt = text.format if text else None
    verbosity = (text.verbosity if text else None) or "medium"
    if isinstance(fmt, TextFormatJsonSchema):
        echo = JsonSchemaFormatEcho(name=fmt.name, description=fmt.description, strict=bool(fmt.strict))
        return TextField(format=echo, verbosity=verbosity)
    return TextField(format=TextFormatJsonObject() if fmt else TextFormatText(), verbosity=verbosity)


class ResponseObject(BaseModel):
    """The response resource. Every field is required by the schema; nullable ones are ``| None``."""

    id: str = Field(default_factory=response_id)
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    status: ResponseStatus
    incomplete_details: IncompleteDetails | None = None
    model: str
    previous_response_id: str | None = None
    instructions: str | None = None
    output: list[OutputItem] = []
    error: ResponseError | None = None
    tools: list[FunctionTool] = []
    tool_choice: ToolChoice = "auto"
    truncation: Literal["auto", "disabled"] = "disabled"
    parallel_tool_calls: bool = True
    text: TextField = TextField()
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int = 0
    temperature: float = 1.0
    reasoning: Reasoning | None = None
    usage: ResponseUsage | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    store: bool = True
    background: bool = False
    service_tier: str = "default"
    metadata: dict[str, str] = {}
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    @classmethod
    def from_request(cls, request: ResponsesRequest, **fields: Any) -> ResponseObject:
        """The response echoing ``request``'s settings; ``fields`` (status, output, usage, temperature as
        sampled, ...) override."""
        echo: dict[str, Any] = {
            "model": request.model,
            "previous_response_id": request.previous_response_id,
            "instructions": request.instructions,
            "tools": request.tools or [],
            "tool_choice": request.tool_choice or "auto",
            "truncation": request.truncation,
            "parallel_tool_calls": True
            if request.parallel_tool_calls is None
            else request.parallel_tool_calls,
            "text": _echo_text(request.text),
            "top_logprobs": request.top_logprobs or 0,
            "reasoning": request.reasoning,
            "max_output_tokens": request.max_output_tokens,
            "max_tool_calls": request.max_tool_calls,
            "store": request.store,
            "background": request.background,
            "metadata": request.metadata or {},
            "safety_identifier": request.safety_identifier,
            "prompt_cache_key": request.prompt_cache_key,
        }
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            if getattr(request, name) is not None:
                echo[name] = getattr(request, name)
        return cls.model_validate({"status": "in_progress", **echo, **fields})


class CompactResponse(BaseModel):
    id: str = Field(default_factory=response_id)
    object: Literal["response.compaction"] = "response.compaction"
    output: list[StoredItem]
    created_at: int = Field(default_factory=lambda: int(time.time()))
    usage: ResponseUsage


class InputItemList(BaseModel):
    """``GET /v1/responses/{id}/input_items``."""

    object: Literal["list"] = "list"
    data: list[StoredItem]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True
