"""The Responses API over the serving core: a request (and the stored conversation it continues) as a
conversation, the result as a response object. Streaming events are rendered in ``responses_stream``.

The response id names the job, so a response, its job record and its event log share one id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from api import errors, priority
from api.adapters.responses_items import context_items, turns
from api.protocol.responses import (
    AllowedToolsChoice,
    FunctionCallItem,
    FunctionToolChoice,
    IncompleteDetails,
    InputTokensDetails,
    LogProb,
    OutputItem,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    TextFormatJsonObject,
    TextFormatJsonSchema,
    TopLogProb,
)
from api.protocol.tools import call_id
from api.responses.store import StoredResponse
from api.serving import core, output, structured
from api.serving.conversation import Conversation, Function, Named, OutputFormat, ToolChoice, Turn
from api.serving.fanout import JobIds
from queueing import events
from queueing.catalog import ModelSpec
from queueing.jobs import Sampling

LOGPROBS_INCLUDE = "message.output_text.logprobs"


@dataclass(frozen=True)
class Prepared:
    """One response, ready to run: its request, its plan and job, the conversation it saw."""

    body: ResponsesRequest
    spec: ModelSpec
    plan: structured.Plan
    work: core.Work
    context: list[dict[str, Any]]
    skeleton: ResponseObject

    @property
    def id(self) -> str:
        return self.skeleton.id


def _refuse(body: ResponsesRequest) -> None:
    """Fields this server cannot honour get a clear 400 rather than being silently dropped."""
    if body.conversation is not None:
        raise errors.invalid_request(
            "`conversation` is not supported; continue a stored response with `previous_response_id`.",
            "conversation",
            "unsupported_parameter",
        )
    if body.prompt is not None:
        raise errors.invalid_request(
            "Prompt templates (`prompt`) are not supported.", "prompt", "unsupported_parameter"
        )
    if body.background and not body.store:
        raise errors.invalid_request(
            "A background response must be stored: `background` needs `store` true.",
            "background",
            "invalid_value",
        )


def _tool_choice(body: ResponsesRequest, tools: list[Function]) -> tuple[ToolChoice | None, list[Function]]:
    choice = body.tool_choice
    if isinstance(choice, FunctionToolChoice):
        return Named(choice.name), tools
    if isinstance(choice, AllowedToolsChoice):
        allowed = {t.name for t in choice.tools}
        return choice.mode, [t for t in tools if t.name in allowed]
    return choice, tools


def _output_format(body: ResponsesRequest) -> OutputFormat | None:
    fmt = body.text.format if body.text else None
    if isinstance(fmt, TextFormatJsonSchema):
        return OutputFormat("json_schema", fmt.schema_)
    if isinstance(fmt, TextFormatJsonObject):
        return OutputFormat("json_object")
    return None


def conversation(body: ResponsesRequest, context: list[dict[str, Any]]) -> Conversation:
    tools = [Function(t.name, t.description, t.parameters) for t in body.tools or []]
    choice, tools = _tool_choice(body, tools)
    history = turns(context)
    if body.instructions:
        # Instructions are this request's alone: a continued response does not inherit them.
        history = [Turn("system", body.instructions), *history]
    if not history:
        raise errors.invalid_request("`input` is empty.", "input", "invalid_value")
    return Conversation(
        history,
        tools,
        choice,
        _output_format(body),
        tool_choice_param="tool_choice",
        output_param="text.format",
    )


def _logprobs(body: ResponsesRequest) -> int | None:
    if body.top_logprobs or LOGPROBS_INCLUDE in (body.include or []):
        return body.top_logprobs or 0
    return None


def sampling(body: ResponsesRequest, spec: ModelSpec, plan: structured.Plan) -> Sampling:
    d = spec.defaults
    return Sampling(
        max_tokens=body.max_output_tokens or d.max_tokens or spec.context_length,
        temperature=d.temperature if body.temperature is None else body.temperature,
        top_p=d.top_p if body.top_p is None else body.top_p,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        seed=body.seed,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        ignore_eos=body.ignore_eos,
        json_schema=plan.json_schema,
        logprobs=_logprobs(body),
    )


def prepare(
    body: ResponsesRequest,
    spec: ModelSpec,
    previous: StoredResponse | None,
    ids: JobIds | None = None,
    *,
    stream: bool = False,
    context: list[dict[str, Any]] | None = None,
) -> Prepared:
    """``context``: the items the model sees, when the caller built them (compaction); by default the
    previous response's conversation and this request's input."""
    _refuse(body)
    priority.ask_tier(body.service_tier)
    context = context if context is not None else context_items(previous, body.input)
    plan = structured.plan(conversation(body, context))
    s = sampling(body, spec, plan)
    skeleton = ResponseObject.from_request(
        body,
        status="queued" if body.background else "in_progress",
        temperature=s.temperature,
        top_p=s.top_p,
        # An interactive request's; a batch line's is set by ``run``, which knows it runs as one.
        service_tier=priority.served_tier(priority.effective()),
    )
    work = core.chat_work(body.model, plan, s, stream=stream, ids=ids or (lambda _: skeleton.id))
    if ids is not None:
        # A batch line names its job after the line; the response takes the same id.
        skeleton = skeleton.model_copy(update={"id": work.jobs[0].id})
    return Prepared(body, spec, plan, work, context, skeleton)


def wire_logprobs(items: list[events.TokenLogprob] | None) -> list[LogProb]:
    return [
        LogProb(
            token=t.token,
            logprob=t.logprob,
            bytes=list(t.token.encode()),
            top_logprobs=[
                TopLogProb(token=a.token, logprob=a.logprob, bytes=list(a.token.encode())) for a in t.top
            ],
        )
        for t in items or []
    ]


def usage(u: core.TokenUsage) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=u.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=u.cached_tokens),
        output_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
    )


def ended(
    skeleton: ResponseObject, items: list[OutputItem], reason: output.EndReason, u: core.TokenUsage
) -> ResponseObject:
    """The final response object: completed, or incomplete when the output ran into its token limit."""
    incomplete = reason == "length"
    return skeleton.model_copy(
        update={
            "status": "incomplete" if incomplete else "completed",
            "incomplete_details": IncompleteDetails(reason="max_output_tokens") if incomplete else None,
            "completed_at": int(time.time()),
            "output": items,
            "usage": usage(u),
        }
    )


def items_of(plan: structured.Plan, finished: events.Finished) -> tuple[list[OutputItem], output.EndReason]:
    text, call, reason = output.whole(plan, finished)
    status = "incomplete" if reason == "length" else "completed"
    if call is not None:
        return [
            FunctionCallItem(call_id=call_id(), name=call.name, arguments=call.arguments, status=status)
        ], reason
    part = OutputText(text=text, logprobs=wire_logprobs(finished.logprobs))
    return [OutputMessage(status=status, content=[part])], reason


async def run(prepared: Prepared, serve: core.Serve) -> tuple[ResponseObject, core.Outcome]:
    """A non-streamed response, start to end."""
    outcome = await serve.complete(prepared.work)
    items, reason = items_of(prepared.plan, outcome.finished[0])
    skeleton = prepared.skeleton.model_copy(update={"service_tier": serve.service_tier()})
    return ended(skeleton, items, reason, outcome.usage), outcome


async def complete(body: ResponsesRequest, serve: core.Serve) -> tuple[ResponseObject, core.Outcome]:
    """A batch line's response: nothing stored, no previous response (a line stands alone)."""
    if body.previous_response_id is not None:
        raise errors.invalid_request(
            "Batch lines cannot continue a stored response.", "previous_response_id", "unsupported_parameter"
        )
    if body.background:
        raise errors.invalid_request(
            "Batch lines run in the background already.", "background", "invalid_value"
        )
    return await run(prepare(body, serve.spec, None, serve.ids), serve)
