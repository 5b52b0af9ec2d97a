"""Responses streaming events from neutral pieces: their order, their numbering, the schema, and a writer
that takes over another's logged events (a background response whose API process died)."""

from __future__ import annotations

from typing import Any

from api import errors
from api.adapters.responses_stream import Writer
from api.protocol.responses import ResponseObject
from api.responses.background import rest_of
from api.serving import output, structured
from api.serving.conversation import Conversation, Function, Named, Turn
from queueing import events
from tests.conformance.openresponses import validate_event, validate_response

WEATHER = Function("get_weather", "Weather", {"type": "object", "properties": {"city": {"type": "string"}}})


def _finished(reason: str = "stop", completion: int = 3) -> events.Finished:
    return events.Finished(attempt=1, finish_reason=reason, prompt_tokens=5, completion_tokens=completion)


def _plan(**kw: Any) -> structured.Plan:
    return structured.plan(Conversation([Turn("user", "hi")], **kw))


def _run(
    plan: structured.Plan, deltas: list[str], writer: Writer, reason: str = "stop"
) -> list[dict[str, Any]]:
    choice = output.ChoiceStream(plan)
    out = [*writer.start(), *writer.in_progress()]
    for d in deltas:
        for p in choice.delta(events.Delta(attempt=1, text=d)):
            out += writer.piece(p)
    for p in choice.finished(_finished(reason)):
        out += writer.piece(p)
    return [e.model_dump(mode="json") for e in out]


def test_text_events_in_order_numbered_and_valid() -> None:
    got = _run(_plan(), ["Hel", "lo", "!"], Writer(ResponseObject(model="m", status="in_progress")))
    assert [e["type"] for e in got] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    for e in got:
        validate_event(e)
    final = got[-1]["response"]
    validate_response(final)
    assert final["output"][0]["content"][0]["text"] == "Hello!" and final["status"] == "completed"


def test_a_named_call_streams_its_arguments_and_a_length_end_is_incomplete() -> None:
    plan = _plan(tools=[WEATHER], tool_choice=Named("get_weather"))
    got = _run(
        plan, ['{"city"', ': "Oslo"}'], Writer(ResponseObject(model="m", status="in_progress")), "length"
    )
    kinds = [e["type"] for e in got]
    assert kinds[2:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    for e in got:
        validate_event(e)
    final = got[-1]["response"]
    assert final["output"][0]["arguments"] == '{"city": "Oslo"}'
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}


def test_an_error_after_the_start_is_an_error_event_then_failed() -> None:
    writer = Writer(ResponseObject(model="m", status="in_progress"))
    first = [*writer.start(), *writer.in_progress()]
    got = [e.model_dump(mode="json") for e in writer.failed(errors.worker_lost("w1"))]
    assert [e["type"] for e in got] == ["error", "response.failed"]
    assert [e["sequence_number"] for e in got] == [len(first), len(first) + 1]
    for e in got:
        validate_event(e)
    assert got[1]["response"]["error"]["code"] == "worker_lost"


def test_a_restored_writer_goes_on_where_the_log_stopped() -> None:
    """What a new holder logs after the dead one's events equals what the first would have logged."""
    plan = _plan()
    whole = _run(
        plan, ["The ", "sea ", "is ", "calm."], Writer(ResponseObject(model="m", status="in_progress"))
    )
    cut = 6  # created, in_progress, item added, part added, two deltas
    logged = list(enumerate(whole[:cut]))
    skeleton = ResponseObject.model_validate(whole[0]["response"])
    writer = Writer.restore(skeleton, logged)
    assert writer.in_progress_sent and writer.emitted == "The sea "
    finished = _finished().model_copy(update={"text": "The sea is calm."})
    rest = [
        e.model_dump(mode="json") for p in rest_of(plan, writer.emitted, finished) for e in writer.piece(p)
    ]
    assert [e["sequence_number"] for e in rest] == list(range(cut, cut + len(rest)))
    joined = "".join(e["delta"] for e in whole[:cut] + rest if e["type"] == "response.output_text.delta")
    final = rest[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == joined == "The sea is calm."
    assert final["output"][0]["id"] == whole[2]["item"]["id"]  # the item the dead holder opened
    validate_response(final)
