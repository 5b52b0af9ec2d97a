"""MLX through mlx_lm: a Hugging Face (or MLX) folder, its chat template, one generation at a time.

Metal on Apple silicon; on Linux ``mlx[cpu]`` runs the same code slowly (5-13 tokens/s for SmolLM2-135M). The
loop is mlx_lm's ``generate_step`` (what ``stream_generate`` drives) so that end of sequence, ``ignore_eos``,
stop strings and aborts are decided here, token by token, as the llama.cpp adapter does.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from engines.base import (
    ContextLengthExceeded,
    EngineError,
    FinishReason,
    GenerationRequest,
    Output,
    TokenLogprob,
    UnsupportedRequest,
)
from engines.stops import StopMatcher

logger = logging.getLogger(__name__)


class _IncrementalDecoder:
    """Text for each new token, decoded in the context of the tokens before it (a token can be half a UTF-8
    character, or a piece whose spacing depends on its neighbour). mlx_lm's streaming detokenizer drops the
    leading space of a generation, which a raw completion (" Paris") must keep."""

    def __init__(self, tokenizer: Any) -> None:
        self._decode = tokenizer.decode
        self._ids: list[int] = []
        self._prefix = 0  # decoding starts here, so the first new piece has context
        self._read = 0  # text up to here has been released

    def add(self, token: int) -> str:
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        self._prefix, self._read = self._read, len(self._ids)
        return str(text[len(before) :])

    def flush(self) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._read = len(self._ids)
        return str(text[len(before) :])


class MlxEngine:
    name = "mlx"

    def __init__(self, model_path: Path, n_ctx: int, n_threads: int | None = None, **options: Any) -> None:
        if not (Path(model_path) / "config.json").is_file():
            raise EngineError(f"not a model folder: {model_path} (run `inferq models prepare`)")
        self._model, self._tokenizer = load(str(model_path), **options)
        self._n_ctx = n_ctx
        # One model's generation state is not shared between threads: generations are serialised.
        self._lock = threading.Lock()
        self._aborted: set[str] = set()

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        tok = self._tokenizer
        if request.prompt is not None:
            return list(tok.encode(request.prompt))  # /v1/completions: the raw text
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
            return list(tok.encode(text, add_special_tokens=False))
        # No chat template (a base model): the messages are joined as plain text.
        return list(tok.encode("\n".join(m["content"] for m in request.messages)))

    def generate(self, request: GenerationRequest) -> Iterator[Output]:
        with self._lock:
            try:
                yield from self._generate_locked(request)
            finally:
                self._aborted.discard(request.request_id)

    def _generate_locked(self, request: GenerationRequest) -> Iterator[Output]:
        if request.json_schema is not None:
            raise UnsupportedRequest("The mlx engine cannot constrain its output.", "response_format")
        prompt = self._prompt_ids(request)
        if not prompt:
            raise UnsupportedRequest("The prompt is empty.", "prompt")
        if len(prompt) >= self._n_ctx:
            raise ContextLengthExceeded(len(prompt), self._n_ctx)
        max_tokens = min(request.max_tokens, self._n_ctx - len(prompt))
        yield Output(prompt_tokens=len(prompt))

        mx.random.seed(request.seed if request.seed is not None else random.randrange(2**31))
        sampler = make_sampler(
            temp=request.temperature,
            top_p=request.top_p if request.top_p < 1.0 else 0.0,  # 0: off
            min_p=request.min_p,
            top_k=max(request.top_k, 0),
        )
        processors = make_logits_processors(
            presence_penalty=request.presence_penalty or None,
            frequency_penalty=request.frequency_penalty or None,
        )
        tok = self._tokenizer
        eos = set(tok.eos_token_ids)
        decoder = _IncrementalDecoder(tok)
        stops = StopMatcher(request.stop)
        produced = 0
        finish: FinishReason = "length"
        steps = generate_step(
            mx.array(prompt),
            self._model,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=processors,
        )
        for token, token_logprobs in steps:
            token_id = int(token)
            produced += 1
            if request.request_id in self._aborted:
                finish = "cancelled"
                break
            if token_id in eos and not request.ignore_eos:
                finish = "stop"
                break
            text = stops.push(decoder.add(token_id))
            if stops.stopped:
                finish = "stop"
            logprobs = None
            if request.logprobs is not None:
                logprobs = [self._logprob(token_id, token_logprobs, request.logprobs)]
            if text or stops.stopped or logprobs:
                yield Output(
                    text=text, prompt_tokens=len(prompt), completion_tokens=produced, logprobs=logprobs
                )
            if stops.stopped or produced >= max_tokens:
                break
        tail = ""
        if not stops.stopped:
            tail = stops.push(decoder.flush())
            if stops.stopped:
                finish = "stop"
            else:
                tail += stops.flush()
        yield Output(
            text=tail,
            prompt_tokens=len(prompt),
            completion_tokens=produced,
            finish_reason=finish,
            stop_sequence=stops.matched,
        )

    def _logprob(self, token: int, logprobs: mx.array, top: int) -> TokenLogprob:
        """generate_step yields each token with the log-probabilities over the vocabulary it came from."""
        values = np.array(logprobs.astype(mx.float32)).reshape(-1)
        best = np.argpartition(-values, top)[:top] if top else np.array([], dtype=np.int64)
        best = best[np.argsort(-values[best])]
        decode = self._tokenizer.decode
        return TokenLogprob(
            token=decode([token]),
            logprob=float(values[token]),
            top=[(decode([int(t)]), float(values[t])) for t in best],
        )

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    def health(self) -> bool:
        return self._model is not None

    def close(self) -> None:
        self._model = None
