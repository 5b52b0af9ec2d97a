"""llama.cpp through llama-cpp-python: a GGUF file, its own chat template, one generation at a time."""

from __future__ import annotations

import codecs
import logging
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from engines.base import ContextLengthExceeded, EngineError, FinishReason, GenerationRequest, Output
from engines.stops import StopMatcher

logger = logging.getLogger(__name__)


class LlamaCppEngine:
    name = "llamacpp"

    def __init__(self, model_path: Path, n_ctx: int, n_threads: int | None = None) -> None:
        if not Path(model_path).is_file():
            raise EngineError(f"GGUF file not found: {model_path}")
        self._llm = llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_threads=n_threads or os.cpu_count(),
            verbose=False,
        )
        self._n_ctx = self._llm.n_ctx()
        self._formatter = self._chat_formatter()
        # One Llama object is not thread-safe; generations on it are serialised.
        self._lock = threading.Lock()
        self._aborted: set[str] = set()

    def _chat_formatter(self) -> Jinja2ChatFormatter | None:
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        model = self._llm._model

        def text(token: int) -> str:
            return model.token_get_text(token) if token != -1 else ""

        return Jinja2ChatFormatter(
            template=template, eos_token=text(self._llm.token_eos()), bos_token=text(self._llm.token_bos())
        )

    def _prompt_tokens(self, request: GenerationRequest) -> list[int]:
        if self._formatter is None:
            # No chat template (a base model): the messages are joined as plain text.
            prompt, added_special = "\n".join(m["content"] for m in request.messages), False
        else:
            formatted = self._formatter(messages=request.messages)  # type: ignore[arg-type]
            prompt, added_special = formatted.prompt, bool(formatted.added_special)
        # add_bos=True still honours the GGUF's own add_bos_token flag inside llama.cpp.
        tokens: list[int] = self._llm.tokenize(prompt.encode(), add_bos=not added_special, special=True)
        return tokens

    def generate(self, request: GenerationRequest) -> Iterator[Output]:
        with self._lock:
            try:
                yield from self._generate_locked(request)
            finally:
                self._aborted.discard(request.request_id)

    def _generate_locked(self, request: GenerationRequest) -> Iterator[Output]:
        llm = self._llm
        prompt = self._prompt_tokens(request)
        if len(prompt) >= self._n_ctx:
            raise ContextLengthExceeded(len(prompt), self._n_ctx)
        max_tokens = min(request.max_tokens, self._n_ctx - len(prompt))
        yield Output(prompt_tokens=len(prompt))

        llm.set_seed(request.seed if request.seed is not None else random.randrange(2**31))
        vocab = llm._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(request.stop)
        produced = 0
        finish: FinishReason = "length"
        for token in llm.generate(
            prompt,
            top_k=request.top_k,
            top_p=request.top_p,
            min_p=request.min_p,
            temp=request.temperature,
            repeat_penalty=1.0,
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty,
        ):
            produced += 1
            if request.request_id in self._aborted:
                finish = "cancelled"
                break
            if llama_cpp.llama_vocab_is_eog(vocab, token) and not request.ignore_eos:
                finish = "stop"
                break
            text = stops.push(decoder.decode(llm.detokenize([token])))
            if stops.stopped:
                finish = "stop"
            if text or stops.stopped:
                yield Output(text=text, prompt_tokens=len(prompt), completion_tokens=produced)
            if stops.stopped:
                break
            if produced >= max_tokens:
                break
        tail = "" if stops.stopped else stops.flush() + decoder.decode(b"", final=True)
        yield Output(
            text=tail,
            prompt_tokens=len(prompt),
            completion_tokens=produced,
            finish_reason=finish,
        )

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    def health(self) -> bool:
        return self._llm is not None

    def close(self) -> None:
        self._llm.close()
