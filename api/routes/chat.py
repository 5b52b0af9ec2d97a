"""POST /v1/chat/completions."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from api import errors, fanout, structured
from api.chat_stream import ChoiceStream, finish_reason
from api.deps import CatalogDep, DispatcherDep, model_spec
from api.fanout import usage, workers_header
from api.jobs import INTERACTIVE, Disconnected, Dispatcher, JobRun, RunOptions
from api.protocol.chat import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    FinishReason,
)
from queueing import events
from queueing.catalog import ModelSpec
from queueing.jobs import Job

router = APIRouter()


def _choice(index: int, plan: structured.Plan, finished: events.Finished) -> Choice:
    text = finished.text or ""
    call = structured.tool_call(plan, text)
    logprobs = ChoiceLogprobs.of(finished.logprobs) if finished.logprobs is not None else None
    message = AssistantMessage(content=None, tool_calls=[call]) if call else AssistantMessage(content=text)
    return Choice(
        index=index,
        message=message,
        logprobs=logprobs,
        finish_reason=finish_reason(finished, call is not None),
    )


def chat_jobs(
    body: ChatCompletionRequest, spec: ModelSpec, job_ids: fanout.JobIds | None = None
) -> tuple[structured.Plan, list[Job]]:
    """The jobs of one chat request: one per choice."""
    plan = structured.plan(body)
    sampling = body.to_sampling(spec, plan.json_schema)
    jobs = [
        Job(
            model=body.model,
            messages=plan.messages,
            # Choice i of a seeded request is seeded seed+i: repeatable, yet the choices differ.
            sampling=sampling.model_copy(update={"seed": None if body.seed is None else body.seed + i}),
            stream=body.stream,
        )
        for i in range(body.n)
    ]
    return plan, fanout.named(jobs, job_ids)


async def complete(
    body: ChatCompletionRequest,
    spec: ModelSpec,
    dispatcher: Dispatcher,
    disconnected: Disconnected | None,
    options: RunOptions = INTERACTIVE,
    job_ids: fanout.JobIds | None = None,
) -> tuple[ChatCompletion, list[JobRun]]:
    """A non-streamed chat completion, start to end (the route's and a batch line's)."""
    plan, jobs = chat_jobs(body, spec, job_ids)
    finished, runs = await fanout.complete_all(dispatcher, jobs, disconnected, options)
    completion = ChatCompletion(
        id=jobs[0].id,
        model=body.model,
        choices=[_choice(i, plan, f) for i, f in enumerate(finished)],
        usage=usage(finished),
    )
    return completion, runs


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, dispatcher: DispatcherDep, catalog: CatalogDep
) -> Response:
    spec = model_spec(catalog, body.model)
    if body.stream:
        plan, jobs = chat_jobs(body, spec)
        return await _stream(body, plan, dispatcher, jobs, request)
    completion, runs = await complete(body, spec, dispatcher, request.is_disconnected)
    return JSONResponse(completion.model_dump(mode="json"), headers=workers_header(runs))


async def _stream(
    body: ChatCompletionRequest,
    plan: structured.Plan,
    dispatcher: Dispatcher,
    jobs: list[Job],
    request: Request,
) -> EventSourceResponse:
    runs, stack = await fanout.start_streams(dispatcher, jobs, request.is_disconnected)
    return EventSourceResponse(
        _chunks(body, plan, runs, stack),
        headers=workers_header(runs),
        ping=15,
        # Runs after a normal end and after a client disconnect, also when the body never started.
        background=BackgroundTask(stack.aclose),
    )


async def _chunks(
    body: ChatCompletionRequest, plan: structured.Plan, runs: list[JobRun], stack: contextlib.AsyncExitStack
) -> AsyncIterator[dict[str, str]]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    exclude = None if include_usage else {"usage"}
    created = int(time.time())
    choices = [ChoiceStream(plan) for _ in runs]
    finished: list[events.Finished | None] = [None] * len(runs)

    def chunk(
        index: int, delta: Delta, logprobs: ChoiceLogprobs | None = None, finish: FinishReason | None = None
    ) -> dict[str, str]:
        choice = ChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
        c = ChatCompletionChunk(id=runs[0].job.id, created=created, model=body.model, choices=[choice])
        return {"data": c.model_dump_json(exclude=exclude)}

    try:
        for i in range(len(runs)):
            yield chunk(i, Delta(role="assistant", content=""))
        async for i, event in fanout.merged(runs):
            if isinstance(event, events.Delta):
                pieces = choices[i].delta(event)
            else:
                finished[i] = event
                pieces = choices[i].finished(event)
            for p in pieces:
                yield chunk(i, p.delta, p.logprobs, p.finish_reason)
        if include_usage:
            done = [f for f in finished if f is not None]
            last = ChatCompletionChunk(
                id=runs[0].job.id, created=created, model=body.model, choices=[], usage=usage(done)
            )
            yield {"data": last.model_dump_json()}
    except errors.OpenAIError as exc:
        # Headers are gone: once a stream started, an error is an event in it.
        yield {"data": json.dumps(exc.body())}
    finally:
        await stack.aclose()
    yield {"data": "[DONE]"}
