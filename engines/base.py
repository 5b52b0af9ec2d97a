"""The engine interface every adapter implements, and the neutral data that crosses it.

Engines import nothing of inferq's: the worker converts a queued job into a ``GenerationRequest``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False


@dataclass
class Output:
    """One step of a generation. The first output of every stream has no text: it says the prompt was
    accepted and how many tokens it has; the last one carries ``finish_reason``."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None


class EngineError(Exception):
    """A generation failed inside the engine."""


class ContextLengthExceeded(EngineError):
    def __init__(self, prompt_tokens: int, limit: int) -> None:
        super().__init__(
            f"This model's maximum context length is {limit} tokens; the prompt has {prompt_tokens} tokens."
        )
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class Engine(Protocol):
    name: str

    def generate(self, request: GenerationRequest) -> Iterator[Output]:
        """Stream the generation; raises ContextLengthExceeded before the first output."""
        ...

    def abort(self, request_id: str) -> None:
        """Ask a running generation to stop; it then finishes with ``finish_reason="cancelled"``."""
        ...

    def health(self) -> bool: ...

    def close(self) -> None: ...
