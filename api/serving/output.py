"""One choice's streamed events as neutral output pieces: text as it comes, a tool call, the end.

Every chat-like protocol renders these pieces in its own wire shape (chat chunks, Responses events,
Anthropic content blocks), so the decision of what is text and what is a call is made here once.

A named function's arguments stream as they are generated. A call the model may or may not make (``auto``,
``required``) is held back until the job ends, because only the whole text tells whether it is a call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from api.serving import structured
from api.serving.conversation import Call
from queueing import events

EndReason = Literal["stop", "length", "tool_calls"]


def end_reason(finished: events.Finished, called: bool) -> EndReason:
    if finished.finish_reason == "length":
        return "length"
    return "tool_calls" if called else "stop"


@dataclass(frozen=True)
class Text:
    text: str
    logprobs: list[events.TokenLogprob] | None = None


@dataclass(frozen=True)
class CallArguments:
    """The next part of a named function's arguments, as generated; ``first`` opens the call."""

    name: str
    text: str
    first: bool
    logprobs: list[events.TokenLogprob] | None = None


@dataclass(frozen=True)
class WholeCall:
    """A call that was held back until the output ended and then parsed as one."""

    call: Call
    logprobs: list[events.TokenLogprob] | None = None


@dataclass(frozen=True)
class End:
    reason: EndReason
    finished: events.Finished


Piece = Text | CallArguments | WholeCall | End


@dataclass
class ChoiceStream:
    plan: structured.Plan
    _held: list[str] = field(default_factory=list)
    _held_logprobs: list[events.TokenLogprob] = field(default_factory=list)
    _text_started: bool = False
    _calling: bool = False

    def delta(self, event: events.Delta) -> list[Piece]:
        if self.plan.mode == "named":
            assert self.plan.function is not None
            first, self._calling = not self._calling, True
            return [CallArguments(self.plan.function, event.text, first, event.logprobs or None)]
        self._held.append(event.text)
        self._held_logprobs.extend(event.logprobs or [])
        if not self._text_started and self.plan.may_call("".join(self._held)):
            return []
        self._text_started = True
        return [self._flush_text()]

    def finished(self, event: events.Finished) -> list[Piece]:
        pieces: list[Piece] = []
        called = self._calling
        if self._held or self._held_logprobs:
            text = "".join(self._held)
            call = None if self._text_started else structured.tool_call(self.plan, text)
            if call is not None:
                pieces.append(WholeCall(call, self._held_logprobs or None))
                self._held, self._held_logprobs = [], []
                called = True
            else:
                pieces.append(self._flush_text())
        pieces.append(End(end_reason(event, called), event))
        return pieces

    def _flush_text(self) -> Text:
        piece = Text("".join(self._held), self._held_logprobs or None)
        self._held, self._held_logprobs = [], []
        return piece


def whole(plan: structured.Plan, finished: events.Finished) -> tuple[str, Call | None, EndReason]:
    """A non-streamed choice: its text, the call it makes (if any) and why it ended."""
    text = finished.text or ""
    call = structured.tool_call(plan, text)
    return text, call, end_reason(finished, call is not None)
