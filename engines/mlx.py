"""MLX through mlx_lm: a Hugging Face (or MLX) folder, its chat template, one generation at a time.

Metal on Apple silicon; on Linux ``mlx[cpu]`` runs the same code slowly (5-13 tokens/s for SmolLM2-135M). The
loop is mlx_lm's ``generate_step`` (what ``stream_generate`` drives) so that end of sequence, ``ignore_eos``,
stop strings and aborts are decided here, token by token, as the llama.cpp adapter does.

One prompt cache (mlx_lm's per-layer KV cache) lives from one generation to the next with the tokens it holds:
a prompt that starts with them is evaluated from where they end, after the cache is trimmed to the prefix
they share (what ``mlx_lm.server`` does with the caches it keeps).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from engines.base import (
    CacheStats,
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
# The tokens before it that mlx_lm's presence and frequency penalties look at (make_logits_processors'
# default context size). generate_step gives them the prompt tokens it evaluates, so a request with penalties
# evaluates at least this many again: it sees the same history whether its prefix was cached or not.
PENALTY_CONTEXT = 20


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
        # The prompt cache and the tokens whose keys and values it holds, in order; used under the lock.
        self._cache: list[Any] = make_prompt_cache(self._model)
        self._held: list[int] = []
        # What cache_stats() answers, replaced after each generation (read without the lock).
        self._stats = CacheStats(entries=0, bytes=0)

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        tok = self._tokenizer
        if request.prompt is not None:
            return list(tok.encode(request.prompt + request.continuation))  # /v1/completions: the raw text
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
            return list(tok.encode(text + request.continuation, add_special_tokens=False))
        # No chat template (a base model): the messages are joined as plain text.
        return list(tok.encode("\n".join(m["content"] for m in request.messages) + request.continuation))

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
        processors = make_logits_processors(
            presence_penalty=request.presence_penalty or None,
            frequency_penalty=request.frequency_penalty or None,
        )
        if request.seed is None:
            cached = self._reuse(prompt, len(prompt) - (PENALTY_CONTEXT if processors else 1))
        else:
            # A prompt evaluated from a cached prefix is evaluated in other pieces, and the logits differ in
            # the last bits: enough to change a sampled token. A seeded request promises the same output, so
            # it starts from an empty cache (as llama.cpp resets its context).
            cached = self._reuse(prompt, 0)
        yield Output(prompt_tokens=len(prompt), cached_tokens=cached)

        mx.random.seed(request.seed if request.seed is not None else random.randrange(2**31))
        sampler = make_sampler(
            temp=request.temperature,
            top_p=request.top_p if request.top_p < 1.0 else 0.0,  # 0: off
            min_p=request.min_p,
            top_k=max(request.top_k, 0),
        )
        steps = generate_step(
            mx.array(prompt[cached:]),
            self._model,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=processors,
            prompt_cache=self._cache,
        )
        # generate_step feeds each token it yields to the model before yielding it (it computes the next one
        # ahead): after the n-th, the cache holds the prompt and n tokens, wherever the loop stops.
        fed: list[int] = []
        try:
            yield from self._sample(request, prompt, cached, steps, fed, max_tokens)
        except GeneratorExit:
            self._keep(prompt + fed)  # the caller closed the stream: the cache is whole
            raise
        except BaseException:
            self._keep([])  # failed in the middle of an evaluation, perhaps: nothing in it is trusted
            raise
        else:
            self._keep(prompt + fed)
        finally:
            steps.close()

    def _sample(
        self,
        request: GenerationRequest,
        prompt: list[int],
        cached: int,
        steps: Generator[tuple[Any, mx.array], None, None],
        fed: list[int],
        max_tokens: int,
    ) -> Iterator[Output]:
        tok = self._tokenizer
        eos = set(tok.eos_token_ids)
        decoder = _IncrementalDecoder(tok)
        stops = StopMatcher(request.stop)
        produced = 0
        finish: FinishReason = "length"
        for token, token_logprobs in steps:
            token_id = int(token)
            fed.append(token_id)
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
                    text=text,
                    prompt_tokens=len(prompt),
                    cached_tokens=cached,
                    completion_tokens=produced,
                    logprobs=logprobs,
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
            cached_tokens=cached,
            completion_tokens=produced,
            finish_reason=finish,
            stop_sequence=stops.matched,
        )

    def _reuse(self, prompt: list[int], limit: int) -> int:
        """Trim the cache to the prefix its tokens share with ``prompt`` (at most ``limit`` tokens; the last
        one is always evaluated again, for fresh logits) and return its length; an empty cache when none is
        shared or the cache cannot be trimmed (a rotating one that wrapped, a recurrent layer's)."""
        same = 0
        for held, new in zip(self._held, prompt[: max(limit, 0)], strict=False):
            if held != new:
                break
            same += 1
        excess = len(self._held) - same
        trimmable = not excess or can_trim_prompt_cache(self._cache)
        if same and trimmable and trim_prompt_cache(self._cache, excess) == excess:
            del self._held[same:]
        else:
            self._keep([])
        return len(self._held)

    def _keep(self, held: list[int]) -> None:
        """Record what the cache holds after a generation (nothing: start the next one afresh)."""
        offset = getattr(self._cache[0], "offset", len(held)) if self._cache else len(held)
        if held and offset != len(held):
            # What the cache holds is not what we counted: never reuse it.
            logger.warning("the MLX prompt cache holds %d tokens, not %d: dropped", offset, len(held))
            held = []
        if not held:
            self._cache = make_prompt_cache(self._model)
        self._held = held
        nbytes = sum(c.nbytes for c in self._cache)
        self._stats = CacheStats(entries=1 if held else 0, bytes=nbytes if held else 0)

    def cache_stats(self) -> CacheStats:
        """Entries: 1 while the prompt cache holds a generation's tokens. Bytes: its key and value arrays as
        allocated (in steps of 256 tokens)."""
        return self._stats

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
        self._cache, self._held = [], []
