"""Legacy completions (POST /v1/completions): a raw prompt, no chat template."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

from api.protocol.base import OpenAIBaseModel, StreamOptions, Usage, check_stops
from queueing.catalog import ModelSpec
from queueing.jobs import Sampling

_Text = Annotated[str, Field(min_length=1)]


class CompletionRequest(OpenAIBaseModel):
    model: str = Field(description="A model id from GET /v1/models.")
    prompt: _Text | Annotated[list[_Text], Field(min_length=1)] = Field(
        description="One prompt, or several (one choice each, times n)."
    )
    echo: bool = Field(False, description="Put the prompt in front of the completion.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logprobs: int | None = Field(None, ge=0, le=20, description="Alternatives reported per token.")
    max_tokens: int | None = Field(16, ge=1, description="Most tokens to generate (unset or null: 16).")
    n: int = Field(1, ge=1, le=16, description="Completions per prompt (one job each, seeds seed+i).")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, description="Same seed, same parameters: the same output.")
    stop: str | list[str] | None = Field(None, description="Up to 4 sequences where generation stops.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = Field(None, description="Not supported: must be unset.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    user: str | None = None

    # --- inferq extensions (as vLLM accepts them) ---
    top_k: int | None = Field(None, ge=0, description="Sample from the k most likely tokens; 0 disables.")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")

    _stops = field_validator("stop")(check_stops)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    def to_sampling(self, spec: ModelSpec) -> Sampling:
        d = spec.defaults
        return Sampling(
            max_tokens=16 if self.max_tokens is None else self.max_tokens,
            temperature=d.temperature if self.temperature is None else self.temperature,
            top_p=d.top_p if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            stop=self.stop if isinstance(self.stop, list) else [],
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
        )


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
