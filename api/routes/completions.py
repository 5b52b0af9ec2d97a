"""POST /v1/completions: every prompt times ``n`` is one job; choice ``p * n + i`` is prompt p's i-th."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from api import errors, fanout
from api.deps import CatalogDep, DispatcherDep, model_spec
from api.fanout import usage, workers_header
from api.jobs import INTERACTIVE, Disconnected, Dispatcher, JobRun, RunOptions
from api.protocol.completions import (
    Completion,
    CompletionChoice,
    CompletionFinishReason,
    CompletionLogprobs,
    CompletionRequest,
)
from queueing import events
from queueing.catalog import ModelSpec
from queueing.jobs import Job

router = APIRouter()


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


def completion_jobs(
    body: CompletionRequest, spec: ModelSpec, job_ids: fanout.JobIds | None = None
) -> list[Job]:
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
    return fanout.named(jobs, job_ids)


async def complete(
    body: CompletionRequest,
    spec: ModelSpec,
    dispatcher: Dispatcher,
    disconnected: Disconnected | None,
    options: RunOptions = INTERACTIVE,
    job_ids: fanout.JobIds | None = None,
) -> tuple[Completion, list[JobRun]]:
    """A non-streamed completion, start to end (the route's and a batch line's)."""
    jobs = completion_jobs(body, spec, job_ids)
    finished, runs = await fanout.complete_all(dispatcher, jobs, disconnected, options)
    choices = []
    for i, (job, f) in enumerate(zip(jobs, finished, strict=True)):
        head = (job.prompt or "") if body.echo else ""
        choices.append(
            CompletionChoice(
                text=head + (f.text or ""),
                index=i,
                logprobs=_logprobs(f.logprobs, len(head)),
                finish_reason=_finish_reason(f),
            )
        )
    prompts = len(body.prompts())
    completion = Completion(id=jobs[0].id, model=body.model, choices=choices, usage=usage(finished, prompts))
    return completion, runs


@router.post("/v1/completions", response_model=Completion)
async def create_completion(
    body: CompletionRequest, request: Request, dispatcher: DispatcherDep, catalog: CatalogDep
) -> Response:
    spec = model_spec(catalog, body.model)
    if not body.stream:
        completion, runs = await complete(body, spec, dispatcher, request.is_disconnected)
        return JSONResponse(completion.model_dump(mode="json"), headers=workers_header(runs))
    runs, stack = await fanout.start_streams(dispatcher, completion_jobs(body, spec), request.is_disconnected)
    return EventSourceResponse(
        _chunks(body, runs, stack),
        headers=workers_header(runs),
        ping=15,
        background=BackgroundTask(stack.aclose),
    )


async def _chunks(
    body: CompletionRequest, runs: list[JobRun], stack: contextlib.AsyncExitStack
) -> AsyncIterator[dict[str, str]]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    created = int(time.time())
    finished: list[events.Finished | None] = [None] * len(runs)
    offsets = [0] * len(runs)

    def chunk(choice: CompletionChoice) -> dict[str, str]:
        c = Completion(id=runs[0].job.id, created=created, model=body.model, choices=[choice])
        return {"data": c.model_dump_json(exclude=None if include_usage else {"usage"})}

    try:
        if body.echo:
            for i, run in enumerate(runs):
                offsets[i] = len(run.job.prompt or "")
                yield chunk(CompletionChoice(text=run.job.prompt or "", index=i))
        async for i, event in fanout.merged(runs):
            if isinstance(event, events.Delta):
                logprobs = _logprobs(event.logprobs, offsets[i])
                offsets[i] += len(event.text)
                yield chunk(CompletionChoice(text=event.text, index=i, logprobs=logprobs))
            else:
                finished[i] = event
                yield chunk(CompletionChoice(text="", index=i, finish_reason=_finish_reason(event)))
        if include_usage:
            done = [f for f in finished if f is not None]
            n_prompts = len(body.prompts())
            last = Completion(
                id=runs[0].job.id, created=created, model=body.model, choices=[], usage=usage(done, n_prompts)
            )
            yield {"data": last.model_dump_json()}
    except errors.OpenAIError as exc:
        yield {"data": json.dumps(exc.body())}
    finally:
        await stack.aclose()
    yield {"data": "[DONE]"}
