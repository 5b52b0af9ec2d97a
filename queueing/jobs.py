"""What the API puts on a queue: one job, engine-neutral. ``kind`` says what the worker does with it."""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ChatMessage(BaseModel):
    role: str
    content: str


class Sampling(BaseModel):
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: list[str] = []
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    # Output constrained to JSON valid for this schema ({} = any JSON object); engines map it to their own
    # mechanism (a GBNF grammar on llama.cpp).
    json_schema: dict[str, Any] | None = None
    # Number of most likely alternatives to report per generated token; None = no logprobs at all.
    logprobs: int | None = None


# count: only the prompt's token count, with the model's own tokenizer (the API never loads one).
JobKind = Literal["chat", "completion", "embedding", "count"]
# The class a job queues in (its band of steps: queueing/bands.py): high, interactive (the "normal" class,
# every request's by default), low, then batch lines. Kept on the job so that a re-queue after a worker died
# keeps it.
Priority = Literal["high", "interactive", "low", "batch"]
# A job's key's fair share when it was queued (api/fairness.py).
Share = Literal["within", "queued", "over"]
# From the one served first to the one served last.
PRIORITY_ORDER: tuple[Priority, ...] = ("high", "interactive", "low", "batch")


class Job(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    kind: JobKind = "chat"
    model: str
    # chat: the conversation, already rendered to plain role/content pairs (tools included) by the API.
    messages: list[ChatMessage] = []
    # completion: the raw prompt, no chat template.
    prompt: str | None = None
    # embedding: the inputs, as text or as token ids.
    inputs: list[str] | list[list[int]] = []
    sampling: Sampling = Field(default_factory=Sampling)
    stream: bool = False
    priority: Priority = "interactive"
    # Its key's share of the model when it was queued (api/fairness.py): within it; over its split of the
    # workers' slots ("queued": it waits behind the class's other keys); over its share of the tokens
    # ("over": it waits behind them, and a stream gives its slot up to them at any point; queueing/bands.py).
    share: Share = "within"
    # A batch line: when its batch expires (epoch seconds); lines with less time left go first.
    deadline: float | None = None
    # Bumped each time the job is re-queued after its worker died; a delivery whose attempt is not the
    # job's current one is stale and is dropped, which deduplicates broker redeliveries.
    attempt: int = 1
    # An explicit conversation id (OpenAI's `prompt_cache_key`, or a session header): `affinity` routing
    # sends the session's turns to the worker that served it last, whose engine still holds its prefix.
    session: str | None = None
    # The W3C trace context (traceparent, tracestate) of the API's request span, so that the worker's spans
    # join the request's trace (queueing/tracing.py); None when the API does not trace. Re-queued attempts
    # keep it, so a failover shows in the same trace.
    trace_context: dict[str, str] | None = None
