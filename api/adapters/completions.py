"""Legacy completions over the serving core: every prompt times ``n`` is one job; choice ``p * n + i`` is
prompt p's i-th."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Response

from api import errors, resume
from api.adapters.chat import OPENAI_FRAMING, openai_usage
from api.protocol.completions import (
    Completion,
    CompletionChoice,
    CompletionFinishReason,
    CompletionLogprobs,
    CompletionRequest,
)
from api.serving import core, fanout, sse
from api.serving.fanout import JobIds
from queueing import events
from queueing.catalog import ModelSpec
from queueing.jobs import Job


def _logprobs(items: list[events.TokenLogprob] | None, offset: int) -> CompletionLogprobs | None:
    if items is None:
        return None
    out = CompletionLogprobs()
    for t in items:
        out.tokens.append(t.token)
        out.token_logprobs.append(t.logprob)
        out.top_logprobs.append({a.token: a.logprob for a in t.top})
        out.text_offset.append(offset)
        offset += len(t.token)
    return out


def _finish_reason(finished: events.Finished) -> CompletionFinishReason:
    return "length" if finished.finish_reason == "length" else "stop"


def work(body: CompletionRequest, spec: ModelSpec, ids: JobIds | None = None) -> core.Work:
    """The jobs of one completions request: prompt p's i-th choice is job ``p * n + i``."""
    if body.suffix:
        raise errors.invalid_request("`suffix` is not supported.", "suffix", "unsupported_value")
    if body.echo and body.logprobs is not None:
        # Prompt tokens' logprobs would need the logits of every prompt position, which workers do not keep.
        raise errors.invalid_request(
            "`echo` together with `logprobs` is not supported.", "logprobs", "unsupported_value"
        )
    sampling = body.to_sampling(spec)
    jobs = [
        Job(
            id=f"cmpl-{uuid.uuid4().hex}",
            kind="completion",
            model=body.model,
            prompt=prompt,
            sampling=sampling.model_copy(update={"seed": None if body.seed is None else body.seed + i}),
            stream=body.stream,
        )
        for prompt in body.prompts()
        for i in range(body.n)
    ]
    return core.Work(fanout.named(jobs, ids), prompts=len(body.prompts()))


async def complete(body: CompletionRequest, serve: core.Serve) -> tuple[Completion, core.Outcome]:
    """A non-streamed completion, start to end (the route's and a batch line's)."""
    w = work(body, serve.spec, serve.ids)
    outcome = await serve.complete(w)
    choices = []
    for i, (job, f) in enumerate(zip(w.jobs, outcome.finished, strict=True)):
        head = (job.prompt or "") if body.echo else ""
        choices.append(
            CompletionChoice(
                text=head + (f.text or ""),
                index=i,
                logprobs=_logprobs(f.logprobs, len(head)),
                finish_reason=_finish_reason(f),
            )
        )
    completion = Completion(
        id=w.jobs[0].id, model=body.model, choices=choices, usage=openai_usage(outcome.usage)
    )
    return completion, outcome


async def respond(body: CompletionRequest, serve: core.Serve) -> Response:
    if not body.stream:
        return core.json_response(*await complete(body, serve))
    w, created = work(body, serve.spec), int(time.time())
    serve = await resume.offer(serve, w, "completions", body, created)
    stream = await serve.stream(w)
    frames = resume.ids(_chunks(body, stream, created), stream)
    return sse.respond(frames, OPENAI_FRAMING, stream.close, stream.headers)


async def resumed(
    body: CompletionRequest, serve: core.Serve, created: int, after: resume.FrameId | None
) -> Response:
    """The rest of a stream after ``after`` (api/routes/streams.py); ``serve`` names and follows its job."""
    stream = await serve.stream(work(body, serve.spec, serve.ids))
    frames = resume.with_ids(_chunks(body, stream, created), stream.runs[0], after)
    return sse.respond(frames, OPENAI_FRAMING, stream.close, stream.headers)


async def _chunks(body: CompletionRequest, stream: core.Stream, created: int) -> AsyncIterator[sse.Frame]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    jobs = stream.work.jobs
    offsets = [0] * len(jobs)

    def chunk(choice: CompletionChoice) -> sse.Frame:
        c = Completion(id=jobs[0].id, created=created, model=body.model, choices=[choice])
        return sse.Frame(c.model_dump_json(exclude=None if include_usage else {"usage"}))

    if body.echo:
        for i, job in enumerate(jobs):
            offsets[i] = len(job.prompt or "")
            yield chunk(CompletionChoice(text=job.prompt or "", index=i))
    async for i, event in stream.events():
        if isinstance(event, events.Delta):
            logprobs = _logprobs(event.logprobs, offsets[i])
            offsets[i] += len(event.text)
            yield chunk(CompletionChoice(text=event.text, index=i, logprobs=logprobs))
        else:
            yield chunk(CompletionChoice(text="", index=i, finish_reason=_finish_reason(event)))
    if include_usage:
        last = Completion(
            id=jobs[0].id, created=created, model=body.model, choices=[], usage=openai_usage(stream.usage)
        )
        yield sse.Frame(last.model_dump_json())
