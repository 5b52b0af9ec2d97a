"""One choice's streamed events as chat chunk deltas: text as it comes, tool calls in OpenAI's shape.

A named function's arguments stream as they are generated. A call the model may or may not make (``auto``,
``required``) is held back until the job ends, because only the whole text tells whether it is a call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from api import structured
from api.protocol.chat import ChoiceLogprobs, Delta, FinishReason
from api.protocol.tools import FunctionCallDelta, ToolCall, ToolCallDelta, call_id
from queueing import events


def finish_reason(finished: events.Finished, called: bool) -> FinishReason:
    if finished.finish_reason == "length":
        return "length"
    return "tool_calls" if called else "stop"


@dataclass
class Piece:
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


@dataclass
class ChoiceStream:
    plan: structured.Plan
    _held: list[str] = field(default_factory=list)
    _held_logprobs: list[events.TokenLogprob] = field(default_factory=list)
    _text_started: bool = False
    _call_id: str | None = None

    def delta(self, event: events.Delta) -> list[Piece]:
        if self.plan.mode == "named":
            return [self._arguments(event.text, event.logprobs)]
        self._held.append(event.text)
        self._held_logprobs.extend(event.logprobs or [])
        if not self._text_started and self.plan.may_call("".join(self._held)):
            return []
        self._text_started = True
        return [self._flush_text()]

    def finished(self, event: events.Finished) -> list[Piece]:
        pieces: list[Piece] = []
        called = self._call_id is not None
        if self._held or self._held_logprobs:
            text = "".join(self._held)
            call = None if self._text_started else structured.tool_call(self.plan, text)
            if call is not None:
                pieces.append(self._whole_call(call))
                called = True
            else:
                pieces.append(self._flush_text())
        pieces.append(Piece(Delta(), finish_reason=finish_reason(event, called)))
        return pieces

    def _logprobs(self, items: list[events.TokenLogprob] | None) -> ChoiceLogprobs | None:
        return ChoiceLogprobs.of(items) if items else None

    def _flush_text(self) -> Piece:
        piece = Piece(Delta(content="".join(self._held)), self._logprobs(self._held_logprobs))
        self._held, self._held_logprobs = [], []
        return piece

    def _arguments(self, text: str, logprobs: list[events.TokenLogprob] | None) -> Piece:
        assert self.plan.function is not None
        if self._call_id is None:
            self._call_id = call_id()
            first = ToolCallDelta(
                index=0,
                id=self._call_id,
                type="function",
                function=FunctionCallDelta(name=self.plan.function, arguments=text),
            )
            return Piece(Delta(tool_calls=[first]), self._logprobs(logprobs))
        more = ToolCallDelta(index=0, function=FunctionCallDelta(arguments=text))
        return Piece(Delta(tool_calls=[more]), self._logprobs(logprobs))

    def _whole_call(self, call: ToolCall) -> Piece:
        whole = ToolCallDelta(
            index=0,
            id=call.id,
            type="function",
            function=FunctionCallDelta(name=call.function.name, arguments=call.function.arguments),
        )
        piece = Piece(Delta(tool_calls=[whole]), self._logprobs(self._held_logprobs))
        self._held, self._held_logprobs = [], []
        return piece
