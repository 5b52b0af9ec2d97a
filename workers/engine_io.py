"""What goes into an engine and what comes out of it, in the worker's terms: a job as a ``GenerationRequest``,
an engine's logprobs as wire events, and ending an engine's generation wherever its reader stopped."""

from __future__ import annotations

from collections.abc import Iterator

from engines.base import GenerationRequest, Output, TokenLogprob
from queueing import events
from queueing.jobs import Job


def to_generation_request(job: Job) -> GenerationRequest:
    s = job.sampling
    return GenerationRequest(
        request_id=job.id,
        messages=[m.model_dump() for m in job.messages],
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        stop=s.stop,
        seed=s.seed,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        ignore_eos=s.ignore_eos,
        prompt=job.prompt if job.kind == "completion" else None,
        json_schema=s.json_schema,
        logprobs=s.logprobs,
    )


def wire_logprobs(items: list[TokenLogprob]) -> list[events.TokenLogprob]:
    return [
        events.TokenLogprob(
            token=t.token,
            logprob=t.logprob,
            top=[events.TopLogprob(token=tok, logprob=lp) for tok, lp in t.top],
        )
        for t in items
    ]


def close_outputs(outputs: Iterator[Output]) -> None:
    """End an engine's generation now, wherever its consumer stopped reading. A generator left suspended
    keeps what it holds: llama.cpp's and MLX's engine lock (every later job of the engine would wait for it
    forever), vLLM's sequence in the batch. Garbage collection would close it only once nothing refers to
    it, and an exception's traceback (kept by a logger or by Celery) refers to it for as long as it lives."""
    close = getattr(outputs, "close", None)
    if close is not None:
        close()
