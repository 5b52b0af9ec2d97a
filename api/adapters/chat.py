"""Chat completions over the serving core: the request as a conversation, the result as OpenAI's objects."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Response

from api import errors, priority, resume
from api.protocol.base import PromptTokensDetails, ServiceTier, Usage
from api.protocol.chat import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
)
from api.protocol.tools import (
    FunctionCall,
    FunctionCallDelta,
    NamedToolChoice,
    ToolCall,
    ToolCallDelta,
    call_id,
)
from api.serving import core, output, sse, structured
from api.serving.conversation import Call, Conversation, Function, Named, OutputFormat, ToolChoice, Turn
from api.serving.fanout import JobIds
from queueing import events
from queueing.catalog import ModelSpec

# OpenAI's chat and completions streams: an error is a data line with the error envelope, then [DONE].
OPENAI_FRAMING = sse.Framing(error=lambda exc: [sse.Frame(json.dumps(exc.body()))], done=sse.DONE)


def openai_usage(u: core.TokenUsage) -> Usage:
    return Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens),
    )


def conversation(body: ChatCompletionRequest) -> Conversation:
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
        raise errors.invalid_request(
            "response_format `json_schema` needs a `json_schema` object.", "response_format", "invalid_value"
        )
    out: OutputFormat | None = None
    if fmt is not None and fmt.type == "json_object":
        out = OutputFormat("json_object")
    elif fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
        out = OutputFormat("json_schema", fmt.json_schema.schema_)
    choice: ToolChoice | None
    if isinstance(body.tool_choice, NamedToolChoice):
        choice = Named(body.tool_choice.function.name)
    else:
        choice = body.tool_choice
    turns = [
        Turn(
            role=m.role,
            text=m.text(),
            calls=[Call(c.function.name, c.function.arguments) for c in m.tool_calls or []],
        )
        for m in body.messages
    ]
    tools = [
        Function(t.function.name, t.function.description, t.function.parameters) for t in body.tools or []
    ]
    return Conversation(turns, tools, choice, out)


def work(
    body: ChatCompletionRequest, spec: ModelSpec, ids: JobIds | None = None
) -> tuple[structured.Plan, core.Work]:
    plan = structured.plan(conversation(body))
    sampling = body.to_sampling(spec, plan.json_schema)
    tier = (body.model_extra or {}).get("service_tier")
    priority.ask_tier(tier if isinstance(tier, str) else None)
    return plan, core.chat_work(body.model, plan, sampling, n=body.n, stream=body.stream, ids=ids)


def _tool_call(call: Call) -> ToolCall:
    return ToolCall(function=FunctionCall(name=call.name, arguments=call.arguments))


def _choice(index: int, plan: structured.Plan, finished: events.Finished) -> Choice:
    text, call, reason = output.whole(plan, finished)
    logprobs = ChoiceLogprobs.of(finished.logprobs) if finished.logprobs is not None else None
    message = (
        AssistantMessage(content=None, tool_calls=[_tool_call(call)])
        if call
        else AssistantMessage(content=text)
    )
    return Choice(index=index, message=message, logprobs=logprobs, finish_reason=reason)


async def complete(body: ChatCompletionRequest, serve: core.Serve) -> tuple[ChatCompletion, core.Outcome]:
    """A non-streamed chat completion, start to end (the route's and a batch line's)."""
    plan, w = work(body, serve.spec, serve.ids)
    outcome = await serve.complete(w)
    completion = ChatCompletion(
        id=w.jobs[0].id,
        model=body.model,
        choices=[_choice(i, plan, f) for i, f in enumerate(outcome.finished)],
        usage=openai_usage(outcome.usage),
        service_tier=serve.service_tier(),
    )
    return completion, outcome


async def respond(body: ChatCompletionRequest, serve: core.Serve) -> Response:
    if not body.stream:
        return core.json_response(*await complete(body, serve))
    plan, w = work(body, serve.spec)
    created = int(time.time())
    serve = await resume.offer(serve, w, "chat", body, created)
    stream = await serve.stream(w)
    frames = resume.ids(_chunks(body, plan, stream, created, serve.service_tier()), stream)
    return sse.respond(frames, OPENAI_FRAMING, stream.close, stream.headers)


async def resumed(
    body: ChatCompletionRequest, serve: core.Serve, created: int, after: resume.FrameId | None
) -> Response:
    """The rest of a stream after ``after`` (api/routes/streams.py); ``serve`` names and follows its job."""
    plan, w = work(body, serve.spec, serve.ids)
    stream = await serve.stream(w)
    frames = resume.with_ids(
        _chunks(body, plan, stream, created, serve.service_tier()), stream.runs[0], after
    )
    return sse.respond(frames, OPENAI_FRAMING, stream.close, stream.headers)


def _delta(
    piece: output.Piece, ids: dict[int, str], index: int, new_id: Callable[[], str]
) -> tuple[Delta, list[events.TokenLogprob] | None]:
    if isinstance(piece, output.Text):
        return Delta(content=piece.text), piece.logprobs
    if isinstance(piece, output.CallArguments):
        if piece.first:
            ids[index] = new_id()
            fn = FunctionCallDelta(name=piece.name, arguments=piece.text)
            return Delta(
                tool_calls=[ToolCallDelta(index=0, id=ids[index], type="function", function=fn)]
            ), piece.logprobs
        more = ToolCallDelta(index=0, function=FunctionCallDelta(arguments=piece.text))
        return Delta(tool_calls=[more]), piece.logprobs
    assert isinstance(piece, output.WholeCall)
    fn = FunctionCallDelta(name=piece.call.name, arguments=piece.call.arguments)
    return Delta(
        tool_calls=[ToolCallDelta(index=0, id=new_id(), type="function", function=fn)]
    ), piece.logprobs


async def _chunks(
    body: ChatCompletionRequest, plan: structured.Plan, stream: core.Stream, created: int, tier: ServiceTier
) -> AsyncIterator[sse.Frame]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    exclude = None if include_usage else {"usage"}
    job_id = stream.work.jobs[0].id
    choices = [output.ChoiceStream(plan) for _ in stream.runs]
    call_ids: dict[int, str] = {}
    # Tool call ids from the job's id, so that a resumed stream (api/resume.py) renders the same ones.
    numbered = itertools.count()

    def new_id() -> str:
        return call_id(f"{job_id}:{next(numbered)}")

    def chunk(
        index: int,
        delta: Delta,
        logprobs: list[events.TokenLogprob] | None = None,
        finish: output.EndReason | None = None,
    ) -> sse.Frame:
        lp = ChoiceLogprobs.of(logprobs) if logprobs else None
        choice = ChunkChoice(index=index, delta=delta, logprobs=lp, finish_reason=finish)
        c = ChatCompletionChunk(
            id=job_id, created=created, model=body.model, service_tier=tier, choices=[choice]
        )
        return sse.Frame(c.model_dump_json(exclude=exclude))

    for i in range(len(stream.runs)):
        yield chunk(i, Delta(role="assistant", content=""))
    async for i, event in stream.events():
        pieces = choices[i].delta(event) if isinstance(event, events.Delta) else choices[i].finished(event)
        for p in pieces:
            if isinstance(p, output.End):
                yield chunk(i, Delta(), finish=p.reason)
            else:
                delta, logprobs = _delta(p, call_ids, i, new_id)
                yield chunk(i, delta, logprobs)
    if include_usage:
        last = ChatCompletionChunk(
            id=job_id,
            created=created,
            model=body.model,
            service_tier=tier,
            choices=[],
            usage=openai_usage(stream.usage),
        )
        yield sse.Frame(last.model_dump_json())
