"""vLLM through its async engine: one engine per model per worker process, many requests in flight at once.

The worker's threads each call the synchronous ``generate()``; the async engine runs on its own event-loop
thread, and each request's output stream crosses back to its caller's thread through a ``queue.Queue``. vLLM
batches whatever is in flight (continuous batching). AsyncLLM always runs its engine core in a child process
(spawned on CPU), which exits with the worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import tempfile
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

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

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Defaults measured on CPU (../shared/NOTES.md); an explicit environment variable wins. They must be set
# before vllm is imported, which is why vllm is imported inside VllmEngine.__init__.
ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default memory fraction fails here (NUMA node 0 ~10 GiB)
    "HF_HUB_OFFLINE": "1",  # nothing is ever downloaded from a hub
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
}
FINISH: dict[str | None, FinishReason] = {"stop": "stop", "length": "length", "abort": "cancelled"}
_END = object()


def _configure_environment(n_threads: int | None) -> None:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if "VLLM_CACHE_ROOT" not in os.environ:
        # vLLM leaves compile caches and ZMQ sockets behind: keep them in one private temp dir per process.
        scratch = tempfile.mkdtemp(prefix="inferq-vllm-")
        os.environ["VLLM_CACHE_ROOT"] = scratch
        os.environ.setdefault("TMPDIR", scratch)
        tempfile.tempdir = None  # re-read TMPDIR
    if n_threads:
        # In-process on CPU, vLLM computes on torch's intra-op pool, sized from this when torch loads.
        os.environ.setdefault("OMP_NUM_THREADS", str(n_threads))


def _logprobs(out: Any, top: int | None) -> list[TokenLogprob] | None:
    """vLLM's per-position {token id: Logprob} (the top ``top`` by rank plus the sampled token) as ours."""
    if top is None or out.logprobs is None:
        return None
    found = []
    for token_id, position in zip(out.token_ids, out.logprobs, strict=False):
        if position is None:
            continue
        chosen = position[token_id]
        ranked = sorted((lp for lp in position.values() if lp.rank is not None and lp.rank <= top), key=_rank)
        found.append(
            TokenLogprob(
                token=chosen.decoded_token or "",
                logprob=float(chosen.logprob),
                top=[(lp.decoded_token or "", float(lp.logprob)) for lp in ranked],
            )
        )
    return found


def _rank(logprob: Any) -> int:
    return int(logprob.rank)


class _Stream:
    """One request in flight: the task on the loop thread and the queue its outputs arrive on."""

    def __init__(self) -> None:
        self.outputs: queue.Queue[Any] = queue.Queue()
        self.future: concurrent.futures.Future[None] | None = None


