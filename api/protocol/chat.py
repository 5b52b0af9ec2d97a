"""Chat completions: request, response and stream chunk models, in the field order of the OpenAI reference."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field, field_serializer

from api.protocol.base import MAX_ITEMS, OpenAIBaseModel, SamplingRequest, ServiceTier, StreamOptions, Usage
from api.protocol.tools import ResponseFormat, Tool, ToolCall, ToolCallDelta, ToolCallParam, ToolChoice
from queueing import events
from queueing.catalog import ModelSpec
from queueing.jobs import Sampling

__all__ = ["StreamOptions", "Usage"]


class TextPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ChatMessageParam(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = Field(None, description="Calls an earlier assistant turn made.")
    tool_call_id: str | None = Field(None, description="On a `tool` message: the call it answers.")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessageParam] = Field(
        min_length=1, max_length=MAX_ITEMS, description="The conversation so far."
    )
    model: str = Field(description="A model id from GET /v1/models.")
    logprobs: bool = Field(False, description="Return the log-probability of each generated token.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Upper bound on generated tokens.")
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")
    n: int = Field(1, ge=1, le=16, description="Choices to generate (one job each, seeds seed+i).")
    parallel_tool_calls: bool | None = Field(None, description="Accepted; at most one call is made.")
    prompt_cache_key: str | None = Field(
        None,
        max_length=1024,
        description="Names the conversation: `affinity` routing keeps it on one worker.",
    )
    response_format: ResponseFormat | None = Field(
        None, description="`json_object` or `json_schema`: output constrained to valid JSON."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    tool_choice: ToolChoice | None = Field(None, description="`auto` (default with tools), `none`, ...")
    tools: list[Tool] | None = Field(None, max_length=128, description="Functions the model may call.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Alternatives per token; needs logprobs.")
    user: str | None = None

    def to_sampling(self, spec: ModelSpec, json_schema: dict[str, Any] | None) -> Sampling:
        return self.sampling(
            spec,
            self.max_completion_tokens or self.max_tokens or spec.defaults.max_tokens or spec.context_length,
            json_schema=json_schema,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None

    @classmethod
    def of(cls, items: list[events.TokenLogprob]) -> ChoiceLogprobs:
        return cls(
            content=[
                TokenLogprob(
                    token=t.token,
                    logprob=t.logprob,
                    bytes=list(t.token.encode()),
                    top_logprobs=[
                        TopLogprob(token=a.token, logprob=a.logprob, bytes=list(a.token.encode()))
                        for a in t.top
                    ],
                )
                for t in items
            ]
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    service_tier: ServiceTier | None = None
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None

    @field_serializer("delta")
    def _delta(self, delta: Delta) -> dict[str, Any]:
        # OpenAI leaves unset delta fields out (the last chunk's delta is `{}`).
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    service_tier: ServiceTier | None = None
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None
