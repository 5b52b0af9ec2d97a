"""Legacy completions (POST /v1/completions): a raw prompt, no chat template."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from api.protocol.base import SamplingRequest, StreamOptions, Usage
from queueing.catalog import ModelSpec
from queueing.jobs import Sampling

_Text = Annotated[str, Field(min_length=1)]


class CompletionRequest(SamplingRequest):
    model: str = Field(description="A model id from GET /v1/models.")
    prompt: _Text | Annotated[list[_Text], Field(min_length=1)] = Field(
        description="One prompt, or several (one choice each, times n)."
    )
    echo: bool = Field(False, description="Put the prompt in front of the completion.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Alternatives reported per token.")
    max_tokens: int | None = Field(16, ge=1, description="Most tokens to generate (unset or null: 16).")
    n: int = Field(1, ge=1, le=16, description="Completions per prompt (one job each, seeds seed+i).")
    prompt_cache_key: str | None = Field(
        None,
        max_length=1024,
        description="Names the conversation: `affinity` routing keeps it on one worker.",
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = Field(None, description="Not supported: must be unset.")
    user: str | None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    def to_sampling(self, spec: ModelSpec) -> Sampling:
        return self.sampling(spec, 16 if self.max_tokens is None else self.max_tokens, logprobs=self.logprobs)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


CompletionFinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: CompletionFinishReason | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None