class VllmEngine:
    name = "vllm"

    def __init__(self, model_path: Path, n_ctx: int, n_threads: int | None = None, **options: Any) -> None:
        if not (Path(model_path) / "config.json").is_file():
            raise EngineError(f"not a Hugging Face model folder: {model_path} (run `inferq models prepare`)")
        _configure_environment(n_threads)
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs

        self._n_ctx = n_ctx
        self._tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        options.setdefault("enforce_eager", True)  # torch.compile costs 45-75 s at every start on CPU
        # Automatic prefix caching: a prompt's full KV blocks that an earlier one computed are reused. vLLM
        # 0.32 turns it on by default for generative models, also on x86 CPUs (not on RISC-V, nor for MLA
        # models on CPU, where its platform turns it off whatever this says); said here so it stays on.
        options.setdefault("enable_prefix_caching", True)
        args = AsyncEngineArgs(model=str(model_path), max_model_len=n_ctx, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True)
        self._thread.start()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        try:
            self._engine = self._call(self._start(args))
        except BaseException:
            self._stop_loop()
            raise

    async def _start(self, args: Any) -> Any:
        # Created on the loop thread: the engine binds its output handler to the running loop.
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(args)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        # A fast tokenizer used from several threads at once can fail with "Already borrowed".
        with self._lock:
            return self._tokenize(request)

    def _tokenize(self, request: GenerationRequest) -> list[int]:
        tok = self._tokenizer
        if request.prompt is not None:
            return list(tok.encode(request.prompt + request.continuation))  # /v1/completions: the raw text
        if tok.chat_template:
            text = tok.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
            ids = tok.encode(text + request.continuation, add_special_tokens=False)
        else:
            # No chat template (a base model): the messages are joined as plain text.
            ids = tok.encode("\n".join(m["content"] for m in request.messages) + request.continuation)
        return list(ids)

    def _sampling_params(self, request: GenerationRequest, max_tokens: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra: dict[str, Any] = {}
        if request.json_schema is not None:
            from vllm.sampling_params import StructuredOutputsParams

            # `{}` asks for any JSON object; otherwise JSON valid for the schema (xgrammar, also on CPU).
            schema = request.json_schema
            extra["structured_outputs"] = (
                StructuredOutputsParams(json=schema) if schema else StructuredOutputsParams(json_object=True)
            )
        return SamplingParams(
            n=1,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=max(request.top_k, 0),  # 0: disabled
            min_p=request.min_p,
            seed=request.seed,
            stop=list(request.stop) or None,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            ignore_eos=request.ignore_eos,
            max_tokens=max_tokens,
            logprobs=request.logprobs,
            output_kind=RequestOutputKind.DELTA,
            **extra,
        )

    def generate(self, request: GenerationRequest) -> Iterator[Output]:
        prompt = self._prompt_ids(request)
        if not prompt:
            raise UnsupportedRequest("The prompt is empty.", "prompt")
        if len(prompt) >= self._n_ctx:
            raise ContextLengthExceeded(len(prompt), self._n_ctx)
        params = self._sampling_params(request, min(request.max_tokens, self._n_ctx - len(prompt)))
        yield Output(prompt_tokens=len(prompt))

        rid = request.request_id
        stream = _Stream()
        with self._lock:
            self._streams[rid] = stream
        stream.future = asyncio.run_coroutine_threadsafe(self._pump(rid, prompt, params, stream), self._loop)
        produced, cached, finish = 0, 0, None
        try:
            while True:
                item = stream.outputs.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise EngineError(f"vLLM failed: {item}") from item
                text, n_tokens, reason, logprobs, stop_sequence, cached = item
                produced += n_tokens
                finish = FINISH.get(reason, "stop") if reason else None
                if text or finish or logprobs:
                    yield Output(
                        text=text,
                        prompt_tokens=len(prompt),
                        cached_tokens=cached,
                        completion_tokens=produced,
                        finish_reason=finish,
                        logprobs=logprobs,
                        stop_sequence=stop_sequence,
                    )
            if finish is None:
                # Aborted before vLLM reported a reason (the task was cancelled): say so.
                yield Output(
                    prompt_tokens=len(prompt),
                    cached_tokens=cached,
                    completion_tokens=produced,
                    finish_reason="cancelled",
                )
        finally:
            with self._lock:
                self._streams.pop(rid, None)
            if not stream.future.done():
                # The caller stopped reading (or failed): free the sequence's slot in the batch.
                stream.future.cancel()

    async def _pump(self, rid: str, prompt: list[int], params: Any, stream: _Stream) -> None:
        from vllm.inputs import TokensPrompt

        try:
            tokens = TokensPrompt(prompt_token_ids=prompt)
            if params.seed is not None:
                # A seeded request promises the same text, and a prefix-cache hit computes the prompt in
                # other batches (the logits' last bits differ): a salt of its own keeps it from sharing
                # cached blocks, as llama.cpp and MLX evaluate a seeded prompt whole.
                tokens["cache_salt"] = rid
            results: AsyncIterator[Any] = self._engine.generate(tokens, params, rid)
            async for result in results:
                out = result.outputs[0]
                reason = out.finish_reason if result.finished else None
                logprobs = _logprobs(out, params.logprobs)
                # A matched stop string; vLLM reports a stop token by its id (an int) instead.
                stop = out.stop_reason if reason and isinstance(out.stop_reason, str) else None
                # Prompt tokens served from the prefix cache (vLLM's automatic prefix caching).
                cached = getattr(result, "num_cached_tokens", None) or 0
                stream.outputs.put((out.text, len(out.token_ids), reason, logprobs, stop, cached))
        except asyncio.CancelledError:
            pass  # abort(): the engine's generate() aborts the request in vLLM as it unwinds
        except Exception as exc:
            logger.exception("vLLM request %s failed", rid)
            stream.outputs.put(exc)
        finally:
            stream.outputs.put(_END)

    def cache_stats(self) -> CacheStats:
        """Nothing cheap to report: the KV blocks vLLM keeps for reuse live in the engine core's process,
        and what it publishes (KV usage, prefix-cache queries and hits per step) counts blocks in use and
        lookups, not cached prefixes. Hits show in each output's ``cached_tokens`` instead."""
        return CacheStats(entries=0, bytes=0)

    def abort(self, request_id: str) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None and stream.future is not None:
            stream.future.cancel()

    def health(self) -> bool:
        return self._thread.is_alive() and not getattr(self._engine, "errored", False)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        for stream in list(self._streams.values()):
            if stream.future is not None:
                stream.future.cancel()
        try:
            self._call(self._shutdown())
        finally:
            self._stop_loop()
            # Let the engine go now: collected at interpreter exit, its __del__ would shut down a second time
            # with half the modules already torn down.
            self._engine = None

    async def _shutdown(self) -> None:
        # On the loop thread: shutdown() cancels the engine's output-handler task, which lives on this loop.
        self._engine.shutdown()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()
