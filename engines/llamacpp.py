"""llama.cpp through llama-cpp-python: a GGUF file, its own chat template, one generation at a time.

Prompt prefixes are reused from two places: the context itself (the tokens of its last generation, which
``Llama.generate`` keeps when the next prompt starts with them) and a RAM cache of the KV state of recent
generations (llama-cpp-python's ``LlamaRAMCache``), loaded into the context when it holds a longer prefix of
the prompt: a conversation whose turns alternate with other requests still finds its history there.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import random
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import cast

import jinja2
import llama_cpp
import numpy as np
from llama_cpp.llama_cache import LlamaRAMCache
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import LlamaGrammar

from engines.base import (
    PREFILL_CHUNK_TOKENS,
    CacheStats,
    ContextLengthExceeded,
    Embeddings,
    EngineError,
    FinishReason,
    GenerationRequest,
    Output,
    TokenLogprob,
    UnsupportedRequest,
)
from engines.grammar import grammar_for
from engines.stops import StopMatcher

logger = logging.getLogger(__name__)


class LlamaCppEngine:
    name = "llamacpp"

    def __init__(
        self, model_path: Path, n_ctx: int, n_threads: int | None = None, cache_mib: int = 256
    ) -> None:
        if not Path(model_path).is_file():
            raise EngineError(f"GGUF file not found: {model_path}")
        if cache_mib < 0:
            raise EngineError(f"cache_mib must be 0 (no prefix cache) or more, not {cache_mib}")
        self._model_path = model_path
        self._n_threads = n_threads or os.cpu_count()
        # n_threads_batch too: llama-cpp-python defaults it to every core, so prompt evaluation ignored the
        # thread setting, and workers sharing a machine oversubscribed it (spinning ggml threads then stall
        # each other for seconds).
        self._llm = llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_threads=self._n_threads,
            n_threads_batch=self._n_threads,
            verbose=False,
        )
        self._n_ctx = self._llm.n_ctx()
        # llama.cpp embeds only with a context created for it; made on the first embedding job, so a worker
        # that never embeds never pays its memory.
        self._embedder: llama_cpp.Llama | None = None
        self._embed_lock = threading.Lock()
        self._formatter = self._chat_formatter()
        # One Llama object is not thread-safe; generations on it are serialised. So is the state cache: it
        # is only used under this lock.
        self._lock = threading.Lock()
        self._aborted: set[str] = set()
        # Least recently used states go first once their llama.cpp state data exceeds the capacity.
        self._cache = LlamaRAMCache(cache_mib * 2**20) if cache_mib else None
        # What cache_stats() answers, replaced after each generation: read without the lock, so a
        # heartbeat never waits for a generation.
        self._stats = CacheStats(entries=0, bytes=0)
        # load_state writes a state's scores into the context's first n_tokens rows of scores; the states we
        # keep carry this one row of zeros instead (broadcast there; see _snapshot), shared by all of them.
        self._no_scores = np.zeros((1, self._llm.n_vocab()), dtype=np.single)

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
        if request.prompt is not None:
            whole = request.prompt + request.continuation
            raw: list[int] = self._llm.tokenize(whole.encode(), add_bos=True, special=True)
            return raw
        if self._formatter is None:
            # No chat template (a base model): the messages are joined as plain text.
            prompt, added_special = "\n".join(m["content"] for m in request.messages), False
        else:
            try:
                formatted = self._formatter(messages=request.messages)  # type: ignore[arg-type]
            except (jinja2.TemplateError, ValueError) as exc:
                # Templates refuse conversations they cannot render (roles out of order, a `tool` role):
                # through raise_exception (a ValueError in llama-cpp-python) or a template error.
                raise UnsupportedRequest(
                    f"The model's chat template refuses these messages: {exc}", "messages"
                ) from exc
            prompt, added_special = formatted.prompt, bool(formatted.added_special)
        prompt += request.continuation
        # add_bos=True still honours the GGUF's own add_bos_token flag inside llama.cpp.
        tokens: list[int] = self._llm.tokenize(prompt.encode(), add_bos=not added_special, special=True)
        return tokens

    def count_tokens(self, request: GenerationRequest) -> int:
        # Tokenizing reads the vocabulary only, so it needs no lock and never waits for a generation.
        return len(self._prompt_tokens(request))

    def generate(self, request: GenerationRequest) -> Iterator[Output]:
        with self._lock:
            try:
                yield from self._generate_locked(request)
            finally:
                self._aborted.discard(request.request_id)

    def _generate_locked(self, request: GenerationRequest) -> Iterator[Output]:
        llm = self._llm
        prompt = self._prompt_tokens(request)
        if not prompt:
            raise UnsupportedRequest("The prompt is empty.", "prompt")
        if len(prompt) >= self._n_ctx:
            raise ContextLengthExceeded(len(prompt), self._n_ctx)
        max_tokens = min(request.max_tokens, self._n_ctx - len(prompt))
        # Before the first output: a schema without a grammar is the client's error (400), not a stream error.
        grammar = None if request.json_schema is None else grammar_for(request.json_schema, llm._model.vocab)
        if request.seed is not None:
            # Reusing a cached prompt prefix evaluates the prompt in other batches, and the logits differ in
            # the last bits: enough to change a sampled token. A seeded request promises the same output, so
            # it evaluates its whole prompt (and loads no cached state); unseeded ones keep the prefix cache.
            llm.reset()  # type: ignore[no-untyped-call]
        else:
            self._load_longest_prefix(prompt)
        cached = _reused_prefix(llm, prompt)
        yield Output(prompt_tokens=len(prompt), cached_tokens=cached)
        if not (yield from self._prefill(request, prompt, cached)):
            yield Output(prompt_tokens=len(prompt), cached_tokens=cached, finish_reason="cancelled")
            return
        llm.set_seed(request.seed if request.seed is not None else random.randrange(2**31))
        try:
            yield from self._sample(request, prompt, cached, grammar, max_tokens)
        finally:
            # After the last output or the caller's close, so never before the first token. Once the prompt
            # was evaluated (seeded or not), the context holds it and the output but its last token.
            if llm.n_tokens >= len(prompt):
                self._save()

    def _prefill(
        self, request: GenerationRequest, prompt: list[int], cached: int
    ) -> Generator[Output, None, bool]:
        """Evaluate the prompt after its ``cached`` tokens, but its last, in pieces with an empty output after
        each: ``Llama.generate`` then finds them held and evaluates the last one only. Whether it was not
        aborted in between (False: the reader stopped it before its first token).

        A seeded request evaluates its whole prompt, from an empty context, in the same pieces every time, so
        its output stays the same."""
        llm = self._llm
        llm.n_tokens = cached
        end = len(prompt) - 1
        while llm.n_tokens < end:
            if request.request_id in self._aborted:
                return False
            llm.eval(prompt[llm.n_tokens : min(end, llm.n_tokens + PREFILL_CHUNK_TOKENS)])
            yield Output(prompt_tokens=len(prompt), cached_tokens=cached)
        return request.request_id not in self._aborted

    def _sample(
        self,
        request: GenerationRequest,
        prompt: list[int],
        cached: int,
        grammar: LlamaGrammar | None,
        max_tokens: int,
    ) -> Iterator[Output]:
        llm = self._llm
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
            grammar=grammar,
        ):
            produced += 1
            if request.request_id in self._aborted:
                finish = "cancelled"
                break
            if llama_cpp.llama_vocab_is_eog(vocab, token) and not request.ignore_eos:
                finish = "stop"
                break
            piece = llm.detokenize([token])
            logprobs = None if request.logprobs is None else [self._logprob(token, piece, request.logprobs)]
            text = stops.push(decoder.decode(piece))
            if stops.stopped:
                finish = "stop"
            if text or stops.stopped or logprobs:
                yield Output(
                    text=text,
                    prompt_tokens=len(prompt),
                    cached_tokens=cached,
                    completion_tokens=produced,
                    logprobs=logprobs,
                )
            if stops.stopped:
                break
            if produced >= max_tokens:
                break
        tail = "" if stops.stopped else stops.flush() + decoder.decode(b"", final=True)
        yield Output(
            text=tail,
            prompt_tokens=len(prompt),
            cached_tokens=cached,
            completion_tokens=produced,
            finish_reason=finish,
            stop_sequence=stops.matched,
        )

    def _load_longest_prefix(self, prompt: list[int]) -> None:
        """Load the cached state sharing the longest prefix with ``prompt`` when it is longer than the one
        the context holds (what ``Llama.create_completion`` does with its cache before generating)."""
        if self._cache is None:
            return
        try:
            state = self._cache[prompt]
        except KeyError:
            return  # no cached state shares even the first token
        llm = self._llm
        held = llama_cpp.Llama.longest_token_prefix(state.input_ids[: state.n_tokens].tolist(), prompt)
        if held > llama_cpp.Llama.longest_token_prefix(llm._input_ids.tolist(), prompt):
            llm.load_state(state)

    def _save(self) -> None:
        """Keep the context's state, keyed by the tokens it holds, and refresh the stats. A memcpy of the
        KV cells in use: ~23 KiB a token for SmolLM2-135M."""
        llm, cache = self._llm, self._cache
        held = tuple(llm._input_ids.tolist())
        if cache is not None:
            # A state extends the ones whose tokens it starts with, and serves every prompt they serve:
            # without this, each turn of a conversation would hold a copy of all the turns before it.
            for key in [k for k in cache.cache_state if len(k) <= len(held) and held[: len(k)] == k]:
                del cache.cache_state[key]
            started = time.perf_counter()
            cache[held] = self._snapshot()
            took = time.perf_counter() - started
            logger.debug("kept the state of %d tokens in %.1f ms", len(held), 1e3 * took)
        cached = 0 if cache is None else len(cache.cache_state)
        live = 1 if held and (cache is None or held not in cache.cache_state) else 0
        self._stats = CacheStats(entries=cached + live, bytes=0 if cache is None else cache.cache_size)

    def _snapshot(self) -> llama_cpp.LlamaState:
        """``Llama.save_state`` without its copy of the context's scores: that copies a row of logits over the
        vocabulary for each token up to n_batch (100 MB at 512 rows for SmolLM2's 49,152 tokens) that this
        engine never reads (logits_all is off: the rows are not even written), and that the cache's capacity
        does not count."""
        ctx = self._llm._ctx.ctx
        size = llama_cpp.llama_state_get_size(ctx)
        # Written in place into the one buffer kept (a ctypes array copied to bytes took 3x as long).
        data = bytearray(size)
        written = llama_cpp.llama_state_get_data(ctx, (ctypes.c_uint8 * size).from_buffer(data), size)
        del data[written:]
        return llama_cpp.LlamaState(
            input_ids=self._llm.input_ids.copy(),
            scores=self._no_scores,
            n_tokens=self._llm.n_tokens,
            # Typed bytes, but load_state only copies it with from_buffer_copy: any buffer will do.
            llama_state=cast(bytes, data),
            llama_state_size=written,
            seed=self._llm._seed,
        )

    def cache_stats(self) -> CacheStats:
        """Entries: the states in the RAM cache, plus the context's own when it holds tokens no cached state
        is keyed by (with the cache off, or when its state did not fit). Bytes: the RAM cache's state data;
        the context's KV memory is allocated whatever it holds."""
        return self._stats

    def _logprob(self, token: int, piece: bytes, top: int) -> TokenLogprob:
        """Log-probabilities from the logits the token was sampled from (still in the context: the next
        evaluation happens only when the generator resumes)."""
        n_vocab = self._llm.n_vocab()
        ptr = llama_cpp.llama_get_logits_ith(self._llm._ctx.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float64)
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        best = np.argpartition(-logprobs, top)[:top] if top else np.array([], dtype=np.int64)
        best = best[np.argsort(-logprobs[best])]
        return TokenLogprob(
            token=piece.decode(errors="replace"),
            logprob=float(logprobs[token]),
            top=[(self._llm.detokenize([int(t)]).decode(errors="replace"), float(logprobs[t])) for t in best],
        )

    def embed(self, inputs: list[str] | list[list[int]]) -> Embeddings:
        with self._embed_lock:
            llm = self._embedding_model()
            n_vocab = llm.n_vocab()
            batches: list[list[int]] = []
            for item in inputs:
                tokens = item if isinstance(item, list) else llm.tokenize(item.encode(), add_bos=True)
                if not tokens:
                    raise UnsupportedRequest("An input to embed is empty.", "input")
                if any(not 0 <= t < n_vocab for t in tokens):
                    raise UnsupportedRequest(f"Token ids must lie in [0, {n_vocab}).", "input")
                if len(tokens) > self._n_ctx:
                    raise ContextLengthExceeded(len(tokens), self._n_ctx)
                batches.append(tokens)
            vectors = [self._embed_one(llm, tokens) for tokens in batches]
        return Embeddings(vectors=vectors, prompt_tokens=sum(map(len, batches)))

    def _embed_one(self, llm: llama_cpp.Llama, tokens: list[int]) -> list[float]:
        # One sequence per decode, from token ids: llama-cpp-python's embed() takes text only, and a
        # pooled sequence of zero tokens there reads a NULL pointer.
        llm._batch.reset()  # type: ignore[no-untyped-call]
        llm._batch.add_sequence(tokens, 0, True)
        llm._ctx.kv_cache_clear()  # type: ignore[no-untyped-call]
        llm._ctx.decode(llm._batch)
        ptr = llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, 0)
        vector = np.ctypeslib.as_array(ptr, shape=(llm.n_embd(),)).astype(np.float64)
        norm = float(np.linalg.norm(vector))
        return [float(x) for x in (vector / norm if norm > 0 else vector)]

    def _embedding_model(self) -> llama_cpp.Llama:
        if self._embedder is None:
            # Mean pooling: a causal model has no [CLS] token, and its GGUF declares no pooling of its own.
            self._embedder = llama_cpp.Llama(
                model_path=str(self._model_path),
                embedding=True,
                n_ctx=self._n_ctx,
                n_batch=self._n_ctx,
                n_ubatch=self._n_ctx,
                n_threads=self._n_threads,
                n_threads_batch=self._n_threads,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                verbose=False,
            )
        return self._embedder

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    def health(self) -> bool:
        return self._llm is not None

    def close(self) -> None:
        self._llm.close()
        if self._embedder is not None:
            self._embedder.close()


def _reused_prefix(llm: llama_cpp.Llama, prompt: list[int]) -> int:
    """The prompt tokens ``Llama.generate`` will not evaluate again: the longest prefix the context already
    holds (its last evaluation's tokens), less one when that is the whole prompt (it evaluates the last token
    again for fresh logits). Read before the generation, as ``generate`` itself decides."""
    same: int = llama_cpp.Llama.longest_token_prefix(llm._input_ids.tolist(), prompt)
    return min(same, len(prompt) - 1)
