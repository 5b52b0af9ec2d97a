"""Anthropic Messages over the serving core: the request as a conversation, the result as Anthropic's
``Message`` or its stream of content-block events; ``count_tokens`` as a count job on a worker."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from fastapi import Response
from pydantic import BaseModel

from api import errors
from api.protocol.messages import (
    ContentBlock,
    ConversationRequest,
    CountTokensRequest,
    CountTokensResponse,
    Message,
    MessageParam,
    MessagesRequest,
    StopReason,
    TextBlock,
    ToolResultBlockParam,
    ToolUseBlock,
    Usage,
    message_id,
    tool_use_id,
)
from api.protocol.messages_stream import (
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    InputJSONDelta,
    MessageDelta,
    MessageDeltaEvent,
    MessageDeltaUsage,
    MessageStartEvent,
    MessageStopEvent,
    PingEvent,
    TextDelta,
)
from api.serving import core, output, sse, structured
from api.serving.conversation import Call, Conversation, Function, Named, ToolChoice, Turn
from api.serving.fanout import JobIds
from queueing import events
from queueing.catalog import ModelSpec
from queueing.jobs import Job, Sampling


def framing(request_id: str | None = None) -> sse.Framing:
    """Anthropic's stream: every frame named by its event type; an error is an ``error`` event and the
    last one (no ``message_stop`` follows it); the keep-alive is a ``ping`` event."""

    def error(exc: errors.ApiError) -> list[sse.Frame]:
        _, body = errors.anthropic_body(exc, request_id)
        return [sse.Frame(json.dumps(body), event="error")]

    return sse.Framing(error=error, ping=frame(PingEvent()))


def frame(event: BaseModel) -> sse.Frame:
    data = event.model_dump(mode="json")
    return sse.Frame(json.dumps(data), event=data["type"])


# --- the request ---


def _result_text(block: ToolResultBlockParam) -> str:
    return f"Error: {block.text()}" if block.is_error else block.text()


def _turns(message: MessageParam) -> list[Turn]:
    text = message.text()
    if message.role == "assistant":
        calls = [Call(b.name, json.dumps(b.input)) for b in message.tool_uses()]
        return [Turn("assistant", text, calls)]
    # Anthropic puts a user turn's tool results before its text (its API refuses them after it).
    results = [Turn("tool", _result_text(r)) for r in message.tool_results()]
    if results and not text:
        return results
    return [*results, Turn(message.role, text)]


def _tool_choice(body: ConversationRequest) -> ToolChoice | None:
    choice = body.tool_choice
    if choice is None:
        return None
    if choice.type in ("any", "tool") and not body.tools:
        raise errors.invalid_request(
            f"tool_choice `{choice.type}` needs `tools`.", "tool_choice", "invalid_value"
        )
    if choice.type == "tool":
        assert choice.name is not None  # the protocol model requires it
        return Named(choice.name)
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]  # type: ignore[return-value]


def conversation(body: ConversationRequest) -> Conversation:
    system = body.system_text()
    turns = [Turn("system", system)] if system else []
    for message in body.messages:
        turns.extend(_turns(message))
    tools = [Function(t.name, t.description, t.input_schema) for t in body.tools or []]
    return Conversation(turns, tools, _tool_choice(body), tool_choice_param="tool_choice")


def sampling(body: MessagesRequest, spec: ModelSpec, plan: structured.Plan) -> Sampling:
    d = spec.defaults
    return Sampling(
        max_tokens=body.max_tokens,
        temperature=d.temperature if body.temperature is None else body.temperature,
        top_p=d.top_p if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        # Anthropic sets no limit on their number; every engine matches any number of them.
        stop=body.stop_sequences or [],
        json_schema=plan.json_schema,
    )


def _message_ids(_: int) -> str:
    return message_id()


def work(
    body: MessagesRequest, spec: ModelSpec, ids: JobIds | None = None
) -> tuple[structured.Plan, core.Work]:
    plan = structured.plan(conversation(body))
    # The job is named like the message, so the message's id names the job (in logs, in the job record).
    w = core.chat_work(
        body.model, plan, sampling(body, spec, plan), stream=body.stream, ids=ids or _message_ids
    )
    return plan, w


# --- the result ---


def stop_reason(reason: output.EndReason, finished: events.Finished) -> tuple[StopReason, str | None]:
    """Anthropic's stop reason, and the stop sequence that ended the output if one did."""
    if reason == "length":
        return "max_tokens", None
    if reason == "tool_calls":
        return "tool_use", None
    if finished.stop_sequence is not None:
        return "stop_sequence", finished.stop_sequence
    return "end_turn", None


def usage(u: core.TokenUsage) -> Usage:
    # Anthropic's input_tokens leaves out the prompt tokens read from the cache, which it counts apart.
    return Usage(
        input_tokens=u.prompt_tokens - u.cached_tokens,
        output_tokens=u.completion_tokens,
        cache_creation_input_tokens=0,
        cache_read_input_tokens=u.cached_tokens,
    )


def _tool_use(call: Call) -> ToolUseBlock | None:
    """The call as a tool_use block; None when its arguments are not a JSON object (then it is text)."""
    try:
        arguments = json.loads(call.arguments)
    except (ValueError, RecursionError):  # a model can write nesting deeper than the parser goes
        return None
    return ToolUseBlock(name=call.name, input=arguments) if isinstance(arguments, dict) else None


