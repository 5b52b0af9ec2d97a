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
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from engines.base import ContextLengthExceeded, EngineError, FinishReason, GenerationRequest, Output
from engines.stops import StopMatcher

logger = logging.getLogger(__name__)


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
        prompt = self._prompt_ids(request)
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
        detokenizer = tok.detokenizer
        detokenizer.reset()
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
        for token, _ in steps:
            token_id = int(token)
            produced += 1
            if request.request_id in self._aborted:
                finish = "cancelled"
                break
            if token_id in eos and not request.ignore_eos:
                finish = "stop"
                break
            detokenizer.add_token(token_id)
            text = stops.push(detokenizer.last_segment)
            if stops.stopped:
                finish = "stop"
            if text or stops.stopped:
                yield Output(text=text, prompt_tokens=len(prompt), completion_tokens=produced)
            if stops.stopped or produced >= max_tokens:
                break
        tail = ""
        if not stops.stopped:
            detokenizer.finalize()
            tail = stops.push(detokenizer.last_segment)
            if stops.stopped:
                finish = "stop"
            else:
                tail += stops.flush()
        yield Output(text=tail, prompt_tokens=len(prompt), completion_tokens=produced, finish_reason=finish)

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    def health(self) -> bool:
        return self._model is not None

    def close(self) -> None:
        self._model = None
