"""What the API puts on a queue: one generation job, engine-neutral."""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Literal

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
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int = 0
    min_p: float = 0.0
    stop: list[str] = []
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False


class Job(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    kind: Literal["chat"] = "chat"
    model: str
    messages: list[ChatMessage]
    sampling: Sampling
    stream: bool = False
    # Bumped each time the job is re-queued after its worker died; a delivery whose attempt is not the
    # job's current one is stale and is dropped, which deduplicates broker redeliveries.
    attempt: int = 1