def message(body: MessagesRequest, plan: structured.Plan, job_id: str, outcome: core.Outcome) -> Message:
    finished = outcome.finished[0]
    text, call, reason = output.whole(plan, finished)
    block = _tool_use(call) if call is not None else None
    content: list[ContentBlock]
    if block is not None:
        content = [block]
    else:
        content = [TextBlock(text=text)] if text else []
        reason = "length" if reason == "length" else "stop"
    stop, sequence = stop_reason(reason, finished)
    return Message(
        id=job_id,
        content=content,
        model=body.model,
        stop_reason=stop,
        stop_sequence=sequence,
        usage=usage(outcome.usage),
    )


async def complete(body: MessagesRequest, serve: core.Serve) -> tuple[Message, core.Outcome]:
    """A non-streamed message, start to end (the route's and a batch line's)."""
    plan, w = work(body, serve.spec, serve.ids)
    outcome = await serve.complete(w)
    return message(body, plan, w.jobs[0].id, outcome), outcome


async def respond(body: MessagesRequest, serve: core.Serve) -> Response:
    request_id = {errors.REQUEST_ID_HEADER: errors.anthropic_request_id()}
    if not body.stream:
        return core.json_response(*await complete(body, serve), request_id)
    plan, w = work(body, serve.spec)
    stream = await serve.stream(w)
    renderer = MessageStream(plan, w.jobs[0].id, body.model)
    frames = _frames(renderer, stream)
    return sse.respond(
        frames, framing(request_id[errors.REQUEST_ID_HEADER]), stream.close, {**stream.headers, **request_id}
    )


async def _frames(renderer: MessageStream, stream: core.Stream) -> AsyncIterator[sse.Frame]:
    for event in renderer.start(stream.runs[0].prompt_tokens):
        yield frame(event)
    async for _, ev in stream.events():
        for event in renderer.feed(ev):
            yield frame(event)


# --- the stream ---


@dataclass
class MessageStream:
    """One job's events as Anthropic's stream events: ``start()`` once the job started, then ``feed()``
    each Delta and the Finished; every content block is opened, filled and closed in turn."""

    plan: structured.Plan
    id: str
    model: str

    def __post_init__(self) -> None:
        self._choice = output.ChoiceStream(self.plan)
        self._index = -1
        self._open: Literal["text", "tool_use"] | None = None

    def start(self, input_tokens: int) -> list[BaseModel]:
        # output_tokens 0: nothing is generated yet (Anthropic's API says 1, its first token already out);
        # clients take the count from message_delta, which replaces it.
        return [MessageStartEvent.of(self.id, self.model, input_tokens), PingEvent()]

    def feed(self, event: events.Delta | events.Finished) -> list[BaseModel]:
        choice = self._choice
        pieces = choice.delta(event) if isinstance(event, events.Delta) else choice.finished(event)
        return [e for p in pieces for e in self._piece(p)]

    def _piece(self, piece: output.Piece) -> list[BaseModel]:
        if isinstance(piece, output.Text):
            if not piece.text:
                return []
            opened = self._begin("text") if self._open != "text" else []
            return [*opened, ContentBlockDeltaEvent(index=self._index, delta=TextDelta(text=piece.text))]
        if isinstance(piece, output.CallArguments):
            opened = self._begin("tool_use", piece.name) if piece.first else []
            return [*opened, *self._arguments(piece.text)]
        if isinstance(piece, output.WholeCall):
            return [*self._begin("tool_use", piece.call.name), *self._arguments(piece.call.arguments)]
        return [*self._close(), *self._end(piece)]

    def _begin(self, kind: Literal["text", "tool_use"], name: str = "") -> list[BaseModel]:
        closed = self._close()
        self._index += 1
        self._open = kind
        start = (
            ContentBlockStartEvent.text(self._index)
            if kind == "text"
            else ContentBlockStartEvent.tool_use(self._index, tool_use_id(), name)
        )
        return [*closed, start]

    def _arguments(self, text: str) -> list[BaseModel]:
        if not text:
            return []
        return [ContentBlockDeltaEvent(index=self._index, delta=InputJSONDelta(partial_json=text))]

    def _close(self) -> list[BaseModel]:
        if self._open is None:
            return []
        self._open = None
        return [ContentBlockStopEvent(index=self._index)]

    def _end(self, end: output.End) -> list[BaseModel]:
        stop, sequence = stop_reason(end.reason, end.finished)
        u = usage(core.usage([end.finished]))
        counts = MessageDeltaUsage(
            output_tokens=u.output_tokens,
            input_tokens=u.input_tokens,
            cache_creation_input_tokens=u.cache_creation_input_tokens,
            cache_read_input_tokens=u.cache_read_input_tokens,
        )
        delta = MessageDeltaEvent(delta=MessageDelta(stop_reason=stop, stop_sequence=sequence), usage=counts)
        return [delta, MessageStopEvent()]


# --- count_tokens ---


async def count_tokens(body: CountTokensRequest, serve: core.Serve) -> CountTokensResponse:
    """The prompt's tokens as the model would see it (tools rendered in, as for a message), counted by a
    worker with the model's own tokenizer and chat template: the API never tokenizes."""
    plan = structured.plan(conversation(body))
    job = Job(id=message_id(), kind="count", model=body.model, messages=plan.messages)
    outcome = await serve.complete(core.Work([job]))
    return CountTokensResponse(input_tokens=outcome.usage.prompt_tokens)
