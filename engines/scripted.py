"""A scripted engine: fixed text at a fixed speed, no model. For fault injection and for measuring what the
queue and the API cost without an engine competing for the CPU. Never a stand-in in end-to-end tests."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from engines.base import ContextLengthExceeded, GenerationRequest, Output, TokenLogprob, UnsupportedRequest

WORDS = ("the quick brown fox jumps over the lazy dog by the sea " * 2).split()
# Test-only: a file to which every generation this engine starts appends one line, its request id, so a test
# can count how often a job reached the engine (a stale or duplicate delivery must never reach it).
CALL_LOG_ENV = "INFERQ_SCRIPTED_CALL_LOG"


class ScriptedEngine:
    name = "scripted"

    def __init__(self, model_path: Path, n_ctx: int, n_threads: int | None = None) -> None:
        # Speed comes from the environment so several workers of one machine can differ.
        self._seconds_per_token = 1.0 / float(os.environ.get("INFERQ_SCRIPTED_TOKENS_PER_SECOND", "1000"))
        self._n_ctx = n_ctx
        self._aborted: set[str] = set()
        self._lock = threading.Lock()

    def generate(self, request: GenerationRequest) -> Iterator[Output]:
        _log_call(request.request_id)
        if request.json_schema is not None:
            raise UnsupportedRequest("The scripted engine cannot constrain its output.", "response_format")
        if request.prompt is not None:
            prompt = len(request.prompt.split()) + 1
        else:
            prompt = sum(len(m["content"].split()) + 4 for m in request.messages)
        if prompt >= self._n_ctx:
            raise ContextLengthExceeded(prompt, self._n_ctx)
        yield Output(prompt_tokens=prompt)
        produced, finish = 0, "length"
        next_at = time.monotonic()
        while produced < min(request.max_tokens, self._n_ctx - prompt):
            next_at += self._seconds_per_token
            time.sleep(max(0.0, next_at - time.monotonic()))
            if request.request_id in self._aborted:
                self._aborted.discard(request.request_id)
                finish = "cancelled"
                break
            produced += 1
            word = " " + WORDS[produced % len(WORDS)]
            # The script is certain of every word: probability 1.
            logprobs = None if request.logprobs is None else [TokenLogprob(word, 0.0)]
            yield Output(text=word, prompt_tokens=prompt, completion_tokens=produced, logprobs=logprobs)
        yield Output(prompt_tokens=prompt, completion_tokens=produced, finish_reason=finish)  # type: ignore[arg-type]

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    def health(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _log_call(request_id: str) -> None:
    path = os.environ.get(CALL_LOG_ENV)
    if path:
        # One short write to a file opened for appending: lines of concurrent generations never interleave.
        with open(path, "a") as log:
            log.write(request_id + "\n")
