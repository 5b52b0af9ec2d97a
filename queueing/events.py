"""Typed events a worker publishes on a request's pub/sub channel; the API only relays them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter


class Started(BaseModel):
    type: Literal["started"] = "started"
    attempt: int
    worker: str
    prompt_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    top: list[TopLogprob] = []


class Delta(BaseModel):
    type: Literal["delta"] = "delta"
    attempt: int
    text: str
    # Present only when the job asked for logprobs: the tokens behind this text.
    logprobs: list[TokenLogprob] | None = None


class Finished(BaseModel):
    type: Literal["finished"] = "finished"
    attempt: int
    finish_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    completion_tokens: int
    # The whole completion, for non-streamed jobs (they publish no deltas).
    text: str | None = None
    logprobs: list[TokenLogprob] | None = None
    # Embedding jobs: one vector per input.
    embeddings: list[list[float]] | None = None


class Failed(BaseModel):
    """A job that cannot be served; carries the OpenAI error fields and the HTTP status to answer with."""

    type: Literal["error"] = "error"
    attempt: int
    status: int
    message: str
    error_type: str
    code: str | None = None
    param: str | None = None


AnyEvent = Started | Delta | Finished | Failed
Event = Annotated[AnyEvent, Field(discriminator="type")]
event_adapter: TypeAdapter[Event] = TypeAdapter(Event)


def encode(event: AnyEvent) -> str:
    return event.model_dump_json()


def decode(raw: str | bytes) -> Event:
    return event_adapter.validate_json(raw)
