"""The engine interface every adapter implements, and the neutral data that crosses it.

Engines import nothing of inferq's: the worker converts a queued job into a ``GenerationRequest``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    # A chat (rendered with the model's chat template) unless ``prompt`` is set: then the raw text.
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
    prompt: str | None = None
    # Constrain the output to JSON valid for this schema; ``{}`` means any JSON object. An engine without
    # constrained decoding must refuse the request rather than ignore this.
    json_schema: dict[str, Any] | None = None
    # Report the log-probability of each generated token and of this many alternatives; None: none.
    logprobs: int | None = None
    # The answer's start, generated elsewhere (a stream that moved here from a worker that died or was
    # drained): the prompt ends with it, and the output continues it.
    continuation: str = ""


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


# Prompt tokens an engine evaluates between two looks at whether it was aborted. On one CPU thread SmolLM2
# evaluates ~170 prompt tokens a second, in one call or 16 at a time alike (8 at a time: 10-15% slower): a job
# asked for its slot gives it up within ~0.1 s of prefill, not after the whole prompt (0.5 s at 90 tokens).
PREFILL_CHUNK_TOKENS = 16


@dataclass
class Output:
    """One step of a generation. The first output of every stream has no text: it says the prompt was
    accepted and how many tokens it has; the last one carries ``finish_reason``. Between the first and the
    first token an engine may send more outputs without text, one per ``PREFILL_CHUNK_TOKENS`` of the prompt
    it evaluated: its reader gets a turn to ``abort`` it there (a cancel, a slot wanted by a higher class)
    rather than after the whole prompt."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Of the prompt's tokens, those the engine did not evaluate again: it held their KV state already.
    cached_tokens: int = 0
    finish_reason: FinishReason | None = None
    # The tokens produced in this step, when the request asked for logprobs.
    logprobs: list[TokenLogprob] | None = None
    # On the last output: the stop string of the request that ended the generation, if one did.
    stop_sequence: str | None = None


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


class EngineError(Exception):
    """A generation failed inside the engine."""


class UnsupportedRequest(EngineError):
    """The engine cannot honour a field of the request (answered as a 400, never silently ignored)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


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
        """Stream the generation; raises ContextLengthExceeded before the first output. A caller that stops
        reading before the end must ``close()`` the iterator: until then an engine that serialises its
        generations (llama.cpp, MLX) holds its lock, and vLLM keeps the sequence in its batch."""
        ...

    def abort(self, request_id: str) -> None:
        """Ask a running generation to stop; it then finishes with ``finish_reason="cancelled"``."""
        ...

    def health(self) -> bool: ...

    def close(self) -> None: ...


@runtime_checkable
class Embedder(Protocol):
    """An engine that can also embed text: an optional capability, checked with ``isinstance``."""

    def embed(self, inputs: list[str] | list[list[int]]) -> Embeddings:
        """One vector per input (normalised); raises ContextLengthExceeded for an input that does not fit."""
        ...


@dataclass(frozen=True)
class CacheStats:
    """What an engine holds of earlier prompts' KV state, for routing and the workers' page."""

    # Prompt prefixes held (each engine says what it counts as one).
    entries: int
    # Memory those entries take beyond what the engine holds anyway (its context, its model).
    bytes: int


@runtime_checkable
class PrefixCacheHolder(Protocol):
    """An engine that keeps earlier prompts' KV state and serves a prompt sharing their prefix from it
    (an optional capability, checked with ``isinstance``)."""

    def cache_stats(self) -> CacheStats:
        """What the engine holds now. Cheap and safe from any thread: it never waits for a generation."""
        ...


@runtime_checkable
class TokenCounter(Protocol):
    """An engine that counts a request's prompt tokens without generating (an optional capability)."""

    def count_tokens(self, request: GenerationRequest) -> int:
        """The prompt's length in tokens, as ``generate`` would evaluate it."""
        ...
