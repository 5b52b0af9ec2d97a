"""Chat completions: request, response and stream chunk models, in the field order of the OpenAI reference."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field, field_serializer, field_validator

from api.protocol.base import OpenAIBaseModel
from queueing.catalog import ModelSpec
from queueing.jobs import ChatMessage, Job, Sampling


class TextPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ChatMessageParam(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class ChatCompletionRequest(OpenAIBaseModel):
    messages: list[ChatMessageParam] = Field(min_length=1, description="The conversation so far.")
    model: str = Field(description="A model id from GET /v1/models.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    max_completion_tokens: int | None = Field(None, ge=1, description="Upper bound on generated tokens.")
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")
    n: int = Field(1, ge=1, description="Only 1 is supported.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, description="Same seed, same parameters: the same output.")
    stop: str | list[str] | None = Field(None, description="Up to 4 sequences where generation stops.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    user: str | None = None

    # --- inferq extensions (as vLLM accepts them) ---
    top_k: int | None = Field(None, ge=0, description="Sample from the k most likely tokens; 0 disables.")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def to_job(self, spec: ModelSpec) -> Job:
        d = spec.defaults
        return Job(
            model=self.model,
            messages=[ChatMessage(role=m.role, content=m.text()) for m in self.messages],
            sampling=Sampling(
                max_tokens=self.max_completion_tokens
                or self.max_tokens
                or d.max_tokens
                or spec.context_length,
                temperature=d.temperature if self.temperature is None else self.temperature,
                top_p=d.top_p if self.top_p is None else self.top_p,
                top_k=self.top_k or 0,
                min_p=self.min_p or 0.0,
                stop=self.stop if isinstance(self.stop, list) else [],
                seed=self.seed,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                ignore_eos=self.ignore_eos,
            ),
            stream=self.stream,
        )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


FinishReason = Literal["stop", "length"]


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReason | None = None

    @field_serializer("delta")
    def _delta(self, delta: Delta) -> dict[str, str]:
        # OpenAI leaves unset delta fields out (the last chunk's delta is `{}`).
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None
