"""The server-sent events of a streamed ``POST /v1/messages``, as Anthropic's reference lists them.

A stream is ``message_start`` (the message with empty content, no stop reason), then per content block
``content_block_start`` / ``content_block_delta``… / ``content_block_stop`` (``index`` is the block's place in
the final content), then ``message_delta`` (stop reason, cumulative usage) and ``message_stop``. ``ping`` may
come anywhere. An error after the first byte is an ``error`` event, and the stream ends.

Each event goes out as ``event: <type>`` plus ``data: <json>``: the SDK reads the SSE event name (it skips
an event without one, drops ``ping`` and raises on ``error``), not only the ``type`` in the data.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from api.protocol.messages import (
    ContentBlock,
    ErrorResponse,
    Message,
    StopReason,
    TextBlock,
    ToolUseBlock,
    Usage,
)


class MessageStartEvent(BaseModel):
    type: Literal["message_start"] = "message_start"
    message: Message

    @classmethod
    def of(cls, id: str, model: str, input_tokens: int) -> MessageStartEvent:
        message = Message(
            id=id, content=[], model=model, usage=Usage(input_tokens=input_tokens, output_tokens=0)
        )
        return cls(message=message)


class ContentBlockStartEvent(BaseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: ContentBlock = Field(
        description='A text block with `text: ""`, or a tool_use block with `input: {}`.'
    )

    @classmethod
    def text(cls, index: int) -> ContentBlockStartEvent:
        return cls(index=index, content_block=TextBlock(text=""))

    @classmethod
    def tool_use(cls, index: int, id: str, name: str) -> ContentBlockStartEvent:
        return cls(index=index, content_block=ToolUseBlock(id=id, name=name, input={}))


class PingEvent(BaseModel):
    type: Literal["ping"] = "ping"


class TextDelta(BaseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJSONDelta(BaseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str = Field(description="A piece of the tool input's JSON text; the pieces concatenate.")


class ContentBlockDeltaEvent(BaseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: Annotated[TextDelta | InputJSONDelta, Field(discriminator="type")]


class ContentBlockStopEvent(BaseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDelta(BaseModel):
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None


class MessageDeltaUsage(BaseModel):
    """Cumulative counts for the whole message. Only ``output_tokens`` is required (by the SDK too); the SDK
    keeps message_start's value of an optional count that is null here."""

    output_tokens: int
    input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class MessageDeltaEvent(BaseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDelta
    usage: MessageDeltaUsage


class MessageStopEvent(BaseModel):
    type: Literal["message_stop"] = "message_stop"


StreamEvent = Annotated[
    MessageStartEvent
    | ContentBlockStartEvent
    | PingEvent
    | ContentBlockDeltaEvent
    | ContentBlockStopEvent
    | MessageDeltaEvent
    | MessageStopEvent
    | ErrorResponse,
    Field(discriminator="type"),
]
