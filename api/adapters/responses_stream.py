"""A response's streaming events, rendered from neutral output pieces, with their sequence numbers.

The same events go out over SSE, over a WebSocket and into a background response's event log; the
writer keeps the state they describe (the open output item, the text so far), so the last event carries
the whole response.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter

from api import errors
from api.adapters.responses import Prepared, ended, wire_logprobs
from api.protocol.responses import (
    FunctionCallItem,
    OutputItem,
    OutputMessage,
    OutputText,
    ResponseError,
    ResponseObject,
    function_call_id,
    message_id,
)
from api.protocol.responses_events import (
    ContentPartAddedEvent,
    ContentPartDoneEvent,
    ErrorEvent,
    ErrorPayload,
    FunctionCallArgumentsDeltaEvent,
    FunctionCallArgumentsDoneEvent,
    OutputItemAddedEvent,
    OutputItemDoneEvent,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseFailedEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseQueuedEvent,
    ResponseStreamEvent,
)
from api.protocol.tools import call_id
from api.serving import core, output
from queueing import events

TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_output_item: TypeAdapter[OutputItem] = TypeAdapter(OutputItem)


@dataclass
class Writer:
    """Turns pieces into events; ``next_sequence`` lets a new writer continue another one's log."""

    response: ResponseObject
    next_sequence: int = 0
    items: list[OutputItem] = field(default_factory=list)
    _text: list[str] = field(default_factory=list)
    _logprobs: list[events.TokenLogprob] = field(default_factory=list)
    _open: OutputMessage | FunctionCallItem | None = None
    final: ResponseObject | None = None
    # What the events so far said: whether the response went in progress, and all the text they carried.
    in_progress_sent: bool = False
    emitted: str = ""

    @classmethod
    def restore(cls, response: ResponseObject, logged: list[tuple[int, dict[str, Any]]]) -> Writer:
        """A writer that goes on where a logged stream of events stopped (another holder wrote them)."""
        w = cls(response, next_sequence=logged[-1][0] + 1 if logged else 0)
        for _, e in logged:
            kind = e["type"]
            if kind == "response.in_progress":
                w.in_progress_sent = True
                w.response = w.response.model_copy(update={"status": "in_progress"})
            elif kind == "response.output_item.added":
                item = _output_item.validate_python(e["item"])
                w.items.append(item)
                w._open, w._text = item, []
            elif kind in ("response.output_text.delta", "response.function_call_arguments.delta"):
                w._text.append(e["delta"])
                w.emitted += e["delta"]
            elif kind == "response.output_item.done":
                w.items[e["output_index"]] = _output_item.validate_python(e["item"])
                w._open, w._text = None, []
        return w

    def _seq(self) -> int:
        n, self.next_sequence = self.next_sequence, self.next_sequence + 1
        return n

    def start(self) -> list[ResponseStreamEvent]:
        snapshot = self.response
        out: list[ResponseStreamEvent] = [
            ResponseCreatedEvent(sequence_number=self._seq(), response=snapshot)
        ]
        if snapshot.status == "queued":
            out.append(ResponseQueuedEvent(sequence_number=self._seq(), response=snapshot))
        return out

    def in_progress(self) -> list[ResponseStreamEvent]:
        self.in_progress_sent = True
        self.response = self.response.model_copy(update={"status": "in_progress"})
        return [ResponseInProgressEvent(sequence_number=self._seq(), response=self.response)]

    def piece(self, piece: output.Piece) -> list[ResponseStreamEvent]:
        if isinstance(piece, output.Text):
            return self._text_delta(piece.text, piece.logprobs)
        if isinstance(piece, output.CallArguments):
            out = self._open_call(piece.name) if piece.first else []
            return [*out, self._arguments(piece.text)]
        if isinstance(piece, output.WholeCall):
            return [*self._open_call(piece.call.name), self._arguments(piece.call.arguments)]
        return self._end(piece.reason, piece.finished)

    @property
    def _index(self) -> int:
        return len(self.items) - 1

    def _text_delta(self, text: str, logprobs: list[events.TokenLogprob] | None) -> list[ResponseStreamEvent]:
        out: list[ResponseStreamEvent] = []
        if not isinstance(self._open, OutputMessage):
            out = [*self._close("completed"), *self._open_message()]
        if not text and not logprobs:
            return out
        assert isinstance(self._open, OutputMessage)
        self._text.append(text)
        self.emitted += text
        self._logprobs.extend(logprobs or [])
        delta = OutputTextDeltaEvent(
            sequence_number=self._seq(),
            item_id=self._open.id,
            output_index=self._index,
            content_index=0,
            delta=text,
            logprobs=wire_logprobs(logprobs),
        )
        return [*out, delta]

    def _seed(self) -> str:
        """What the next item's ids derive from: the same for the same response rendered again from its
        job's log (a resumed stream, api/resume.py)."""
        return f"{self.response.id}:{len(self.items)}"

    def _open_message(self) -> list[ResponseStreamEvent]:
        item = OutputMessage(id=message_id(self._seed()), status="in_progress", content=[])
        self._open = item
        self.items.append(item)
        part = OutputText(text="")
        return [
            OutputItemAddedEvent(sequence_number=self._seq(), output_index=self._index, item=item),
            ContentPartAddedEvent(
                sequence_number=self._seq(),
                item_id=item.id,
                output_index=self._index,
                content_index=0,
                part=part,
            ),
        ]

    def _open_call(self, name: str) -> list[ResponseStreamEvent]:
        out = self._close("completed")
        seed = self._seed()
        item = FunctionCallItem(
            id=function_call_id(seed), call_id=call_id(seed), name=name, arguments="", status="in_progress"
        )
        self._open = item
        self.items.append(item)
        return [*out, OutputItemAddedEvent(sequence_number=self._seq(), output_index=self._index, item=item)]

    def _arguments(self, text: str) -> ResponseStreamEvent:
        assert isinstance(self._open, FunctionCallItem)
        self._text.append(text)
        self.emitted += text
        return FunctionCallArgumentsDeltaEvent(
            sequence_number=self._seq(), item_id=self._open.id, output_index=self._index, delta=text
        )

    def _close(self, status: str) -> list[ResponseStreamEvent]:
        """End the open item: its done events, and the finished item in place of the open one."""
        item, text = self._open, "".join(self._text)
        self._open, self._text = None, []
        if item is None:
            return []
        i = self._index
        if isinstance(item, OutputMessage):
            logprobs, self._logprobs = wire_logprobs(self._logprobs), []
            part = OutputText(text=text, logprobs=logprobs)
            done = item.model_copy(update={"status": status, "content": [part]})
            self.items[i] = done
            return [
                OutputTextDoneEvent(
                    sequence_number=self._seq(),
                    item_id=item.id,
                    output_index=i,
                    content_index=0,
                    text=text,
                    logprobs=logprobs,
                ),
                ContentPartDoneEvent(
                    sequence_number=self._seq(), item_id=item.id, output_index=i, content_index=0, part=part
                ),
                OutputItemDoneEvent(sequence_number=self._seq(), output_index=i, item=done),
            ]
        call = item.model_copy(update={"status": status, "arguments": text})
        self.items[i] = call
        return [
            FunctionCallArgumentsDoneEvent(
                sequence_number=self._seq(), item_id=item.id, output_index=i, arguments=text
            ),
            OutputItemDoneEvent(sequence_number=self._seq(), output_index=i, item=call),
        ]

    def _end(self, reason: output.EndReason, finished: events.Finished) -> list[ResponseStreamEvent]:
        out = [] if self.items else self._open_message()  # an empty answer is still one (empty) message
        out += self._close("incomplete" if reason == "length" else "completed")
        u = core.TokenUsage(finished.prompt_tokens, finished.completion_tokens, finished.cached_tokens)
        self.final = ended(self.response, list(self.items), reason, u)
        if self.final.status == "incomplete":
            return [*out, ResponseIncompleteEvent(sequence_number=self._seq(), response=self.final)]
        return [*out, ResponseCompletedEvent(sequence_number=self._seq(), response=self.final)]

    def failed(self, exc: errors.ApiError) -> list[ResponseStreamEvent]:
        """An error after the stream started: an ``error`` event, then ``response.failed``."""
        payload = ErrorPayload(type=exc.type, code=exc.code, message=exc.message, param=exc.param)
        self.final = self.response.model_copy(
            update={
                "status": "failed",
                "output": list(self.items),
                "error": ResponseError(code=exc.code or exc.type, message=exc.message),
            }
        )
        return [
            ErrorEvent(sequence_number=self._seq(), error=payload),
            ResponseFailedEvent(sequence_number=self._seq(), response=self.final),
        ]


async def events_of(
    prepared: Prepared, stream: core.Stream, writer: Writer
) -> AsyncIterator[ResponseStreamEvent]:
    """Every event of one streamed response after ``writer.start()``; errors become events too."""
    choice = output.ChoiceStream(prepared.plan)
    try:
        for e in writer.in_progress():
            yield e
        async for _, event in stream.events():
            pieces = choice.delta(event) if isinstance(event, events.Delta) else choice.finished(event)
            for p in pieces:
                for e in writer.piece(p):
                    yield e
    except errors.ApiError as exc:
        for e in writer.failed(errors.counted(exc)):
            yield e
