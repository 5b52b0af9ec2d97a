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

from api import errors
from api.deps import CatalogDep, DispatcherDep
from api.jobs import JobRun
from api.protocol.chat import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Usage,
)
from queueing import events

router = APIRouter()
WORKER_HEADER = "x-inferq-worker"


def _usage(finished: events.Finished) -> Usage:
    return Usage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
    )


def _finish_reason(finished: events.Finished) -> str:
    return "length" if finished.finish_reason == "length" else "stop"


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, dispatcher: DispatcherDep, catalog: CatalogDep
) -> Response:
    spec = catalog.get(body.model)
    if spec is None:
        raise errors.model_not_found(body.model)
    if body.n != 1:
        raise errors.invalid_request("Only n=1 is supported.", "n", "unsupported_value")
    job = body.to_job(spec)
    if body.stream:
        return await _stream(body, dispatcher.run(job, request.is_disconnected))
    finished: events.Finished | None = None
    async with dispatcher.run(job, request.is_disconnected) as run:
        await run.start()
        async for event in run.rest():  # a non-streamed job publishes no deltas, only its end
            if isinstance(event, events.Finished):
                finished = event
    assert finished is not None  # rest() ends with Finished or raises
    completion = ChatCompletion(
        id=job.id,
        model=body.model,
        choices=[
            Choice(
                message=AssistantMessage(content=finished.text or ""), finish_reason=_finish_reason(finished)
            )
        ],
        usage=_usage(finished),
    )
    # run.worker, not the first Started: a re-queued job finishes on another worker.
    return JSONResponse(completion.model_dump(mode="json"), headers={WORKER_HEADER: run.worker or ""})


async def _stream(
    body: ChatCompletionRequest, run_cm: contextlib.AbstractAsyncContextManager[JobRun]
) -> EventSourceResponse:
    stack = contextlib.AsyncExitStack()
    try:
        run = await stack.enter_async_context(run_cm)
        started = await run.start()
    except BaseException:
        await stack.aclose()
        raise
    return EventSourceResponse(
        _chunks(body, run, stack),
        headers={WORKER_HEADER: started.worker},
        ping=15,
        # Runs after a normal end and after a client disconnect, also when the body never started.
        background=BackgroundTask(stack.aclose),
    )


async def _chunks(
    body: ChatCompletionRequest, run: JobRun, stack: contextlib.AsyncExitStack
) -> AsyncIterator[dict[str, str]]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    exclude = None if include_usage else {"usage"}
    created = int(time.time())

    def chunk(delta: Delta, finish: str | None = None) -> dict[str, str]:
        c = ChatCompletionChunk(
            id=run.job.id,
            created=created,
            model=body.model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish)],
        )
        return {"data": c.model_dump_json(exclude=exclude)}

    try:
        yield chunk(Delta(role="assistant", content=""))
        async for event in run.rest():
            if isinstance(event, events.Delta):
                yield chunk(Delta(content=event.text))
            else:
                yield chunk(Delta(), _finish_reason(event))
                if include_usage:
                    last = ChatCompletionChunk(
                        id=run.job.id, created=created, model=body.model, choices=[], usage=_usage(event)
                    )
                    yield {"data": last.model_dump_json()}
    except errors.OpenAIError as exc:
        # Headers are gone: once a stream started, an error is an event in it.
        yield {"data": json.dumps(exc.body())}
    finally:
        await stack.aclose()
    yield {"data": "[DONE]"}
