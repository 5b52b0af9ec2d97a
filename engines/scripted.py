"""A scripted engine: fixed text at a fixed speed, no model. For fault injection and for measuring what the
queue and the API cost without an engine competing for the CPU. Never a stand-in in end-to-end tests."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from engines.base import (
    PREFILL_CHUNK_TOKENS,
    CacheStats,
    ContextLengthExceeded,
    GenerationRequest,
    Output,
    TokenLogprob,
    UnsupportedRequest,
)

WORDS = ("the quick brown fox jumps over the lazy dog by the sea " * 2).split()
# Test-only: a file to which every generation this engine starts appends one line, its request id, so a test
# can count how often a job reached the engine (a stale or duplicate delivery must never reach it).
CALL_LOG_ENV = "INFERQ_SCRIPTED_CALL_LOG"
# Seconds each prompt token the simulated prefix cache does not hold costs before the first word, so that
# routing by cache shows in the time to first token; 0 (the default): no prefill time at all.
PREFILL_ENV = "INFERQ_SCRIPTED_PREFILL_SECONDS_PER_TOKEN"
# Recent prompts the simulated prefix cache holds, least recently used dropped first.
HELD_PROMPTS = 64


class ScriptedEngine:
    name = "scripted"

    def __init__(self, model_path: Path, n_ctx: int, n_threads: int | None = None) -> None:
        # Speed comes from the environment so several workers of one machine can differ.
        self._seconds_per_token = 1.0 / float(os.environ.get("INFERQ_SCRIPTED_TOKENS_PER_SECOND", "1000"))
        self._n_ctx = n_ctx
        self._prefill_seconds_per_token = float(os.environ.get(PREFILL_ENV, "0"))
        self._aborted: set[str] = set()
        # The prompts held, as their words (the script's tokens), with their text's length; guarded by the
        # lock: generations of several worker threads share it.
        self._held: OrderedDict[tuple[str, ...], int] = OrderedDict()
        self._lock = threading.Lock()

    def generate(self, request: GenerationRequest) -> Iterator[Output]:
        _log_call(request.request_id)
        if request.json_schema is not None:
            raise UnsupportedRequest("The scripted engine cannot constrain its output.", "response_format")
        tokens = _tokens(request)
        prompt = len(tokens)
        if prompt >= self._n_ctx:
            raise ContextLengthExceeded(prompt, self._n_ctx)
        cached = self._hold(tokens)
        yield Output(prompt_tokens=prompt, cached_tokens=cached)
        # A continued answer (a stream moved here) goes on with the script's next word.
        skip, produced, finish = len(request.continuation.split()), 0, "length"
        # The prompt's evaluation in pieces, each followed by an empty output, as the llama.cpp engine's.
        evaluated = cached
        while self._prefill_seconds_per_token and evaluated < prompt:
            piece = min(PREFILL_CHUNK_TOKENS, prompt - evaluated)
            time.sleep(self._prefill_seconds_per_token * piece)
            evaluated += piece
            if request.request_id in self._aborted:
                self._aborted.discard(request.request_id)
                finish = "cancelled"
                break
            if evaluated < prompt:
                yield Output(prompt_tokens=prompt, cached_tokens=cached)
        next_at = time.monotonic()
        while finish != "cancelled" and produced < min(request.max_tokens, self._n_ctx - prompt):
            next_at += self._seconds_per_token
            if (wait := next_at - time.monotonic()) > 0:
                time.sleep(wait)
            if request.request_id in self._aborted:
                self._aborted.discard(request.request_id)
                finish = "cancelled"
                break
            produced += 1
            word = " " + WORDS[(skip + produced) % len(WORDS)]
            # The script is certain of every word: probability 1.
            logprobs = None if request.logprobs is None else [TokenLogprob(word, 0.0)]
            yield Output(
                text=word,
                prompt_tokens=prompt,
                cached_tokens=cached,
                completion_tokens=produced,
                logprobs=logprobs,
            )
        yield Output(
            prompt_tokens=prompt,
            cached_tokens=cached,
            completion_tokens=produced,
            finish_reason=finish,  # type: ignore[arg-type]
        )

    def _hold(self, tokens: tuple[str, ...]) -> int:
        """The prompt's tokens a real engine would take from its prefix cache (the longest prefix shared with
        a held prompt, less the last token, which engines evaluate again for fresh logits); then holds it."""
        with self._lock:
            same = max((_shared(held, tokens) for held in self._held), default=0)
            self._held[tokens] = len(" ".join(tokens))
            self._held.move_to_end(tokens)
            while len(self._held) > HELD_PROMPTS:
                self._held.popitem(last=False)
        return max(0, min(same, len(tokens) - 1))

    def cache_stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(entries=len(self._held), bytes=sum(self._held.values()))

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    def health(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _tokens(request: GenerationRequest) -> tuple[str, ...]:
    """The script's tokens of a prompt: its words, plus one token to start a raw prompt and four to frame
    each message (what a chat template adds), the counts this engine has always reported."""
    if request.prompt is not None:
        return ("<s>", *request.prompt.split(), *request.continuation.split())
    tokens: list[str] = []
    for m in request.messages:
        tokens += ["<|im_start|>", m["role"], "\n", *m["content"].split(), "<|im_end|>"]
    return (*tokens, *request.continuation.split())


def _shared(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _log_call(request_id: str) -> None:
    path = os.environ.get(CALL_LOG_ENV)
    if path:
        # One short write to a file opened for appending: lines of concurrent generations never interleave.
        with open(path, "a") as log:
            log.write(request_id + "\n")
