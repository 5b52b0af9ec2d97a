"""Typed events a worker publishes on a request's pub/sub channel; the API only relays them."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter


class Started(BaseModel):
    type: Literal["started"] = "started"
    attempt: int
    worker: str
    prompt_tokens: int
    # Characters of the answer this attempt continues (a stream that moved here from a worker that died or
    # was drained): its deltas follow that text, which earlier attempts sent.
    continues: int = 0
    # When the worker claimed the job (epoch seconds, the worker's clock): the end of its queue wait.
    claimed_at: float | None = None


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
    # Tokens behind this text (a worker sends several at once when they come faster than it publishes): the
    # API spreads the gap since the previous delta over them (inter-token latency).
    tokens: int = 1


class Finished(BaseModel):
    type: Literal["finished"] = "finished"
    attempt: int
    finish_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens the engine took from its prefix cache instead of evaluating them.
    cached_tokens: int = 0
    # The request's stop string that ended the output (finish_reason "stop"), if one did.
    stop_sequence: str | None = None
    # The whole completion, for non-streamed jobs (they publish no deltas).
    text: str | None = None
    logprobs: list[TokenLogprob] | None = None
    # Embedding jobs: one vector per input.
    embeddings: list[list[float]] | None = None


class ErrorCode(StrEnum):
    """Why a worker could not serve a job: a domain code, mapped to a status and an envelope once per
    protocol in the API (api/errors.py), never a wire shape of one protocol."""

    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    UNSUPPORTED_VALUE = "unsupported_value"
    MODEL_NOT_LOADED = "model_not_loaded"
    INTERNAL = "internal_error"


class Failed(BaseModel):
    """A job that cannot be served: its domain code, a message for the client, the request field at fault."""

    type: Literal["error"] = "error"
    attempt: int
    code: ErrorCode
    message: str
    param: str | None = None


AnyEvent = Started | Delta | Finished | Failed
Event = Annotated[AnyEvent, Field(discriminator="type")]
event_adapter: TypeAdapter[Event] = TypeAdapter(Event)


def encode(event: AnyEvent) -> str:
    return event.model_dump_json()


def decode(raw: str | bytes) -> Event:
    return event_adapter.validate_json(raw)
